"""``fnemm extract``: a folder of images -> a feature store of FNE and baseline features.

Two resumable steps, each leaving files a re-run picks up:

1. **Forward** (slow): images are decoded and cropped in DataLoader workers, run
   through the CNN, and their crop-averaged tap outputs written as float16 chunks
   of ``chunk_size`` images under ``OUT/.partial/`` (rows, then a json that commits
   the chunk). Killing the job loses at most the chunk in flight; a re-run skips
   committed chunks. Batches never straddle chunks, so a chunk's bytes do not
   depend on where an earlier run stopped. When every chunk is in, they are joined
   into ``raw.npy`` and the chunks removed.
2. **Assemble** (fast, from ``raw.npy``): streaming mean/std over the training
   images only, then ``fne.npy`` (int8 {-1,0,1}), ``fc7.npy`` (the baseline layer,
   L2-normalised float32), ``stats.npy`` ([mean; std], float64) and
   ``manifest.json`` last. Re-running with other thresholds redoes only this step.

Unreadable or missing images get no row; they are listed in the manifest's
``skipped`` with the reason. Non-RGB images (grey, CMYK, palette, RGBA) are
converted to RGB and listed in ``converted``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fnemm import __version__
from fnemm.cnn import TappedCNN, build_cnn, check_finite
from fnemm.datasets import Dataset
from fnemm.errors import FnemmError
from fnemm.fileio import atomic_save_npy, atomic_write_json
from fnemm.features import FORMAT
from fnemm.fne import CROP, RESIZE, THRESHOLDS, RunningStats, crops, encode

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BLOCK = 4096          # rows per block when streaming raw.npy


@dataclass(frozen=True)
class ExtractConfig:
    cnn: str = "mobilenet_v2"         # a registered CNN or package.module:builder
    weights: str | None = None        # weights file (mobilenet_v2 finds the bundled one)
    crops: int = 10                   # 10 (corners + centre + mirrors) or 1 (centre)
    thresholds: tuple[float, float] = THRESHOLDS
    batch_size: int = 4               # images per forward pass (x crops)
    chunk_size: int = 256             # images per resumable chunk
    workers: int = 1                  # DataLoader processes decoding images (0: in-process)
    device: str = "cpu"


# -- images -----------------------------------------------------------------------------

def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted relative paths."""
    if not folder.is_dir():
        raise FnemmError(f"{folder}: no such image folder; pass --images DIR")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resolve_paths(folder: Path, ids: list[str]) -> list[Path | None]:
    """Where each image id is: ``folder/id``, else a file of that name anywhere below
    ``folder`` (COCO keeps train2014/ and val2014/ apart), else None."""
    if not folder.is_dir():
        raise FnemmError(f"{folder}: no such image folder; pass --images DIR")
    paths: list[Path | None] = [folder / i for i in ids]
    missing = [k for k, p in enumerate(paths) if not p.is_file()]
    if missing:
        by_name: dict[str, Path] = {}
        for p in folder.rglob("*"):
            by_name.setdefault(p.name, p)
        for k in missing:
            paths[k] = by_name.get(Path(ids[k]).name)
    return paths


def read_image(path: Path | None, n_crops: int) -> tuple[np.ndarray | None, str | None, str | None]:
    """(crops, why skipped, original mode if converted)."""
    if path is None:
        return None, "missing: no such file under --images", None
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if img.width < 1 or img.height < 1:
                return None, "empty image", None
            return crops(img, n_crops), None, (mode if mode != "RGB" else None)
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds for a corrupt file)
        return None, f"unreadable: {type(e).__name__}: {e}".splitlines()[0][:200], None


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path | None], n_crops: int):
        self.paths, self.n_crops = paths, n_crops

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, k):
        return (k, *read_image(self.paths[k], self.n_crops))


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks for reuse instead of returning every large
    activation map to the OS: otherwise each forward pass page-faults its maps in
    anew (measured: 11 s of 53 s in the kernel, ~2x fewer crops/s for MobileNetV2)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)           # M_MMAP_THRESHOLD: heap, not mmap, below 1 GiB
        libc.mallopt(-1, (1 << 31) - 1)     # M_TRIM_THRESHOLD: do not trim the heap back
    except (OSError, AttributeError):
        pass                                # not glibc: nothing to tune


