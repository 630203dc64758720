"""Atomic writes: a file is either the old one or the complete new one, never half.

Everything is written to a temporary file in the same folder, flushed to disk,
then renamed over the target (rename is atomic within a file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
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


def make_folder(path: str | Path, writing: str | Path | None = None) -> Path:
    """``path`` as a folder, made with its parents if need be (to write the file ``writing``
    in, when given); a file standing at it, or where one of its parents would be, is a
    one-line error naming it (not a traceback)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        shown = Path(writing) if writing is not None else path
        there = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise FnemmError(f"{shown}: a file, not a folder; give a folder's path" if there == shown else
                         f"{shown}: {there} is a file, not a folder; give another path") from None
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (faiss):
    once the block ends, the file is flushed to disk and renamed over ``path``; if
    the block raises, it is removed and ``path`` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise FnemmError(f"{path}: a folder; give the path of a file to write")
    make_folder(path.parent, writing=path)
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


CHECKSUMS = "checksums.json"      # a run folder's record of its checkpoints' sha256


def atomic_torch_save(path: str | Path, obj, record: bool = False) -> None:
    """``obj`` saved to ``path`` atomically; with ``record``, its sha256 kept in the folder's
    checksums.json, which names both the old and the new file while one replaces the
    other, so that a kill at any point leaves a file its record names."""
    import torch
    path = Path(path)
    if not record:
        with atomic_open(path) as f:
            torch.save(obj, f)
        return
    sums = _checksums(path.parent, strict=False)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        new = sha256_file(tmp)
        sums[path.name] = [*sums.get(path.name, [])[-1:], new]
        atomic_write_json(path.parent / CHECKSUMS, sums)
    sums[path.name] = [new]
    atomic_write_json(path.parent / CHECKSUMS, sums)
    _remember(path, new)


def _checksums(folder: Path, strict: bool = True) -> dict[str, list[str]]:
    """A folder's checksums.json ({file: [sha256, ...]}); {} when there is none. A damaged
    one is an error naming it (``strict``), or ignored by a writer about to replace it."""
    path = folder / CHECKSUMS
    if not path.exists():
        return {}
    try:
        sums = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(sums, dict) or not all(isinstance(v, list) and v and all(isinstance(x, str) for x in v)
                                                 for v in sums.values()):
            raise ValueError
        return sums
    except (ValueError, UnicodeDecodeError, OSError):
        if strict:
            raise FnemmError(f"{path}: damaged, so the checkpoints beside it cannot be proven theirs; train the "
                             f"run again (or delete it to read them unchecked)") from None
        return {}


def _remember(path: Path, digest: str) -> None:
    """Put a file just written, whose sha256 is known, in the hash cache beside it."""
    st = path.stat()
    cache_path = path.parent / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.exists() else {}
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    cache[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": digest}
    try:
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass


def load_torch_data(path: str | Path, fix: str) -> dict:
    """A ``.pt`` file read as data only (``torch.load(weights_only=True)``: tensors, numbers,
    strings, lists and dicts; never an object whose unpickling could run code), on the CPU
    (the caller moves what it needs). A file that is not such data is a one-line error
    naming it, with ``fix``."""
    import pickle

    import torch
    path = Path(path)
    if path.is_file():                # proven the file its run's checksums.json names, when it names one
        check_sha256(path, _checksums(path.parent).get(path.name), fix)
    try:
        with warnings.catch_warnings():       # torch's note on a plain pickle's protocol: said below, in a line
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):   # a class or function to import: an object
            raise FnemmError(f"{path}: holds Python objects, not only tensors and numbers; fnemm reads checkpoints "
                             f"as data and will not unpickle it (a file from elsewhere, or tampered with?); "
                             f"{fix}") from None
        raise FnemmError(f"{path}: not a file torch.save writes ({_looks_like(path, e)}); {fix}") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, garbage, an I/O error: a damaged file
        raise FnemmError(f"{path}: not a readable checkpoint ({type(e).__name__}; damaged, or killed while it "
                         f"was copied?); {fix}") from None
    if not isinstance(data, dict):
        raise FnemmError(f"{path}: not an fnemm checkpoint; {fix}")
    return data


