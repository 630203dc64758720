"""Atomic writes: the target is the old file or the complete new one, never half,
with an ordinary file's mode and no temporary file left behind."""

import os
import stat

import numpy as np
import pytest
from pathlib import Path
import torch

from fnemm.io.files import (UMASK, atomic_open, atomic_path, atomic_save_npy, atomic_torch_save,
                          atomic_write_json, atomic_write_text)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_writes_replace_the_file_with_an_ordinary_mode(tmp_path):
    path = tmp_path / "deep" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and leftovers(path.parent) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~UMASK


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b'{"v": 2, "half')
        raise RuntimeError("disk gone")
    assert path.read_text() == '{\n  "v": 1\n}\n' and leftovers(tmp_path) == []


def test_path_writer_for_libraries_that_want_a_file_name(tmp_path):
    path = tmp_path / "x.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path and not path.exists()
        with open(tmp, "wb") as f:           # what faiss.write_index does with the name
            f.write(b"\x00" * 1000)
    assert path.stat().st_size == 1000 and leftovers(tmp_path) == []
    with pytest.raises(OSError), atomic_path(path) as tmp:
        os.remove(tmp)                       # the writer failed and left nothing
        raise OSError("writer failed")
    assert path.stat().st_size == 1000 and leftovers(tmp_path) == []


def test_arrays_and_checkpoints_round_trip(tmp_path):
    a = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
    atomic_save_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    atomic_torch_save(tmp_path / "c.pt", {"w": torch.arange(5)})
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.arange(5))
    assert leftovers(tmp_path) == []


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    """Content identity on every read, cheaply: a store's array is hashed on its first
    read, remembered beside it by (size, mtime, inode), read again without hashing; a
    same-size change is hashed again and refused, naming the file."""
    import numpy as np
    import fnemm.io.files as files
    from fnemm.features.store import load_features, write_manifest
    from fnemm.io.errors import FnemmError
    folder = tmp_path / "store"
    folder.mkdir()
    np.save(folder / "fne.npy", np.arange(40, dtype=np.int8).reshape(4, 10) % 3 - 1)
    write_manifest(folder, ["a", "b", "c", "d"], {"fne": "fne.npy"})
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    for _ in range(3):
        load_features(folder)
    assert calls == ["fne.npy"]                       # hashed once, then remembered
    data = bytearray((folder / "fne.npy").read_bytes())
    data[-1] ^= 1                                     # the same size, one byte changed
    (folder / "fne.npy").write_bytes(bytes(data))
    with pytest.raises(FnemmError, match=r"fne\.npy: not the file its record names"):
        load_features(folder)
    assert calls == ["fne.npy", "fne.npy"]            # changed: hashed again
    monkeypatch.setenv(files.VERIFY_ENV, "0")         # --no-verify: sizes only
    assert load_features(folder).array.shape == (4, 10)
