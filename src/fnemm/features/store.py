"""Image features in: the feature store that ``fnemm extract`` writes, or a
plain ``.npy`` matrix with an ids file.

Feature store (a folder)::

    manifest.json   {"format": "fnemm-features", "version": 1,
                     "image_ids": [...N ids, row order...],
                     "arrays": {"fne": {"file": "fne.npy", "dtype": "int8", "shape": [N, D]},
                                "fc7": {"file": "fc7.npy", "dtype": "float32", "shape": [N, 4096]}, ...},
                     "skipped": [{"image": id, "reason": "..."}],   # unreadable images
                     ...what produced it: cnn, weights sha256, taps, crops, thresholds...}
    fne.npy, fc7.npy, ...  one row per image id, in manifest order

Plain features: ``feats.npy`` (N x D, any numeric dtype) and an ids file of N
lines (``--ids``, or ``feats.ids.txt`` / ``ids.txt`` beside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnemm.io.errors import FnemmError
from fnemm.io.files import check_sha256, atomic_save_npy, atomic_write_json, read_json, sha256_file, text_lines

FORMAT = "fnemm-features"
# What a store's raw activations depend on (a store's statistics only fit raw activations
# that agree on these), and what its features depend on (a model only fits those).
RAW_KEYS = ("weights_sha256", "quant", "taps", "crops")
FEATURE_KEYS = ("cnn", *RAW_KEYS, "thresholds", "recipe")


@dataclass
class Features:
    ids: list[str]
    array: np.ndarray                     # (N, D), rows in ``ids`` order; may be a memmap
    source: str                           # path it was read from
    kind: str                             # array name ('fne', 'fc7', or 'plain')
    skipped: dict[str, str] = field(default_factory=dict)   # image id -> why it has no row
    manifest: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    @property
    def sha256(self) -> str | None:
        """The sha256 of the array's file as the store's manifest names it (checked when
        the store was read), or None for an array with no manifest entry."""
        return ((self.manifest.get("arrays") or {}).get(self.kind) or {}).get("sha256")

    def provenance(self) -> dict:
        """What a run records of the features it trains on (run.json, the checkpoint): where,
        which array, its width and bytes (sha256), and how the store was made."""
        record = {"source": self.source, "kind": self.kind, "dim": self.dim,
                  "producer": {k: v for k, v in self.manifest.items() if k not in ("image_ids", "skipped", "arrays")}}
        return {**record, "sha256": self.sha256} if self.sha256 else record

    def rows_for(self, image_ids: list[str], what: str = "the dataset") -> np.ndarray:
        """Row index of each of ``image_ids``; a clear error if any has no features."""
        index = {image: row for row, image in enumerate(self.ids)}
        missing = [i for i in image_ids if i not in index]
        if missing:
            known_bad = [i for i in missing if i in self.skipped]
            why = (f"; {len(known_bad)} were skipped at extraction "
                   f"(e.g. {known_bad[0]}: {self.skipped[known_bad[0]]})" if known_bad else "")
            raise FnemmError(
                f"{self.source}: {len(missing)} of {len(image_ids)} images of {what} have no features "
                f"(e.g. {missing[0]!r}){why}; extract features for the same images, or check that "
                f"--features and --dataset belong together")
        return np.array([index[i] for i in image_ids], dtype=np.int64)


class StackedRows:
    """The rows of several (N_k, D) arrays of one dtype as one (sum N_k, D) array, for
    reads of whole rows by index (``a[rows]``): no array is copied or loaded whole."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), int(arrays[0].shape[1]))
        self.dtype = arrays[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        if rows.ndim != 1:
            raise TypeError("StackedRows reads a 1-D list of row indices or a slice")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows out of range for {self.shape[0]} rows")     # never uninitialised rows
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k, array in enumerate(self.arrays):
            mine = which == k
            if mine.any():
                out[mine] = array[rows[mine] - self.starts[k]]
        return out


def stack_features(first: Features, *more: Features) -> Features:
    """One gallery of several stores' images (``first``'s manifest and kind: the others
    must hold other images, with features of the same kind, width and dtype)."""
    ids, seen = list(first.ids), set(first.ids)
    for f in more:
        if (f.kind, f.dim, f.array.dtype) != (first.kind, first.dim, first.array.dtype):
            raise FnemmError(f"{f.source}: {f.kind} features of {f.dim} dimensions ({f.array.dtype}), but "
                             f"{first.source} holds {first.kind} ones of {first.dim} ({first.array.dtype}); "
                             f"extract them the same way")
        twice = next((i for i in f.ids if i in seen), None)
        if twice is not None:
            raise FnemmError(f"{f.source}: image {twice!r} is in {first.source} too; a gallery holds each image once")
        ids += f.ids
        seen.update(f.ids)
    if not more:
        return first
    skipped = {k: v for f in (first, *more) for k, v in f.skipped.items() if k not in seen}
    return Features(ids, StackedRows([first.array, *(f.array for f in more)]), first.source, first.kind,
                    skipped, first.manifest)


def _check_array(array: np.ndarray, n_ids: int, path: Path) -> None:
    if array.ndim != 2:
        raise FnemmError(f"{path}: expected a 2-D (images x features) array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise FnemmError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    if array.shape[0] != n_ids:
        raise FnemmError(f"{path}: {array.shape[0]} rows but {n_ids} image ids; "
                         f"the ids file must list one id per row, in row order")


def _check_ids(ids: list[str], path: Path) -> None:
    seen = set()
    for k, i in enumerate(ids):
        if i in seen:
            raise FnemmError(f"{path}: image id {i!r} appears twice (entry {k + 1})")
        seen.add(i)


def _load_npy(path: Path, fix: str = "re-create it with numpy.save") -> np.ndarray:
    if not path.is_file():
        raise FnemmError(f"{path}: missing; {fix}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FnemmError(f"{path}: not a readable .npy array ({str(e).splitlines()[0][:100] or 'empty'}); "
                         f"{fix}") from None


def load_store(folder: Path, kind: str = "fne", verify: bool = False) -> Features:
    manifest_path = folder / "manifest.json"
    fix = "re-run `fnemm extract` into this folder (the same command rebuilds it)"
    manifest = read_json(manifest_path, fix)
    if manifest.get("format") != FORMAT:
        raise FnemmError(f"{manifest_path}: not an fnemm feature store (format={manifest.get('format')!r})")
    arrays, ids = manifest.get("arrays"), manifest.get("image_ids")
    if not isinstance(arrays, dict) or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or \
            not all(isinstance(a, dict) and isinstance(a.get("file"), str) for a in arrays.values()):
        raise FnemmError(f"{manifest_path}: incomplete (no arrays or image ids); {fix}")
    if kind not in arrays:
        have = ", ".join(arrays) or "none"
        raise FnemmError(f"{folder}: this feature store has no {kind!r} features (it has: {have}); "
                         f"train with --set features=... to use another array, or extract them")
    path = folder / arrays[kind]["file"]
    if (wrong := verify_array(folder, arrays[kind], hashes=verify)) is not None:
        raise FnemmError(f"{path}: damaged ({wrong}); {fix}")
    check_sha256(path, arrays[kind].get("sha256"), f"{fix}, or `fnemm extract --verify`")
    array = _load_npy(path, fix)
    _check_array(array, len(ids), path)
    _check_ids(ids, manifest_path)
    skipped = {s["image"]: s.get("reason", "") for s in manifest.get("skipped", [])}
    return Features(ids, array, str(folder), kind, skipped, manifest)


def load_plain(path: Path, ids_path: Path | None = None) -> Features:
    if ids_path is None:
        for candidate in (path.with_suffix(".ids.txt"), path.parent / "ids.txt"):
            if candidate.exists():
                ids_path = candidate
                break
        else:
            raise FnemmError(f"{path}: no ids file found; pass --ids FILE with one image id per row "
                             f"(or put {path.with_suffix('.ids.txt').name} beside it)")
    if not ids_path.exists():
        raise FnemmError(f"{ids_path}: no such ids file")
    ids = [line.strip() for line in text_lines(ids_path) if line.strip()]
    array = _load_npy(path)
    _check_array(array, len(ids), path)
    _check_ids(ids, ids_path)
    return Features(ids, array, str(path), "plain")


def load_features(path: str | Path, kind: str = "fne", ids: str | Path | None = None,
                  verify: bool = False) -> Features:
    """Features from a store folder (array ``kind``; its size checked against the manifest,
    its sha256 too with ``verify``) or a plain ``.npy`` (+ ``ids``)."""
    path = Path(path)
    if not path.exists():
        raise FnemmError(f"{path}: no such feature store or .npy file; run `fnemm extract` or "
                         f"pass a .npy matrix with --ids")
    if path.is_dir():
        if not (path / "manifest.json").exists():
            raise FnemmError(f"{path}: no manifest.json; not a feature store (run `fnemm extract`)")
        return load_store(path, kind, verify)
    if path.suffix != ".npy":
        raise FnemmError(f"{path}: expected a feature store folder or a .npy file")
    return load_plain(path, Path(ids) if ids else None)


def array_entry(folder: Path, name: str, file: str) -> dict:
    """The manifest's description of an array file already written in ``folder``: what a
    reader checks (its size, always; its sha256 when asked to verify)."""
    array = np.load(folder / file, mmap_mode="r", allow_pickle=False)
    return {"file": file, "dtype": str(array.dtype), "shape": list(array.shape),
            "bytes": (folder / file).stat().st_size, "sha256": sha256_file(folder / file)}


def verify_array(folder: Path, entry: dict, hashes: bool = False) -> str | None:
    """What is wrong with one array file of a store, against its manifest entry (None: fine)."""
    path = folder / entry["file"]
    if not path.is_file():
        return "missing"
    if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
        return f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if hashes and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        return "its sha256 differs from the manifest's"
    return None


def write_manifest(folder: str | Path, image_ids: list[str], arrays: dict[str, str],
                   skipped: dict[str, str] | None = None, converted: dict[str, str] | None = None,
                   **info) -> dict:
    """The store's manifest.json, written last (atomically) over arrays already in place:
    ``arrays`` maps each name to its file in ``folder``. The one writer of the format."""
    folder = Path(folder)
    from fnemm.io.version import __version__
    manifest = {"format": FORMAT, "version": 1, "fnemm": __version__, **info, "image_ids": list(image_ids),
                "arrays": {name: array_entry(folder, name, file) for name, file in arrays.items()},
                "skipped": [{"image": i, "reason": r} for i, r in (skipped or {}).items()],
                "converted": [{"image": i, "mode": m} for i, m in (converted or {}).items()]}
    atomic_write_json(folder / "manifest.json", manifest)
    return manifest


def write_store(folder: str | Path, image_ids: list[str], arrays: dict[str, np.ndarray],
                skipped: dict[str, str] | None = None, **info) -> Path:
    """Write a complete feature store from arrays in memory (arrays first, manifest last,
    all atomic)."""
    folder = Path(folder)
    for kind, array in arrays.items():
        _check_array(array, len(image_ids), folder / f"{kind}.npy")
        atomic_save_npy(folder / f"{kind}.npy", np.ascontiguousarray(array))
    write_manifest(folder, image_ids, {kind: f"{kind}.npy" for kind in arrays}, skipped, **info)
    return folder
