"""fnemm's version, from the installed package's metadata (pyproject.toml is its one source)."""

from importlib import metadata

try:
    __version__ = metadata.version("fnemm")
except metadata.PackageNotFoundError:      # a source tree on sys.path, not installed
    __version__ = "0+unknown"
