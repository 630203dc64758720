"""fnemm's version, from the installed package's metadata (pyproject.toml is its one source),
and :func:`software`: what a run records of the code that trained it."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("fnemm")
except metadata.PackageNotFoundError:      # a source tree on sys.path, not installed
    __version__ = "0+unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_commit(root: Path | None = None) -> dict | None:
    """{"commit": sha, "modified": whether tracked files under src/ differ from it} of the
    git checkout fnemm runs from (an editable install, a worktree); None for an installed
    wheel, or where git is missing or fails."""
    root = root or Path(__file__).resolve().parents[3]          # src/fnemm/io/version.py -> the checkout
    if not ((root / ".git").exists() and (root / "src" / "fnemm").is_dir()):
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"),
                "modified": bool(git("status", "--porcelain", "--untracked-files=no", "--", "src"))}
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def software() -> dict:
    """The code a run was made with: fnemm's version and, from a git checkout, its commit;
    Python's, torch's and numpy's versions (run.json's "software", so that results carried
    between machines and sessions say which code made them)."""
    return {"fnemm": __version__, **(source_commit() or {"commit": None}), "python": platform.python_version(),
            "torch": _version("torch"), "numpy": _version("numpy")}
