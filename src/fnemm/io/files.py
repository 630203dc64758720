"""Atomic writes: a file is either the old one or the complete new one, never half.

Everything is written to a temporary file in the same folder, flushed to disk,
then renamed over the target (rename is atomic within a file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fnemm.io.errors import FnemmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()      # read once: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (faiss):
    once the block ends, the file is flushed to disk and renamed over ``path``; if
    the block raises, it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)      # mkstemp makes 0600; give the file an ordinary file's mode
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to stream into; it replaces ``path`` only once complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj) -> None:
    import torch
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_torch_data(path: str | Path, fix: str) -> dict:
    """A ``.pt`` file read as data only (``torch.load(weights_only=True)``: tensors, numbers,
    strings, lists and dicts; never an object whose unpickling could run code), on the CPU
    (the caller moves what it needs). A file that is not such data is a one-line error
    naming it, with ``fix``."""
    import pickle

    import torch
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise FnemmError(f"{path}: holds Python objects, not only tensors and numbers; fnemm reads checkpoints "
                             f"as data and will not unpickle it (a file from elsewhere, or tampered with?); "
                             f"{fix}") from None
        raise FnemmError(f"{path}: not a readable checkpoint ({first[:80] or 'UnpicklingError'}); {fix}") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, garbage, an I/O error: a damaged file
        raise FnemmError(f"{path}: not a readable checkpoint ({type(e).__name__}; damaged, or killed while it "
                         f"was copied?); {fix}") from None
    if not isinstance(data, dict):
        raise FnemmError(f"{path}: not an fnemm checkpoint; {fix}")
    return data


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """Streamed to disk: no in-memory copy of the array (4 GB at 1M x 1024 float32)."""
    with atomic_open(path) as f:
        np.save(f, array, allow_pickle=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, fix: str, expect: type = dict):
    """The JSON value in ``path`` (of type ``expect``), or a one-line FnemmError naming the
    file, what is wrong with it and ``fix`` (what the user should do)."""
    from fnemm.io.errors import FnemmError
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except FileNotFoundError:
        raise FnemmError(f"{path}: missing; {fix}") from None
    except IsADirectoryError:
        raise FnemmError(f"{path}: a folder, not a JSON file; {fix}") from None
    except UnicodeDecodeError:
        raise FnemmError(f"{path}: not UTF-8 text (damaged?); {fix}") from None
    except json.JSONDecodeError as e:
        raise FnemmError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); {fix}") from None
    if not isinstance(value, expect):
        raise FnemmError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                         f"found {type(value).__name__}; {fix}")
    return value


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (and its .partial/):
    only call it holding the folder's lock, when no writer can be alive."""
    folder = Path(folder)
    stale = [p for d in (folder, folder / ".partial") if d.is_dir() for p in d.iterdir()
             if p.is_file() and p.name.endswith(".tmp") and (p.name.startswith(".") or p.name == "raw.npy.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def relative_to(target: str | Path, base: str | Path) -> str:
    """``target`` as a path relative to the folder ``base`` (for manifests that must survive
    a move of both together)."""
    return os.path.relpath(Path(target).resolve(), Path(base).resolve())


def locate(base: str | Path, relative: str | None, absolute: str | None) -> Path | None:
    """A recorded path: relative to ``base`` when it is there (both moved together), else
    the absolute one when that is there, else None."""
    for candidate in ((Path(base) / relative) if relative else None, Path(absolute) if absolute else None):
        if candidate is not None and candidate.exists():
            return candidate.resolve()
    return None