def _worker_init(_):
    torch.set_num_threads(1)          # decoding is the worker's job; the main process runs the CNN


def _collate(items):
    return items


# -- the forward step -------------------------------------------------------------------

def forward_images(cnn: TappedCNN, crops_u8: np.ndarray, n_crops: int, device: str) -> np.ndarray:
    """(B * n_crops, H, W, 3) uint8 -> (B, dim) crop-averaged tap outputs, float32."""
    x = torch.from_numpy(crops_u8).to(device)
    out = cnn(x).view(-1, n_crops, cnn.dim).mean(1)
    return out.cpu().numpy()


def _identity(cnn: TappedCNN, config: ExtractConfig, ids: list[str]) -> dict:
    """What the chunk bytes depend on; a resumed run must match it."""
    return {"cnn": cnn.info.get("cnn"), "weights_sha256": cnn.info.get("weights_sha256"),
            "weights_format": cnn.info.get("weights_format"), "quant": cnn.info.get("quant"),
            "taps": [asdict(t) for t in cnn.taps], "crops": config.crops, "resize": RESIZE, "crop": CROP,
            "batch_size": config.batch_size, "chunk_size": config.chunk_size,
            "image_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "images": len(ids)}


def _check_job(path: Path, identity: dict, out: Path) -> None:
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            raise FnemmError(f"{out}: holds an unfinished extraction with other settings "
                             f"({', '.join(changed)} differ); re-run with the same settings to resume, "
                             f"or choose another --out (or delete {path.parent})")
    else:
        atomic_write_json(path, identity)


def _run_chunks(cnn: TappedCNN, paths: list[Path | None], ids: list[str], config: ExtractConfig,
                partial: Path, quiet: bool) -> None:
    n, size = len(ids), config.chunk_size
    chunks = [(c, range(c * size, min((c + 1) * size, n))) for c in range((n + size - 1) // size)]
    todo = [(c, r) for c, r in chunks if not (partial / f"chunk-{c:05d}.json").exists()]
    done_images = n - sum(len(r) for _, r in todo)
    batches = [list(r[b:b + config.batch_size]) for _, r in todo for b in range(0, len(r), config.batch_size)]
    loader = torch.utils.data.DataLoader(
        _Images(paths, config.crops), batch_sampler=batches, collate_fn=_collate,
        num_workers=config.workers, worker_init_fn=_worker_init if config.workers else None,
        prefetch_factor=4 if config.workers else None)
    chunk_of = {k: c for c, r in todo for k in r}
    rows: list[np.ndarray] = []
    kept: list[str] = []
    skipped: dict[str, str] = {}
    converted: dict[str, str] = {}
    bar = tqdm(total=n, initial=done_images, unit="img", desc="extract", disable=quiet, smoothing=0.1)
    with bar:
        for batch in loader:
            good = [(k, c) for k, c, why, _ in batch if why is None]
            for k, _, why, mode in batch:
                if why is not None:
                    skipped[ids[k]] = why
                elif mode is not None:
                    converted[ids[k]] = mode
            if good:
                out = forward_images(cnn, np.concatenate([c for _, c in good]), config.crops, config.device)
                check_finite(out, f"image {ids[good[0][0]]}")
                rows.append(out.astype(np.float16))
                kept += [ids[k] for k, _ in good]
            bar.update(len(batch))
            last = batch[-1][0]
            chunk = chunk_of[last]
            if last == chunks[chunk][1][-1]:          # the chunk is complete: commit it
                array = np.concatenate(rows) if rows else np.zeros((0, cnn.dim), np.float16)
                if not np.isfinite(array).all():
                    raise FnemmError(f"{ids[last]}: activations overflow float16; this CNN's outputs "
                                     f"are too large for the raw store")
                atomic_save_npy(partial / f"chunk-{chunk:05d}.npy", array)
                atomic_write_json(partial / f"chunk-{chunk:05d}.json",
                                  {"image_ids": kept, "skipped": skipped, "converted": converted})
                rows, kept, skipped, converted = [], [], {}, {}


def _join_chunks(partial: Path, n_chunks: int, dim: int, out: Path) -> dict:
    metas = [json.loads((partial / f"chunk-{c:05d}.json").read_text()) for c in range(n_chunks)]
    ids = [i for m in metas for i in m["image_ids"]]
    raw = np.lib.format.open_memmap(partial / "raw.npy.tmp", mode="w+", dtype=np.float16, shape=(len(ids), dim))
    row = 0
    for c, m in enumerate(metas):
        block = np.load(partial / f"chunk-{c:05d}.npy")
        raw[row:row + len(block)] = block
        row += len(block)
    raw.flush()
    del raw
    os.replace(partial / "raw.npy.tmp", out / "raw.npy")
    state = {"image_ids": ids,
             "skipped": {k: v for m in metas for k, v in m["skipped"].items()},
             "converted": {k: v for m in metas for k, v in m["converted"].items()}}
    atomic_write_json(partial / "raw.json", state)
    for c in range(n_chunks):
        (partial / f"chunk-{c:05d}.npy").unlink()
    return state


# -- the assemble step ------------------------------------------------------------------

def _blocks(n: int, what: str, quiet: bool):
    """Block starts over n rows, with a progress bar when there is more than one block."""
    return tqdm(range(0, n, BLOCK), desc=what, unit="block", disable=quiet or n <= BLOCK)


def train_statistics(raw: np.ndarray, rows: np.ndarray, quiet: bool = True) -> RunningStats:
    """Mean/std over ``rows`` of ``raw`` (sorted row numbers), streamed in blocks."""
    stats = RunningStats()
    for b in _blocks(len(rows), "statistics", quiet):
        stats.update(raw[rows[b:b + BLOCK]])
    return stats


def _write_arrays(folder: Path, n: int, columns: dict[str, tuple[type, int]], fill, quiet: bool) -> None:
    """``folder/NAME.npy`` for each of ``columns`` {name: (dtype, width)}, n rows written block
    by block from ``fill(rows) -> {name: block}`` in one pass, each renamed into place at the end."""
    tmps = {name: folder / f".{name}.npy.tmp" for name in columns}
    arrays = {name: np.lib.format.open_memmap(tmps[name], mode="w+", dtype=dtype, shape=(n, width))
              for name, (dtype, width) in columns.items()}
    for b in _blocks(n, "+".join(columns), quiet):
        for name, block in fill(slice(b, b + BLOCK)).items():
            arrays[name][b:b + BLOCK] = block
    for name, array in arrays.items():
        array.flush()
        del array
    arrays.clear()
    for name, tmp in tmps.items():
        os.replace(tmp, folder / f"{name}.npy")


def load_stats(store: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mean, std, manifest) of a feature store, for extracting more images with them."""
    store = Path(store)
    try:
        manifest = json.loads((store / "manifest.json").read_text())
        stats = np.load(store / manifest["stats"]["file"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        raise FnemmError(f"{store}: not a complete feature store with statistics (run `fnemm extract` "
                         f"with --dataset there first)") from None
    return stats[0], stats[1], manifest


def same_producer(manifest: dict, cnn: TappedCNN, crops: int) -> bool:
    """Whether a store's manifest says it was made by this CNN (weights, taps) and crop count."""
    return (manifest.get("weights_sha256"), manifest.get("taps"), manifest.get("crops")) == \
        (cnn.info.get("weights_sha256"), [asdict(t) for t in cnn.taps], crops)


def _assemble(out: Path, cnn: TappedCNN, config: ExtractConfig, state: dict, train_ids: set[str] | None,
              stats_from: Path | None, info: dict, quiet: bool) -> dict:
    ids = state["image_ids"]
    raw = np.load(out / "raw.npy", mmap_mode="r")
    if stats_from is not None:
        mean, std, other = load_stats(stats_from)
        if not same_producer(other, cnn, config.crops):
            raise FnemmError(f"{stats_from}: its statistics come from another CNN, weights or crops; "
                             f"extract with the same --cnn/--weights/--crops as that store")
        stats_info = {"file": "stats.npy", "from": str(Path(stats_from).resolve()),
                      "split": other["stats"].get("split"), "images": other["stats"].get("images")}
    else:
        rows = np.array([r for r, i in enumerate(ids) if i in train_ids], dtype=np.int64)
        if len(rows) == 0:
            raise FnemmError(f"{out}: none of the extracted images is in the training split, so there are "
                             f"no statistics to standardise with; check --dataset, or pass --stats STORE")
        stats = train_statistics(raw, rows, quiet)
        mean, std = stats.mean, stats.std
        stats_info = {"file": "stats.npy", "split": "train", "images": int(stats.count)}
    atomic_save_npy(out / "stats.npy", np.stack([mean, std]))
    low, high = config.thresholds
    base = slice(cnn.baseline.start, cnn.baseline.stop)
    n = len(ids)
    counts = np.zeros(3, np.int64)          # how many -1, 0, +1: reported, and a sanity check

    def fill(rows: slice) -> dict[str, np.ndarray]:
        block = encode(raw[rows], mean, std, (low, high), base)
        counts[:] += np.bincount(block["fne"].ravel() + 1, minlength=3)
        return block

    _write_arrays(out, n, {"fne": (np.int8, cnn.dim), "fc7": (np.float32, cnn.baseline.channels)}, fill, quiet)
    fractions = {str(v): round(float(c) / max(int(counts.sum()), 1), 4) for v, c in zip((-1, 0, 1), counts)}
    arrays = {"fne": ("fne.npy", "int8", cnn.dim), "fc7": ("fc7.npy", "float32", cnn.baseline.channels),
              "raw": ("raw.npy", "float16", cnn.dim)}
    manifest = {
        "format": FORMAT, "version": 1, "fnemm": __version__,
        **{k: cnn.info.get(k) for k in ("cnn", "weights", "weights_sha256", "weights_format", "quant") if k in cnn.info},
        "preprocess": cnn.preprocess.to_dict(), "input_size": cnn.input_size,
        "resize": RESIZE, "crop": CROP, "crops": config.crops,
        "thresholds": [low, high], "stats": stats_info, "fne_fractions": fractions,
        "taps": [asdict(t) for t in cnn.taps],
        "baseline": {"array": "fc7", "tap": cnn.baseline.name, "l2": True},
        **info,
        "image_ids": ids,
        "arrays": {k: {"file": f, "dtype": d, "shape": [n, w]} for k, (f, d, w) in arrays.items()},
        "skipped": [{"image": i, "reason": r} for i, r in state["skipped"].items()],
        "converted": [{"image": i, "mode": m} for i, m in state["converted"].items()],
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


# -- the job ----------------------------------------------------------------------------

@dataclass
class ExtractResult:
    out: Path
    manifest: dict = field(repr=False)
    images: int = 0
    skipped: int = 0
    reused: bool = False


def extract(images: str | Path, out: str | Path, dataset: Dataset | None = None,
            config: ExtractConfig = ExtractConfig(), stats_from: str | Path | None = None,
            train_list: list[str] | None = None, quiet: bool = False) -> ExtractResult:
    """Extract the images of ``dataset`` (or every image under ``images``) into the
    feature store ``out``, resuming whatever an earlier run left there.

    Statistics come from the dataset's training split, else from the images named in
    ``train_list``, else from another store (``stats_from``)."""
    images, out = Path(images), Path(out)
    if config.crops not in (1, 10):
        raise FnemmError(f"--crops {config.crops}: expected 10 (corners, centre and mirrors) or 1 (centre)")
    if not config.thresholds[0] < config.thresholds[1]:
        raise FnemmError(f"--thresholds {config.thresholds[0]},{config.thresholds[1]}: the low threshold "
                         f"must be below the high one")
    if config.batch_size < 1 or config.chunk_size < 1 or config.workers < 0:
        raise FnemmError("--batch-size and --chunk-size must be >= 1, --workers >= 0")
    if dataset is not None:
        ids = list(dataset.image_ids)
        train_ids = {dataset.image_ids[k] for k in dataset.split_indices("train")}
        info = {"dataset": dataset.summary()}
    else:
        ids, info = list_images(images), {}
        train_ids = set(train_list) if train_list is not None else None
        if not ids:
            raise FnemmError(f"{images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if stats_from is None and train_ids is None:
            raise FnemmError("without --dataset there is no training split to compute statistics on; "
                             "pass --dataset, --train-list FILE, or --stats STORE to reuse a store's statistics")
    info["images_dir"] = str(images.resolve())
    # which images the statistics come from: a store made with other ones is re-standardised
    info["train_ids_sha256"] = (hashlib.sha256("\n".join(sorted(train_ids)).encode()).hexdigest()
                                if train_ids is not None else None)
    keep_freed_memory()
    cnn = build_cnn(config.cnn, config.weights).to(config.device)
    identity = _identity(cnn, config, ids)
    partial = out / ".partial"
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not partial.exists():
        manifest = json.loads(manifest_path.read_text())
        if same_producer(manifest, cnn, config.crops) and \
                manifest.get("image_ids_sha256") == identity["image_ids_sha256"]:
            wanted = {"thresholds": list(config.thresholds),
                      "stats_from": str(Path(stats_from).resolve()) if stats_from else None}
            if manifest["thresholds"] == wanted["thresholds"] and \
                    manifest["stats"].get("from") == wanted["stats_from"] and \
                    (stats_from or manifest.get("train_ids_sha256") == info["train_ids_sha256"]):
                if not quiet:
                    print(f"{out}: complete ({len(manifest['image_ids'])} images); reusing it")
                return ExtractResult(out, manifest, len(manifest["image_ids"]), len(manifest["skipped"]), True)
            state = {"image_ids": manifest["image_ids"],
                     "skipped": {s["image"]: s["reason"] for s in manifest["skipped"]},
                     "converted": {s["image"]: s["mode"] for s in manifest.get("converted", [])}}
            manifest = _assemble(out, cnn, config, state, train_ids, stats_from,
                                 {**info, "image_ids_sha256": identity["image_ids_sha256"]}, quiet)
            return ExtractResult(out, manifest, len(state["image_ids"]), len(state["skipped"]))
        raise FnemmError(f"{out}: already holds a feature store of other images or another CNN; "
                         f"choose another --out or delete it")
    partial.mkdir(parents=True, exist_ok=True)
    _check_job(partial / "job.json", identity, out)
    n_chunks = (len(ids) + config.chunk_size - 1) // config.chunk_size
    if (partial / "raw.json").exists() and (out / "raw.npy").exists():
        state = json.loads((partial / "raw.json").read_text())
    else:
        paths = resolve_paths(images, ids)
        _run_chunks(cnn, paths, ids, config, partial, quiet)
        state = _join_chunks(partial, n_chunks, cnn.dim, out)
    if not state["image_ids"]:
        raise FnemmError(f"{images}: none of the {len(ids)} images could be read "
                         f"(e.g. {next(iter(state['skipped'].items()))}); check --images")
    manifest = _assemble(out, cnn, config, state, train_ids, stats_from,
                         {**info, "image_ids_sha256": identity["image_ids_sha256"]}, quiet)
    shutil.rmtree(partial)
    return ExtractResult(out, manifest, len(state["image_ids"]), len(state["skipped"]))
