"""One exception type for every user-facing error.

The CLI prints ``str(error)`` as a single line (no traceback), so messages must
name the file at fault and say what to do about it.
"""


class FnemmError(Exception):
    """A problem with the user's input (files, options) that they can fix."""
