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
import os
import shutil
from dataclasses import asdict, dataclass, field
import functools
from pathlib import Path

import numpy as np
import torch
from fnemm.io.progress import bar as progress_bar, quieted, say

from fnemm.features.assembly import assemble, damaged_files, ids_sha, producer_of
from fnemm.features.store import FORMAT
from fnemm.features.cnn import TappedCNN, build_cnn, check_finite
from fnemm.datasets import Dataset
from fnemm.io.errors import FnemmError
from fnemm.io.faults import fault
from fnemm.io.files import (HASH_CACHE, atomic_save_npy, atomic_write_json, make_folder, read_json, relative_to,
                            verifying)
from fnemm.io.locks import folder_lock
from fnemm.features.fne import CROP, RESIZE
from fnemm.features.images import (IMAGE_SUFFIXES, PRECISIONS, _collate, _Images, _worker_init, forward_images,
                                   keep_freed_memory, list_images, resolve_paths)
from fnemm.features.recipe import ExtractConfig, select_layers

RESTART = "delete {partial} and run the same command again (the forward pass starts over)"


def _identity(cnn: TappedCNN, config: ExtractConfig, ids: list[str]) -> dict:
    """What the chunk bytes depend on; a resumed run must match it."""
    return {"cnn": cnn.info.get("cnn"), "weights_sha256": cnn.info.get("weights_sha256"),
            "weights_format": cnn.info.get("weights_format"), "quant": cnn.info.get("quant"),
            "taps": [asdict(t) for t in cnn.taps], "crops": config.crops, "resize": RESIZE, "crop": CROP,
            **({"precision": config.precision} if config.precision != "fp32" else {}),
            "batch_size": config.batch_size, "chunk_size": config.chunk_size,
            "image_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "images": len(ids)}


def _run_chunks(cnn: TappedCNN, paths: list[Path | None], ids: list[str], config: ExtractConfig,
                partial: Path) -> None:
    n, size = len(ids), config.chunk_size
    chunks = [(c, range(c * size, min((c + 1) * size, n))) for c in range((n + size - 1) // size)]
    todo = [(c, r) for c, r in chunks if not (partial / f"chunk-{c:05d}.json").exists()]
    done_images = n - sum(len(r) for _, r in todo)
    batches = [list(r[b:b + config.batch_size]) for _, r in todo for b in range(0, len(r), config.batch_size)]
    loader = torch.utils.data.DataLoader(
        _Images(paths), batch_sampler=batches, collate_fn=_collate,
        num_workers=config.workers, worker_init_fn=functools.partial(_worker_init, os.getpid()) if config.workers else None,
        prefetch_factor=4 if config.workers else None)
    chunk_of = {k: c for c, r in todo for k in r}
    rows: list[np.ndarray] = []
    kept: list[str] = []
    skipped: dict[str, str] = {}
    converted: dict[str, str] = {}
    bar = progress_bar(total=n, initial=done_images, unit="img", desc="extract", smoothing=0.1)
    with bar:
        for batch in loader:
            good = [(k, c) for k, c, why, _ in batch if why is None]
            for k, _, why, mode in batch:
                if why is not None:
                    skipped[ids[k]] = why
                elif mode is not None:
                    converted[ids[k]] = mode
            if good:
                out = forward_images(cnn, np.stack([c for _, c in good]), config.crops, config.device,
                                     config.precision)
                check_finite(out, f"image {ids[good[0][0]]}")
                rows.append(out.astype(np.float16))
                kept += [ids[k] for k, _ in good]
            bar.update(len(batch))
            last = batch[-1][0]
            chunk = chunk_of[last]
            if last == chunks[chunk][1][-1]:          # the chunk is complete: commit it
                _commit(partial, cnn.dim, chunk, rows, kept, skipped, converted)
                rows, kept, skipped, converted = [], [], {}, {}


def _commit(partial: Path, dim: int, chunk: int, rows: list[np.ndarray], kept: list[str], skipped: dict,
            converted: dict) -> None:
    """Write one finished chunk: its activations, then the record that it is done."""
    array = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    if not np.isfinite(array).all():
        raise FnemmError(f"chunk {chunk}: activations overflow float16; this CNN's outputs "
                         f"are too large for the raw store")
    atomic_save_npy(partial / f"chunk-{chunk:05d}.npy", array)
    atomic_write_json(partial / f"chunk-{chunk:05d}.json",
                      {"image_ids": kept, "skipped": skipped, "converted": converted})
    fault(f"chunk-{chunk}")


def _join_chunks(partial: Path, n_chunks: int, dim: int, out: Path) -> dict:
    metas = [read_json(partial / f"chunk-{c:05d}.json", RESTART.format(partial=partial)) for c in range(n_chunks)]
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
                "image_ids_sha256", "precision")


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


def plan(out: Path, identity: dict, assembly: dict, verify: bool = False) -> Plan:
    """Decide what to do in ``out`` for a job of this forward ``identity`` and this
    ``assembly`` ({stats source, recipe}); refuse a folder holding another job. A
    complete store's files are checked: sizes, and their sha256 (remembered beside them while
    unchanged; with ``verify``, hashed again whatever the cache says)."""
    partial = out / ".partial"
    if (out / "manifest.json").exists() and not partial.exists():
        try:
            manifest = read_json(out / "manifest.json", "")
        except FnemmError:                # damaged: nothing in the folder can be trusted
            return Plan("forward", reason="its manifest.json is damaged: extracting again")
        if manifest.get("format") != FORMAT:
            raise FnemmError(f"{out}: holds a manifest.json that is not an fnemm feature store's; "
                             f"choose another --out")
        differ = [k for k in FORWARD_KEYS if manifest.get(k) != identity.get(k)]
        if differ:
            raise FnemmError(f"{out}: already holds a feature store of other images or another CNN "
                             f"({', '.join(differ)} differ); choose another --out or delete it")
        try:
            state = _state_of(manifest)
        except (KeyError, TypeError):
            return Plan("forward", reason="its manifest.json is incomplete: extracting again")
        if verify:                         # --verify: hash everything again, the cache aside
            (out / HASH_CACHE).unlink(missing_ok=True)
        damaged = damaged_files(out, manifest, hashes=verify or verifying())
        raw = (manifest.get("arrays") or {}).get("raw", {}).get("file", "raw.npy")
        if raw in damaged or not (out / raw).is_file():
            return Plan("forward", reason=f"{raw} is damaged or missing: extracting again")
        changed = [k for k, v in assembly.items() if manifest.get(k) != v]
        if not damaged and not changed:
            return Plan("reuse", state, manifest)
        # about to be re-assembled from raw.npy: it must be the very one the manifest describes
        if damaged_files(out, {"arrays": {"raw": manifest["arrays"]["raw"]}}, hashes=True):
            return Plan("forward", reason=f"{raw} differs from the manifest's sha256: extracting again")
        reason = f"{damaged[0]} is damaged or missing" if damaged else f"{', '.join(changed)} changed"
        return Plan("assemble", state, manifest, reason)
    job = partial / "job.json"
    if job.exists():
        old = read_json(job, RESTART.format(partial=partial))
        done = (partial / "raw.json").exists() and (out / "raw.npy").exists()
        keys = FORWARD_KEYS if done else tuple(identity)
        changed = [k for k in keys if old.get(k) != identity.get(k)]
        if changed:
            raise FnemmError(f"{out}: holds an unfinished extraction with other settings "
                             f"({', '.join(changed)} differ); re-run with the same settings to resume, "
                             f"or choose another --out (or delete {partial})")
        if done:
            return Plan("assemble", read_json(partial / "raw.json", RESTART.format(partial=partial)),
                        reason="an interrupted assembly")
    return Plan("forward")


def _check(config: ExtractConfig) -> None:
    if config.precision not in PRECISIONS:
        raise FnemmError(f"--precision {config.precision}: expected one of {', '.join(PRECISIONS)}")
    if config.crops not in (1, 10):
        raise FnemmError(f"--crops {config.crops}: expected 10 (corners, centre and mirrors) or 1 (centre)")
    if config.batch_size < 1 or config.chunk_size < 1 or config.workers < 0:
        raise FnemmError("--batch-size and --chunk-size must be >= 1, --workers >= 0")


def _which_images(images: Path, dataset: Dataset | None, ids: list[str] | None, train_list: list[str] | None,
                  stats_from) -> tuple[list[str], set[str] | None, dict]:
    """(the images to extract, the training images of the statistics, what the manifest says of them)."""
    if dataset is not None:
        return (list(dataset.image_ids), {dataset.image_ids[k] for k in dataset.split_indices("train")},
                {"dataset": dataset.summary()})
    ids = list(ids) if ids is not None else list_images(images)
    train_ids = set(train_list) if train_list is not None else None
    if not ids:
        raise FnemmError(f"{images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if stats_from is None and train_ids is None:
        raise FnemmError("without --dataset there is no training split to compute statistics on; "
                         "pass --dataset, --train-list FILE, or --stats STORE to reuse a store's statistics")
    return ids, train_ids, {}


def _forward(cnn: TappedCNN, images: Path, ids: list[str], config: ExtractConfig, out: Path,
             identity: dict) -> dict:
    """The forward pass (resuming its committed chunks), joined into raw.npy: the state to assemble."""
    partial = out / ".partial"
    (out / "manifest.json").unlink(missing_ok=True)    # it vouches for nothing any more
    make_folder(partial)
    if not (partial / "job.json").exists():
        atomic_write_json(partial / "job.json", identity)
    n_chunks = (len(ids) + config.chunk_size - 1) // config.chunk_size
    if config.ray is not None:     # the same chunks, on a Ray cluster (fnemm.features.ray)
        from fnemm.features.ray import run_chunks_ray
        run_chunks_ray(config, resolve_paths(images, ids), ids, partial, cnn.dim,
                       lambda *a: _commit(partial, cnn.dim, *a))
    else:
        _run_chunks(cnn, resolve_paths(images, ids), ids, config, partial)
    return _join_chunks(partial, n_chunks, cnn.dim, out)


def extract(images: str | Path, out: str | Path, dataset: Dataset | None = None,
            config: ExtractConfig = ExtractConfig(), stats_from: str | Path | None = None,
            train_list: list[str] | None = None, quiet: bool = False, verify: bool = False,
            ids: list[str] | None = None) -> ExtractResult:
    """Extract the images of ``dataset`` (or every image under ``images``) into the
    feature store ``out``, resuming whatever an earlier run left there.

    Statistics come from the dataset's training split, else from the images named in
    ``train_list``, else from another store (``stats_from``). Without a dataset, ``ids``
    (paths relative to ``images``) chooses the images instead of all of them. A complete store is reused
    when its files are intact: sizes are checked, and with ``verify`` their sha256.
    ``quiet``: no progress and no messages (warnings still)."""
    with quieted(quiet):
        return _extract(Path(images), Path(out), dataset, config, stats_from, train_list, verify, ids)


def _extract(images: Path, out: Path, dataset: Dataset | None, config: ExtractConfig, stats_from, train_list,
             verify: bool, ids: list[str] | None) -> ExtractResult:
    _check(config)
    ids, train_ids, info = _which_images(images, dataset, ids, train_list, stats_from)
    keep_freed_memory()
    # on Ray, the actors run the CNN (on the cluster's GPUs, if any); here it only describes itself
    cnn = build_cnn(config.cnn, config.weights).to(config.device if config.ray is None else "cpu")
    # the layers must exist before an hour of forward passes
    select_layers(config.recipe.layers, [t.name for t in cnn.taps], cnn.groups)
    identity = _identity(cnn, config, ids)
    info["images_dir"] = str(images.resolve())
    info["images_dir_relative"] = relative_to(images, out)      # found again when both move together
    info["image_ids_sha256"] = identity["image_ids_sha256"]
    if config.precision != "fp32":            # absent: fp32, as every store made before the choice
        info["precision"] = config.precision
    # which images the statistics come from: a store made with other ones is re-standardised
    info["train_ids_sha256"] = None if stats_from else ids_sha(train_ids)
    assembly = {"train_ids_sha256": info["train_ids_sha256"], "recipe": config.recipe.to_dict(),
                "stats_from": str(Path(stats_from).resolve()) if stats_from else None}
    info["stats_from"] = assembly["stats_from"]
    with folder_lock(out, "a feature store"):
        todo = plan(out, identity, assembly, verify)
        if todo.action == "reuse":
            say(f"{out}: complete ({len(todo.manifest['image_ids'])} images); reusing it")
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
            say(f"{out}: {todo.reason}; re-assembling from raw.npy (no forward pass)")
        state = todo.state
        if todo.action == "forward":
            if todo.reason:
                say(f"{out}: {todo.reason}")
            state = _forward(cnn, images, ids, config, out, identity)
        if not state["image_ids"]:
            raise FnemmError(f"{images}: none of the {len(ids)} images could be read "
                             f"(e.g. {next(iter(state['skipped'].items()))}); check --images")
        manifest = assemble(out, producer_of(cnn, config.crops), state, config.recipe, train_ids,
                            Path(stats_from) if stats_from else None, info=info)
        shutil.rmtree(partial)
        return ExtractResult(out, manifest, len(state["image_ids"]), len(state["skipped"]))
