"""Evaluation of a trained model on a split: the paper's protocols over fnemm.eval.metrics.

Protocols: 'all' (every image of the split, e.g. the 1K Flickr test), '1k' (the first
1,000: the paper's MSCOCO protocol, the authors' ``test_subset 1k``), '5fold' (mean over
5 folds of 1,000, MSCOCO's usual extra), '5k' (all 5,000), 'auto' (all; on a split of
5,000 images, as MSCOCO's, the paper's 1k). Several: comma-separated, e.g. '1k,5fold,5k'.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from fnemm.joint.checkpoint import listed_images, open_model, unfinished
from fnemm.joint.inputs import embed_captions, embed_images, split_data
from fnemm.datasets import Dataset
from fnemm.io.errors import FnemmError
from fnemm.features.store import Features
from fnemm.eval import PROTOCOLS
from fnemm.eval.metrics import evaluate_embeddings, metrics_from_ranks
from fnemm.eval.metrics import ranks as query_ranks



def evaluate(checkpoint: str | Path, dataset: Dataset, features: Features | str | Path,
             split: str = "test", protocol: str = "auto", device: str = "cpu",
             ids: str | Path | None = None, ranks: dict | None = None) -> dict[str, dict[str, float]]:
    """Recall@K and ranks of a trained model on ``split``: {protocol: metrics}, the
    protocols named 'all', '1k', '5fold'; each metrics dict also says how many ``images``
    (and ``captions``), and, when the checkpoint lists its training images, how many of the
    images it ranked are among them (``seen_in_training``: 0 for a held-out split; warned),
    and of those whose validation rsum chose it (``seen_in_validation``: all of them for
    ``split="val"``, whose recalls are then optimistic; warned);
    ``unfinished`` (True) when the run has not trained to its end (warned).
    A ``ranks`` dict, when given, receives the whole split's per-query ranks: 'images'
    (ids), 'i2t' (per image), 't2i' (per caption), 'caption_image' (each caption's image).

    ``features`` is loaded Features, or a path (store folder or .npy with ``ids``)
    read with the feature kind the checkpoint was trained on."""
    asked = [p.strip() for p in protocol.split(",") if p.strip()]
    if not asked or any(p not in PROTOCOLS for p in asked):
        raise FnemmError(f"--protocol {protocol}: expected one or more of {', '.join(PROTOCOLS)} (comma-separated)")
    opened = open_model(checkpoint, features, device, ids)
    model, config, device = opened.model, opened.config, opened.device
    data = split_data(dataset, opened.features, opened.vocab, split)
    seen = trained_on(opened.checkpoint, data.image_ids, opened.path, split)
    early = {"unfinished": True} if unfinished(opened.path) else {}     # a run still training, or stopped
    if early:
        warnings.warn(f"{opened.path.parent}: has not trained to its end (its run.json says so: still running, or "
                      f"stopped; `fnemm train --out {opened.path.parent} --resume` finishes it): these are the "
                      f"recalls of its best model so far", stacklevel=2)
    captions, owner = data.eval_captions(config.eval_captions)
    # on a CPU the split's embeddings live in scratch files' pages (4 KB an image and a
    # caption at 1,024-d: 2.7 GB for MSCOCO's training split), not the process's memory
    img = embed_images(model, data.features, device, mapped=True)
    cap = embed_captions(model, captions, device, mapped=True)
    sim = config.model.similarity
    n = len(data)
    warn_small(n, split)
    names = {"auto": "1k" if n == 5000 else "all", "5k": "all"}
    wanted = list(dict.fromkeys(names.get(p, p) for p in asked))
    results = {}
    for name in wanted:
        if name == "all":
            i2t, t2i = query_ranks(img, cap, owner, sim)
            results["all"] = {**metrics_from_ranks(i2t, t2i), "images": n, "captions": len(owner), **seen(n)}
            if ranks is not None:
                ranks.update(images=list(data.image_ids), i2t=i2t.tolist(), t2i=t2i.tolist(),
                              caption_image=owner.tolist())
        elif name == "1k":
            if n < 1000:
                raise FnemmError(f"--protocol 1k needs >= 1000 {split} images; this split has {n}")
            keep = owner < 1000
            results["1k"] = {**evaluate_embeddings(img[:1000], cap[keep], owner[keep], sim), "images": 1000,
                             "captions": int(keep.sum()), **seen(1000)}
        else:
            if n % 5:
                raise FnemmError(f"--protocol 5fold needs a multiple of 5 {split} images; this split has {n}")
            if n != 5000:
                warnings.warn(f"5fold on {n} images ranks among folds of {n // 5}, not MSCOCO's 1,000: "
                              f"its recalls are higher and not comparable", stacklevel=2)
            results["5fold"] = {**evaluate_embeddings(img, cap, owner, sim, folds=5), "images": n // 5,
                                "captions": len(owner) // 5, **seen(n)}
    return {name: {**m, **early} for name, m in results.items()}


SEEN = {"train_images": ("seen_in_training", "it was trained on: these recalls are not held-out (evaluate "
                                              "it on images it did not train on)"),
        "val_images": ("seen_in_validation", "whose validation rsum chose it (its best epoch): these recalls "
                                             "are optimistic, the best of its epochs on them (the test split "
                                             "is the held-out one)")}


def trained_on(ckpt: dict, image_ids: list[str], path: Path, split: str):
    """``seen(k)``: how many of the first k images the model learnt from
    ({"seen_in_training": n}) and how many chose its best epoch ({"seen_in_validation": n}),
    each left out for a checkpoint that does not list them (made before checkpoints did);
    warns when the split holds any."""
    flags = {}
    for key, (name, why) in SEEN.items():
        listed = listed_images(ckpt, path, key)
        if listed is None:
            continue
        known = set(listed)
        flags[name] = [i in known for i in image_ids]
        if any(flags[name]):
            warnings.warn(f"{path}: {sum(flags[name])} of the {len(image_ids)} {split} images are among the "
                          f"{len(known)} {why}", stacklevel=3)
    return lambda k: {name: sum(f[:k]) for name, f in flags.items()}


SMALL_SPLIT = 50


def warn_small(n: int, split: str) -> None:
    """Say when a split is too small for its recalls to mean much."""
    if n >= SMALL_SPLIT:
        return
    trivial = " and R@10 is 100% by construction" if n <= 10 else ""
    warnings.warn(f"only {n} {split} images: one image moves R@1 by {100 / n:.0f} points{trivial}; "
                  f"take these recalls as rough (the paper's test sets have 1,000)", stacklevel=2)
