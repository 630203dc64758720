"""One writer per output folder: an advisory lock (``fcntl.flock``) on ``FOLDER/.lock``.

The lock belongs to the open file, so it goes away with the process however it ends
(kill -9 included): a stale lock file never blocks the next run. The file records who
holds it (pid, command) so a refused second writer can say which process to wait for.
Whoever takes the lock first removes the temporary files a killed writer left there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fnemm.io.errors import FnemmError
from fnemm.io.files import make_folder, remove_stale_temps

LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}     # folder -> descriptor of the locks this process holds


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file: were the parent
    # killed, the child would keep the folder locked. It never writes there: let go.
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class Busy(FnemmError):
    """Another process is writing the folder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def folder_lock(folder: str | Path, what: str = "this folder", wait: bool = False) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (creating the folder); re-entrant within a
    process. When another process holds it: raise :class:`Busy` at once, naming that
    process, or with ``wait`` block until it lets go."""
    folder = make_folder(folder)
    key = str(folder.resolve())
    if key in _HELD:                  # this process holds it already (e.g. a study run, then its training)
        yield folder
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise Busy(f"{folder}: {what} is being written by {_holder(path)}; wait for it to "
                       f"finish, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:500]}).encode())
        _HELD[key] = fd
        remove_stale_temps(folder)          # a killed writer's half-files: no writer is alive now
        yield folder
    finally:
        if _HELD.get(key) == fd:
            del _HELD[key]
        os.close(fd)          # releases the lock


def writer_of(folder: str | Path) -> str | None:
    """Who is writing ``folder`` now (another process holding its lock), or None; the
    folder is not locked by asking."""
    path = Path(folder) / LOCK_FILE
    if str(Path(folder).resolve()) in _HELD or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        return _holder(path)
    finally:
        os.close(fd)          # a shared lock taken only to test: released at once
