"""The assembly of a feature store from raw activations (the fast step of ``fnemm extract``).

From ``raw.npy`` (crop-averaged activations of every tapped layer): statistics over
the training images only (streamed), the recipe's features (``fne.npy``), the
baseline layer L2-normalised (``fc7.npy``), ``stats.npy`` ([mean; std] of every raw
column), ``pca.npy`` when the recipe asks for it, and ``manifest.json`` last. Also
what reads those back to embed new images the same way (``store_encoder``), and
``derive_store``: a store of another store's images with other training images or
another recipe, without a forward pass.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fnemm.io.progress import bar, quieted

from fnemm.features.cnn import TappedCNN, tap_groups
from fnemm.io.errors import FnemmError
from fnemm.io.faults import fault
from fnemm.features.store import FORMAT, RAW_KEYS, write_manifest
from fnemm.io.files import (atomic_save_npy, cached_sha256, check_sha256, located, make_folder, read_json,
                            relative_to, sha256_file)
from fnemm.features.fne import CROP, RESIZE, THRESHOLDS, RunningStats
from fnemm.features.images import return_freed_memory
from fnemm.features.pca import fit_pca_streamed
from fnemm.features.recipe import Encoder, Recipe, select_layers

BLOCK_BYTES = 64 << 20        # a block of raw.npy rows, once in float64: memory is this, not the store's


def block_rows(width: int) -> int:
    """Rows per block when streaming an array of ``width`` columns (float64 at most BLOCK_BYTES)."""
    return max(16, BLOCK_BYTES // (8 * max(width, 1)))


def _blocks(n: int, width: int, what: str):
    """Block starts over n rows, with a progress bar when there is more than one block."""
    step = block_rows(width)
    return bar(range(0, n, step), desc=what, unit="block", quiet=n <= step), step


def train_statistics(raw: np.ndarray, rows: np.ndarray) -> RunningStats:
    """Mean/std over ``rows`` of ``raw`` (sorted row numbers), streamed in blocks."""
    stats = RunningStats()
    starts, step = _blocks(len(rows), raw.shape[1], "statistics")
    for b in starts:
        stats.update(raw[rows[b:b + step]])
    return stats


def _write_arrays(folder: Path, n: int, columns: dict[str, tuple[type, int]], fill, width: int) -> None:
    """``folder/NAME.npy`` for each of ``columns`` {name: (dtype, width)}, n rows written block
    by block from ``fill(rows) -> {name: block}`` in one pass (blocks of the raw ``width``),
    each renamed into place at the end."""
    tmps = {name: folder / f".{name}.npy.tmp" for name in columns}
    arrays = {name: np.lib.format.open_memmap(tmps[name], mode="w+", dtype=dtype, shape=(n, width))
              for name, (dtype, width) in columns.items()}
    starts, step = _blocks(n, width, "+".join(columns))
    for b in starts:
        for name, block in fill(slice(b, b + step)).items():
            arrays[name][b:b + step] = block
    for name, array in arrays.items():
        array.flush()
        del array
    arrays.clear()
    for name, tmp in tmps.items():
        os.replace(tmp, folder / f"{name}.npy")


def read_manifest(store: Path) -> dict:
    """A complete store's manifest, or a one-line error."""
    manifest = read_json(store / "manifest.json", f"run `fnemm extract` into {store} again")
    if manifest.get("format") != FORMAT:
        raise FnemmError(f"{store}: not an fnemm feature store (manifest format {manifest.get('format')!r})")
    return manifest


def damaged_files(store: Path, manifest: dict, hashes: bool = False) -> list[str]:
    """The store's array files (``arrays``, statistics, PCA) that are missing, not the size
    the manifest records, or not a readable .npy (with ``hashes``: or whose sha256
    differs from the manifest's)."""
    files = [a.get("file") for a in (manifest.get("arrays") or {}).values() if isinstance(a, dict)]
    sizes = {a.get("file"): a.get("bytes") for a in (manifest.get("arrays") or {}).values() if isinstance(a, dict)}
    for extra in ("stats", "pca"):
        if isinstance(manifest.get(extra), dict):
            files.append(manifest[extra].get("file"))
            sizes[manifest[extra].get("file")] = manifest[extra].get("bytes")
    hashed = {a.get("file"): a.get("sha256") for a in (manifest.get("arrays") or {}).values() if isinstance(a, dict)}
    for extra in ("stats", "pca"):
        if isinstance(manifest.get(extra), dict) and manifest[extra].get("sha256"):
            hashed[manifest[extra].get("file")] = manifest[extra]["sha256"]
    bad = []
    for name in files:
        path = store / str(name)
        if not isinstance(name, str) or not path.is_file() or \
                (sizes.get(name) is not None and path.stat().st_size != sizes[name]) or \
                (hashes and hashed.get(name) and cached_sha256(path) != hashed[name]):
            bad.append(str(name))
            continue
        try:
            np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            bad.append(name)
    return bad


