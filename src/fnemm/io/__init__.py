"""The ground floor: errors, atomic files and the one JSON reader, folder locks, progress,
where the bundled data is, fault injection, the version. Imports nothing else of fnemm."""
