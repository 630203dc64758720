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
   images only, then ``fne.npy`` (the recipe's layers and post-processing, by default
   the paper's int8 {-1,0,1} codes of every layer but the classifier), ``fc7.npy``
   (the baseline layer, L2-normalised float32), ``stats.npy`` ([mean; std] of every
   raw column, float64) and ``manifest.json`` last. Re-running with other thresholds,
   layers, post-processing or training images redoes only this step; ``plan`` reads
   which step a folder needs off what is in it.

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

from fnemm.cnn import TappedCNN, build_cnn, check_finite, tap_groups
from fnemm.datasets import Dataset
from fnemm.errors import FnemmError
from fnemm.fileio import atomic_save_npy, atomic_write_json
from fnemm.features import FORMAT, write_manifest
from fnemm.fne import CROP, RESIZE, THRESHOLDS, RunningStats, crops
from fnemm.recipe import Encoder, Recipe, fit_pca, select_layers

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BLOCK = 4096          # rows per block when streaming raw.npy


@dataclass(frozen=True)
class ExtractConfig:
    cnn: str = "mobilenet_v2"         # a registered CNN or package.module:builder
    weights: str | None = None        # weights file (mobilenet_v2 finds the bundled one)
    crops: int = 10                   # 10 (corners + centre + mirrors) or 1 (centre)
    recipe: Recipe = Recipe()         # layers and post-processing (default: the paper's FNE)
    batch_size: int = 8               # images per forward pass (x crops)
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


def _read_manifest(store: Path) -> dict:
    try:
        manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FnemmError(f"{store}: not a complete feature store (no readable manifest.json); "
                         f"run `fnemm extract` there first")
    return manifest


def load_stats(store: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mean, std, manifest) of a feature store, for extracting more images with them."""
    store = Path(store)
    manifest = _read_manifest(store)
    try:
        stats = np.load(store / manifest["stats"]["file"], allow_pickle=False)
    except (OSError, KeyError, TypeError, ValueError):
        raise FnemmError(f"{store}: not a complete feature store with statistics (run `fnemm extract` "
                         f"with --dataset there first)") from None
    return stats[0], stats[1], manifest


def _load_pca(store: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    entry = manifest.get("pca")
    if not entry:
        return None
    try:
        array = np.load(store / entry["file"], allow_pickle=False)
    except (OSError, KeyError, TypeError, ValueError):
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
    """Whether a store's manifest says it was made by this CNN (weights, taps) and crop count."""
    return all(manifest.get(k) == producer.get(k) for k in ("weights_sha256", "taps", "crops"))


def producer_of(cnn: TappedCNN, crops: int) -> dict:
    """What made the raw activations: the part of a manifest that the assembly copies."""
    return {**{k: cnn.info.get(k) for k in ("cnn", "weights", "weights_sha256", "weights_format", "quant")
               if k in cnn.info},
            "preprocess": cnn.preprocess.to_dict(), "input_size": cnn.input_size,
            "resize": RESIZE, "crop": CROP, "crops": crops,
            "taps": [asdict(t) for t in cnn.taps], "groups": cnn.groups,
            "baseline": {"array": "fc7", "tap": cnn.baseline.name, "l2": True}}


PRODUCER_FIELDS = ("cnn", "weights", "weights_sha256", "weights_format", "quant", "preprocess", "input_size",
                   "resize", "crop", "crops", "taps", "groups", "baseline")


def assemble(out: Path, producer: dict, state: dict, recipe: Recipe, train_ids: set[str] | None = None,
             stats_from: Path | None = None, raw_dir: Path | None = None, info: dict | None = None,
             quiet: bool = True) -> dict:
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
        stats = train_statistics(raw, rows, quiet)
        mean, std = stats.mean, stats.std
        stats_info = {"file": "stats.npy", "split": "train", "images": int(stats.count)}
    encoder = Encoder.build(recipe, mean, std, producer["taps"], producer["groups"], producer["baseline"]["tap"],
                            pca)
    if recipe.pca and pca is None:
        encoder.pca = fit_pca(encoder.features(raw[rows]), recipe.pca)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out / "stats.npy", np.stack([mean, std]))
    extra = {}
    if encoder.pca is not None:
        atomic_save_npy(out / "pca.npy", np.vstack([encoder.pca[0][None], encoder.pca[1]]).astype(np.float32))
        extra["pca"] = {"file": "pca.npy", "components": recipe.pca}
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
    _write_arrays(out, len(ids), {"fne": (recipe.dtype, encoder.width), "fc7": (np.float32, width)}, fill, quiet)
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
    manifest = _read_manifest(base)
    if "raw" not in manifest.get("arrays", {}):
        raise FnemmError(f"{base}: has no raw.npy to derive other features from")
    wanted = {"raw_from": str(base.resolve()), "raw_sha256": _manifest_sha(base),
              "train_ids_sha256": _ids_sha(train_ids), "recipe": recipe.to_dict()}
    if (out / "manifest.json").exists():
        old = _read_manifest(out)
        if all(old.get(k) == v for k, v in wanted.items()):
            return old
        (out / "manifest.json").unlink()
    state = {"image_ids": manifest["image_ids"],
             "skipped": {s["image"]: s["reason"] for s in manifest.get("skipped", [])},
             "converted": {s["image"]: s["mode"] for s in manifest.get("converted", [])}}
    producer = {k: manifest[k] for k in PRODUCER_FIELDS if k in manifest}
    producer["groups"] = groups_of(manifest)
    info = {**wanted, **{k: manifest[k] for k in ("dataset", "images_dir", "image_ids_sha256") if k in manifest}}
    return assemble(out, producer, state, recipe, train_ids=train_ids, raw_dir=base, info=info, quiet=quiet)


