"""The forward pass of ``fnemm extract`` on a Ray cluster (``--ray [ADDRESS]``).

The work is the local run's, cut the same way: each still-missing chunk's batches
(``--batch-size`` images each) become rows of a Ray Data pipeline::

    batch rows -> decode + resize (CPU tasks) -> CNN actors (the crops cut there; the model
    loaded once per actor; one GPU each where the cluster has GPUs) -> back to this process

and this process commits every chunk as its last batch arrives (rows carry their
chunk, batch and image indices: Ray does not keep order), with the same files the
local run writes, so resuming, the assembly and the manifest are unchanged and the
store is byte-identical to a local run's. Only this process writes: the store
needs to be on a filesystem this machine sees; the workers need the images (the
same paths on every node: a shared filesystem) and fnemm installed.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from fnemm.io.errors import FnemmError
from fnemm.io.progress import bar as progress_bar


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode(row: dict) -> dict:
    """A batch row's images read and resized (a CPU task); the actors cut the crops."""
    from fnemm.features.images import read_image
    paths = json.loads(row["paths"])
    good, images, why, modes = [], [], {}, {}
    for k, p in zip(json.loads(row["index"]), paths):
        pixels, reason, mode = read_image(Path(p) if p else None)
        if reason is not None:
            why[k] = reason
            continue
        good.append(k)
        images.append(pixels)
        if mode is not None:
            modes[k] = mode
    stacked = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return {"chunk": row["chunk"], "batch": row["batch"], "images": _npy(stacked),
            "meta": json.dumps({"good": good, "skipped": why, "converted": modes})}


class CNNWorker:
    """One CNN per actor, loaded once: crops in, crop-averaged raw activations out."""

    def __init__(self, cnn: str, weights: str | None, crops: int, device: str, threads: int, precision: str):
        import torch
        from fnemm.features.cnn import build_cnn
        from fnemm.features.images import keep_freed_memory
        torch.set_num_threads(threads)
        keep_freed_memory()
        self.cnn = build_cnn(cnn, weights).to(device)
        self.crops, self.device, self.precision = crops, device, precision

    def __call__(self, batch: dict) -> dict:
        from fnemm.features.cnn import check_finite
        from fnemm.features.images import forward_images
        raws = []
        for data in batch["images"]:
            images = _array(bytes(data))
            if len(images):
                out = forward_images(self.cnn, images, self.crops, self.device, self.precision)
                check_finite(out, "an image of this batch")
                raws.append(_npy(out.astype(np.float16)))
            else:
                raws.append(_npy(np.zeros((0, self.cnn.dim), np.float16)))
        return {"chunk": batch["chunk"], "batch": batch["batch"], "raw": np.array(raws, dtype=object),
                "meta": batch["meta"]}


def connect(address: str | None):
    """ray, connected: to ``address`` (a cluster), or a cluster on this machine."""
    try:
        import ray
    except ImportError:
        raise FnemmError("--ray needs Ray: pip install 'fnemm[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, logging_level=logging.ERROR, log_to_driver=False,
                     include_dashboard=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise FnemmError(f"--ray {address or ''}: cannot reach a Ray cluster ({str(e).splitlines()[0][:160]})"
                             ) from None
    from ray.data import DataContext
    context = DataContext.get_current()
    context.enable_progress_bars = False           # ours counts images, not blocks
    context.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return ray


def run_chunks_ray(config, paths: list[Path | None], ids: list[str], partial: Path, dim: int,
                   commit) -> None:
    """The missing chunks of ``partial`` on Ray; ``commit(chunk, rows, kept, skipped, converted)``
    writes each one (extraction's own writer)."""
    ray = connect(config.ray or None)
    n, size = len(ids), config.chunk_size
    chunks = [range(c * size, min((c + 1) * size, n)) for c in range((n + size - 1) // size)]
    todo = [c for c in range(len(chunks)) if not (partial / f"chunk-{c:05d}.json").exists()]
    rows, batches_of = [], {}
    for c in todo:
        r = chunks[c]
        starts = range(0, len(r), config.batch_size)
        batches_of[c] = len(starts)
        for b, s in enumerate(starts):
            index = list(r[s:s + config.batch_size])
            rows.append({"chunk": c, "batch": b, "index": json.dumps(index),
                         "paths": json.dumps([str(paths[k]) if paths[k] else None for k in index])})
    if not rows:
        return
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if config.device != "cpu" else 0
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        actors, device, per = config.ray_actors or gpus, "cuda", {"num_gpus": 1, "max_restarts": 0}
        threads = 1
    else:
        actors = config.ray_actors or max(1, cpus // 2)      # the other half decodes
        device, per, threads = "cpu", {"num_cpus": 1, "max_restarts": 0}, 1
    from ray import data as rd
    ds = rd.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(_decode, num_cpus=1)
    # on GPUs the actors' resources differ from the decoding tasks', so Ray keeps them apart
    # (decoding on the CPUs, the GPUs only convolve); on CPUs it fuses both into the actors
    with warnings.catch_warnings():      # max_restarts=0 (a dead actor fails the run, which resumes) is a
        warnings.simplefilter("ignore")  # "ray_remote_args" and deprecated as such; without it Ray logs an error
        ds = ds.map_batches(CNNWorker, batch_size=1, batch_format="numpy", compute=rd.ActorPoolStrategy(size=actors),
                            **per, fn_constructor_kwargs={"cnn": config.cnn, "weights": config.weights,
                                                          "crops": config.crops, "device": device, "threads": threads,
                                                          "precision": config.precision})
    waiting: dict[int, dict[int, tuple[np.ndarray, dict]]] = {c: {} for c in todo}
    done_images = n - sum(len(chunks[c]) for c in todo)
    bar = progress_bar(total=n, initial=done_images, unit="img", desc="extract (ray)", smoothing=0.1)
    with bar:
        for row in ds.iter_rows():
            c, b = int(row["chunk"]), int(row["batch"])
            meta = json.loads(row["meta"])
            waiting[c][b] = (_array(bytes(row["raw"])), meta)
            bar.update(len(meta["good"]) + len(meta["skipped"]))
            if len(waiting[c]) == batches_of[c]:
                parts = [waiting[c][k] for k in range(batches_of[c])]
                kept = [ids[k] for _, m in parts for k in m["good"]]
                skipped = {ids[int(k)]: v for _, m in parts for k, v in m["skipped"].items()}
                converted = {ids[int(k)]: v for _, m in parts for k, v in m["converted"].items()}
                commit(c, [a for a, _ in parts if len(a)], kept, skipped, converted)
                del waiting[c]
    if waiting:
        raise FnemmError(f"Ray returned no result for chunk(s) {sorted(waiting)[:5]}; run the same command again "
                         f"(finished chunks are kept)")