def load_stats(store: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mean, std, manifest) of a feature store, for extracting more images with them."""
    store = Path(store)
    manifest = read_manifest(store)
    try:
        entry = manifest["stats"]
        path = store / entry["file"]
        if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
            raise FnemmError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}; run "
                             f"`fnemm extract` into {store} again (the same command repairs it)")
        check_sha256(path, entry.get("sha256"), f"run `fnemm extract` into {store} again (or --verify)")
        stats = np.load(path, allow_pickle=False)
        if stats.ndim != 2 or len(stats) != 2:
            raise ValueError("not [mean; std]")
    except (OSError, KeyError, TypeError, ValueError, EOFError):
        raise FnemmError(f"{store / 'stats.npy'}: missing or not [mean; std]: not a complete feature store with "
                         f"statistics (run `fnemm extract` with --dataset there first)") from None
    return stats[0], stats[1], manifest


def _load_pca(store: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    entry = manifest.get("pca")
    if not entry:
        return None
    try:
        check_sha256(store / entry["file"], entry.get("sha256"), f"run `fnemm extract` into {store} again")
        array = np.load(store / entry["file"], allow_pickle=False)
    except (OSError, KeyError, TypeError, ValueError, EOFError):
        raise FnemmError(f"{store}: its PCA ({entry.get('file')}) cannot be read; re-run `fnemm extract`") from None
    return array[0].astype(np.float64), array[1:].astype(np.float64)


def recipe_of(manifest: dict) -> Recipe:
    """A store's recipe (stores from before recipes: every layer, the paper's codes)."""
    if "recipe" in manifest:
        return Recipe.from_dict(manifest["recipe"])
    return Recipe(layers="all", thresholds=tuple(manifest.get("thresholds", THRESHOLDS)))


def groups_of(manifest: dict) -> dict[str, list[str]]:
    """A store's layer groups (stores from before groups: computed from its taps)."""
    return manifest.get("groups") or tap_groups([t["name"] for t in manifest["taps"]],
                                                baseline=manifest["baseline"]["tap"])


def store_encoder(store: str | Path) -> tuple[Encoder, dict]:
    """(the encoder that made a store's arrays from raw rows, its manifest)."""
    store = Path(store)
    mean, std, manifest = load_stats(store)
    encoder = Encoder.build(recipe_of(manifest), mean, std, manifest["taps"], groups_of(manifest),
                            manifest["baseline"]["tap"], _load_pca(store, manifest))
    return encoder, manifest


def same_producer(manifest: dict, producer: dict) -> bool:
    """Whether a store's raw activations were made by this CNN (weights, taps) and crop count."""
    return all(manifest.get(k) == producer.get(k) for k in RAW_KEYS)


def producer_of(cnn: TappedCNN, crops: int) -> dict:
    """What made the raw activations: the part of a manifest that the assembly copies."""
    return {**{k: cnn.info.get(k) for k in ("cnn", "weights", "weights_sha256", "weights_format", "quant",
                                            "finetuned") if k in cnn.info},
            "preprocess": cnn.preprocess.to_dict(), "input_size": cnn.input_size,
            "resize": RESIZE, "crop": CROP, "crops": crops,
            "taps": [asdict(t) for t in cnn.taps], "groups": cnn.groups,
            "baseline": {"array": "fc7", "tap": cnn.baseline.name, "l2": True}}


PRODUCER_FIELDS = ("cnn", "weights", "weights_sha256", "weights_format", "quant", "finetuned", "preprocess", "input_size",
                   "resize", "crop", "crops", "taps", "groups", "baseline")