def _ids_sha(ids) -> str | None:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest() if ids is not None else None


def _manifest_sha(store: Path) -> str:
    return hashlib.sha256((store / "manifest.json").read_bytes()).hexdigest()


# -- the job ----------------------------------------------------------------------------

@dataclass
class ExtractResult:
    out: Path
    manifest: dict = field(repr=False)
    images: int = 0
    skipped: int = 0
    reused: bool = False


# the parts of a job's identity that decide the raw activations (batch and chunk sizes
# only decide how the forward pass is cut into resumable pieces)
FORWARD_KEYS = ("cnn", "weights_sha256", "weights_format", "quant", "taps", "crops", "resize", "crop",
                "image_ids_sha256")


@dataclass
class Plan:
    """What ``extract`` does in a store folder, read off what is there:

    reuse     a complete store of the same images, CNN and assembly: nothing to do;
    assemble  the forward pass is done (raw.npy), the statistics or the recipe differ
              or the assembly was interrupted: redo statistics, arrays and manifest;
    forward   nothing, or an interrupted forward pass of the same job: (resume and)
              run it, then assemble.
    ``state`` holds the image ids, skipped and converted images once raw.npy is done."""
    action: str
    state: dict | None = None
    manifest: dict | None = None
    reason: str = ""


def _state_of(manifest: dict) -> dict:
    return {"image_ids": manifest["image_ids"],
            "skipped": {s["image"]: s["reason"] for s in manifest.get("skipped", [])},
            "converted": {s["image"]: s["mode"] for s in manifest.get("converted", [])}}


def plan(out: Path, identity: dict, assembly: dict) -> Plan:
    """Decide what to do in ``out`` for a job of this forward ``identity`` and this
    ``assembly`` ({stats source, recipe}); refuse a folder holding another job."""
    partial = out / ".partial"
    if (out / "manifest.json").exists() and not partial.exists():
        manifest = _read_manifest(out)
        differ = [k for k in FORWARD_KEYS if manifest.get(k) != identity.get(k)]
        if differ:
            raise FnemmError(f"{out}: already holds a feature store of other images or another CNN "
                             f"({', '.join(differ)} differ); choose another --out or delete it")
        changed = [k for k, v in assembly.items() if manifest.get(k) != v]
        if not changed:
            return Plan("reuse", _state_of(manifest), manifest)
        return Plan("assemble", _state_of(manifest), manifest, f"{', '.join(changed)} changed")
    job = partial / "job.json"
    if job.exists():
        try:
            old = json.loads(job.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise FnemmError(f"{job}: damaged; delete {partial} (the forward pass starts over)")
        done = (partial / "raw.json").exists() and (out / "raw.npy").exists()
        keys = FORWARD_KEYS if done else tuple(identity)
        changed = [k for k in keys if old.get(k) != identity.get(k)]
        if changed:
            raise FnemmError(f"{out}: holds an unfinished extraction with other settings "
                             f"({', '.join(changed)} differ); re-run with the same settings to resume, "
                             f"or choose another --out (or delete {partial})")
        if done:
            return Plan("assemble", json.loads((partial / "raw.json").read_text(encoding="utf-8")),
                        reason="an interrupted assembly")
    return Plan("forward")


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
    keep_freed_memory()
    cnn = build_cnn(config.cnn, config.weights).to(config.device)
    # the layers must exist before an hour of forward passes
    select_layers(config.recipe.layers, [t.name for t in cnn.taps], cnn.groups)
    identity = _identity(cnn, config, ids)
    info["images_dir"] = str(images.resolve())
    info["image_ids_sha256"] = identity["image_ids_sha256"]
    # which images the statistics come from: a store made with other ones is re-standardised
    info["train_ids_sha256"] = None if stats_from else _ids_sha(train_ids)
    assembly = {"train_ids_sha256": info["train_ids_sha256"], "recipe": config.recipe.to_dict(),
                "stats_from": str(Path(stats_from).resolve()) if stats_from else None}
    info["stats_from"] = assembly["stats_from"]
    todo = plan(out, identity, assembly)
    if todo.action == "reuse":
        if not quiet:
            print(f"{out}: complete ({len(todo.manifest['image_ids'])} images); reusing it")
        m = todo.manifest
        return ExtractResult(out, m, len(m["image_ids"]), len(m["skipped"]), True)
    partial = out / ".partial"
    if todo.action == "assemble" and todo.manifest is not None:
        # Back to "forward done, not assembled" before any array changes: a kill from here on
        # leaves a folder that the next run assembles, never new arrays under the old manifest.
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_json(partial / "job.json", identity)
        atomic_write_json(partial / "raw.json", todo.state)
        (out / "manifest.json").unlink()
        if not quiet:
            print(f"{out}: {todo.reason}; re-assembling from raw.npy (no forward pass)")
    state = todo.state
    if todo.action == "forward":
        partial.mkdir(parents=True, exist_ok=True)
        if not (partial / "job.json").exists():
            atomic_write_json(partial / "job.json", identity)
        n_chunks = (len(ids) + config.chunk_size - 1) // config.chunk_size
        _run_chunks(cnn, resolve_paths(images, ids), ids, config, partial, quiet)
        state = _join_chunks(partial, n_chunks, cnn.dim, out)
    if not state["image_ids"]:
        raise FnemmError(f"{images}: none of the {len(ids)} images could be read "
                         f"(e.g. {next(iter(state['skipped'].items()))}); check --images")
    manifest = assemble(out, producer_of(cnn, config.crops), state, config.recipe, train_ids,
                        Path(stats_from) if stats_from else None, info=info, quiet=quiet)
    shutil.rmtree(partial)
    return ExtractResult(out, manifest, len(state["image_ids"]), len(state["skipped"]))