def _looks_like(path: Path, error: Exception) -> str:
    """What a file the data-only unpickler refused (``error``) seems to be, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):       # torch's zip, whose pickle the data-only reader cannot follow
        said = [line.strip() for line in str(error).splitlines() if "Unsupported" in line]
        return f"a torch archive that is not plain data: {said[0][:80] if said else 'UnpicklingError'}"
    if head[:1] == b"\x80":
        return "a plain pickle"
    text = head.decode("utf-8", "replace")
    return f"text: {text!r}..." if all(c.isprintable() or c in "\t\r\n" for c in text) else "unknown bytes"


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """Streamed to disk: no in-memory copy of the array (4 GB at 1M x 1024 float32)."""
    with atomic_open(path) as f:
        np.save(f, array, allow_pickle=False)


def scratch_array(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A writable array backed by a file in the temporary folder ($TMPDIR), unlinked at
    once: its pages are the page cache's, not the process's own memory, and nothing is
    left behind however the process ends. Put $TMPDIR on a disk, not a RAM-backed tmpfs,
    for this to save memory."""
    fd, name = tempfile.mkstemp(prefix="fnemm-scratch-", suffix=".bin")
    try:
        with os.fdopen(fd, "w+b") as f:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            f.truncate(max(size, 1))
            return np.memmap(f, dtype=dtype, mode="r+", shape=shape)
    finally:
        os.unlink(name)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- content identity on every read, cheaply ---------------------------------------------------

VERIFY_ENV = "FNEMM_VERIFY"          # "0": check sizes only (fnemm ... --no-verify)
HASH_CACHE = ".fnemm-sha256.json"    # beside the files: {name: {size, mtime_ns, inode, sha256}}


def verifying() -> bool:
    return os.environ.get(VERIFY_ENV, "1") != "0"


def cached_sha256(path: str | Path) -> str:
    """The file's sha256, remembered beside it by (size, mtime_ns, inode): a file read again
    unchanged is not hashed again (a 2 GB store: seconds once, then nothing); a changed one
    is. The cache is a convenience: when it cannot be written, the hash is still right."""
    path = Path(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    cache_path = path.parent / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(path.name)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()) and \
            isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    cache[path.name] = {**key, "sha256": digest}
    try:
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass
    return digest


def check_sha256(path: str | Path, expected: str | list[str] | None, fix: str) -> None:
    """Refuse a file whose content is not the one its record names (``expected``: the
    sha256, or the few it may be while a save is under way): one line naming it. Nothing to
    check without a record, or with verification turned off (sizes are still checked)."""
    if not expected or not verifying():
        return
    wanted = [expected] if isinstance(expected, str) else list(expected)
    if cached_sha256(path) not in wanted:
        raise FnemmError(f"{path}: not the file its record names (its sha256 differs: damaged, or swapped in "
                         f"from elsewhere); {fix}")


def read_json(path: str | Path, fix: str, expect: type = dict):
    """The JSON value in ``path`` (of type ``expect``), or a one-line FnemmError naming the
    file, what is wrong with it and ``fix`` (what the user should do)."""
    from fnemm.io.errors import FnemmError
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")      # a byte-order mark (Notepad's) is not JSON's
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


def text_of(path: str | Path, data: bytes | None = None) -> str:
    """A user's text file (or ``data`` read from it: standard input, say) as one string:
    UTF-8, a leading byte-order mark dropped (Excel's "CSV UTF-8" and Windows Notepad write
    one; kept, it would glue itself to the first image name or caption), else a one-line
    FnemmError naming the file, the line and the byte that are not UTF-8, and the fix."""
    data = Path(path).read_bytes() if data is None else data
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise FnemmError(f"{path}: UTF-16 text (Windows' \"Unicode\"); save the file as UTF-8")
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = data[:at].count(b"\n") + 1
        raise FnemmError(f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); "
                         f"save the file as UTF-8") from None


def lines_of(text: str) -> list[str]:
    """``text`` split at its line ends (\\n, \\r\\n, \\r), and only there: str.splitlines also
    splits at U+2028 and other Unicode separators, which a JSON string may hold unescaped (a
    web caption's line separator would cut its JSON line in two)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def text_lines(path: str | Path) -> list[str]:
    """The lines of a user's UTF-8 text file (:func:`text_of`, split by :func:`lines_of`)."""
    return lines_of(text_of(path))


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


def located(base: str | Path, record: dict, key: str) -> Path | None:
    """The path a record keeps as ``record[key]`` (absolute) and ``record[key + "_relative"]``
    (relative to ``base``, the folder holding the record), found by :func:`locate`."""
    return locate(base, record.get(f"{key}_relative"), record.get(key))