def assemble(out: Path, producer: dict, state: dict, recipe: Recipe, train_ids: set[str] | None = None,
             stats_from: Path | None = None, raw_dir: Path | None = None, info: dict | None = None) -> dict:
    """Statistics, the recipe's ``fne.npy``, the baseline ``fc7.npy`` and the manifest of the
    store ``out``, from the raw activations in ``raw_dir`` (default ``out``) of the images
    ``state['image_ids']``. Statistics come from the rows of ``train_ids``, or from the
    store ``stats_from`` (its PCA too)."""
    ids = state["image_ids"]
    raw_dir = raw_dir or out
    raw = np.load(raw_dir / "raw.npy", mmap_mode="r")
    pca = None
    if stats_from is not None:
        mean, std, other = load_stats(stats_from)
        if not same_producer(other, producer):
            raise FnemmError(f"{stats_from}: its statistics come from another CNN, weights or crops; "
                             f"extract with the same --cnn/--weights/--crops as that store")
        if recipe.pca:
            pca = _load_pca(Path(stats_from), other)
            if pca is None or len(pca[1]) != recipe.pca:
                raise FnemmError(f"{stats_from}: has no PCA of {recipe.pca} components to reuse; "
                                 f"extract with the same --pca as that store")
        stats_info = {"file": "stats.npy", "from": str(Path(stats_from).resolve()),
                      "split": other["stats"].get("split"), "images": other["stats"].get("images")}
    else:
        rows = np.array([r for r, i in enumerate(ids) if i in train_ids], dtype=np.int64)
        if len(rows) == 0:
            raise FnemmError(f"{out}: none of the extracted images is in the training split, so there are "
                             f"no statistics to standardise with; check --dataset, or pass --stats STORE")
        stats = train_statistics(raw, rows)
        mean, std = stats.mean, stats.std
        stats_info = {"file": "stats.npy", "split": "train", "images": int(stats.count)}
    encoder = Encoder.build(recipe, mean, std, producer["taps"], producer["groups"], producer["baseline"]["tap"],
                            pca)
    if recipe.pca and pca is None:
        return_freed_memory()               # passes over stored rows: no heap growing with the blocks
        step = block_rows(raw.shape[1])
        encoder.pca = fit_pca_streamed(lambda: (encoder.features(raw[rows[b:b + step]])
                                                for b in range(0, len(rows), step)), recipe.pca)
    make_folder(out)
    atomic_save_npy(out / "stats.npy", np.stack([mean, std]))
    stats_info["bytes"] = (out / "stats.npy").stat().st_size
    stats_info["sha256"] = sha256_file(out / "stats.npy")
    fault("assemble-stats")
    extra = {}
    if encoder.pca is not None:
        atomic_save_npy(out / "pca.npy", np.vstack([encoder.pca[0][None], encoder.pca[1]]).astype(np.float32))
        extra["pca"] = {"file": "pca.npy", "components": recipe.pca, "bytes": (out / "pca.npy").stat().st_size,
                        "sha256": sha256_file(out / "pca.npy")}
        encoder.pca = tuple(a.astype(np.float32).astype(np.float64) for a in encoder.pca)   # as stored
    else:
        (out / "pca.npy").unlink(missing_ok=True)
    counts = np.zeros(3, np.int64)          # how many -1, 0, +1: reported, and a sanity check

    def fill(rows: slice) -> dict[str, np.ndarray]:
        block = encoder(raw[rows])
        if block["fne"].dtype == np.int8:
            counts[:] += np.bincount(block["fne"].ravel() + 1, minlength=3)
        return block

    width = encoder.baseline.stop - encoder.baseline.start
    _write_arrays(out, len(ids), {"fne": (recipe.dtype, encoder.width), "fc7": (np.float32, width)}, fill,
                  raw.shape[1])
    fault("assemble-arrays")
    if counts.sum():
        extra["fne_fractions"] = {str(v): round(float(c) / int(counts.sum()), 4) for v, c in zip((-1, 0, 1), counts)}
    names = [t["name"] for t in producer["taps"]]
    arrays = {"fne": "fne.npy", "fc7": "fc7.npy", **({"raw": "raw.npy"} if raw_dir == out else {})}
    fields = {**{k: producer[k] for k in PRODUCER_FIELDS if k in producer},
              "thresholds": list(recipe.thresholds), "recipe": recipe.to_dict(),
              "layers": [names[k] for k in select_layers(recipe.layers, names, producer["groups"])],
              "stats": stats_info, **extra, **(info or {})}
    return write_manifest(out, ids, arrays, state["skipped"], state["converted"], **fields)


def derive_store(base: str | Path, out: str | Path, train_ids: set[str], recipe: Recipe,
                 quiet: bool = True) -> dict:
    """A store of ``base``'s images with other training images and/or another recipe,
    computed from ``base``'s raw.npy (no forward pass; ``out`` holds no raw.npy of its own).
    Reused when ``out`` already holds exactly that."""
    base, out = Path(base), Path(out)
    manifest = read_manifest(base)
    if "raw" not in manifest.get("arrays", {}):
        raise FnemmError(f"{base}: has no raw.npy to derive other features from")
    wanted = {"raw_from": str(base.resolve()), "raw_sha256": _manifest_sha(base),
              "train_ids_sha256": ids_sha(train_ids), "recipe": recipe.to_dict()}
    if (out / "manifest.json").exists():
        old = read_manifest(out)
        if all(old.get(k) == v for k, v in wanted.items()):
            return old
        (out / "manifest.json").unlink()
    state = {"image_ids": manifest["image_ids"],
             "skipped": {s["image"]: s["reason"] for s in manifest.get("skipped", [])},
             "converted": {s["image"]: s["mode"] for s in manifest.get("converted", [])}}
    producer = {k: manifest[k] for k in PRODUCER_FIELDS if k in manifest}
    producer["groups"] = groups_of(manifest)
    info = {**wanted, **{k: manifest[k] for k in ("dataset", "images_dir", "image_ids_sha256") if k in manifest}}
    if images := located(base, manifest, "images_dir"):
        info["images_dir_relative"] = relative_to(images, out)
    with quieted(quiet):
        return assemble(out, producer, state, recipe, train_ids=train_ids, raw_dir=base, info=info)


def ids_sha(ids) -> str | None:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest() if ids is not None else None


def _manifest_sha(store: Path) -> str:
    return hashlib.sha256((store / "manifest.json").read_bytes()).hexdigest()
