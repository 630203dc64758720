"""A small synthetic image-caption dataset that a model can really learn.

Every image has three attributes (colour, animal, action). Its "features" are a
fixed random projection of the attributes' one-hot codes plus noise; its
captions name the attributes among filler words, in varied templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = ["red", "blue", "green", "black", "white", "brown", "yellow", "grey"]
ANIMALS = ["dog", "cat", "horse", "bird", "cow", "goat", "sheep", "duck"]
ACTIONS = ["running", "sleeping", "jumping", "eating", "swimming", "sitting", "playing", "walking"]
TEMPLATES = [
    "a {c} {a} is {v} .",
    "the {c} {a} {v} on the grass",
    "{v} , a {c} {a} .",
    "there is a {a} , {c} , {v} outside .",
    "A {c} {a} {v} near a tree !",
]


def make(n_images: int = 600, dim: int = 48, noise: float = 0.3, seed: int = 0,
         splits=(0.7, 0.15, 0.15)):
    """(records, features, ids): JSONL-style records, an (n, dim) float32 array, ids."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(24, dim)).astype(np.float32)
    attrs = rng.integers(0, 8, size=(n_images, 3))
    onehot = np.zeros((n_images, 24), np.float32)
    onehot[np.arange(n_images), attrs[:, 0]] = 1
    onehot[np.arange(n_images), 8 + attrs[:, 1]] = 1
    onehot[np.arange(n_images), 16 + attrs[:, 2]] = 1
    feats = onehot @ proj + noise * rng.normal(size=(n_images, dim)).astype(np.float32)
    n_train = int(splits[0] * n_images)
    n_val = int(splits[1] * n_images)
    records, ids = [], []
    for k in range(n_images):
        c, a, v = COLOURS[attrs[k, 0]], ANIMALS[attrs[k, 1]], ACTIONS[attrs[k, 2]]
        caps = [t.format(c=c, a=a, v=v) for t in TEMPLATES]
        split = "train" if k < n_train else "val" if k < n_train + n_val else "test"
        ids.append(f"img{k:05d}.jpg")
        records.append({"image": ids[-1], "captions": caps, "split": split})
    return records, feats.astype(np.float32), ids


def write(folder: Path, **kwargs) -> tuple[Path, Path, Path]:
    """Writes data.jsonl, feats.npy and feats.ids.txt into ``folder``."""
    records, feats, ids = make(**kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    npy = folder / "feats.npy"
    np.save(npy, feats)
    ids_path = folder / "feats.ids.txt"
    ids_path.write_text("\n".join(ids) + "\n")
    return jsonl, npy, ids_path


def gallery(n_images: int, dim: int = 48, noise: float = 0.3, seed: int = 1, proj_seed: int = 0):
    """(features, attrs) of ``n_images`` more images drawn like ``make(dim=dim, seed=proj_seed)``'s
    (same projection, so a model trained on those embeds these), e.g. a large search gallery."""
    proj = np.random.default_rng(proj_seed).normal(size=(24, dim)).astype(np.float32)   # make()'s first draw
    rng = np.random.default_rng(seed)
    attrs = rng.integers(0, 8, size=(n_images, 3))
    feats = proj[attrs[:, 0]] + proj[8 + attrs[:, 1]] + proj[16 + attrs[:, 2]]
    feats += noise * rng.normal(size=(n_images, dim)).astype(np.float32)
    return feats.astype(np.float32), attrs


def captions(n: int, seed: int = 2) -> list[str]:
    """``n`` captions of random attributes, in the dataset's templates (search queries)."""
    rng = np.random.default_rng(seed)
    return [TEMPLATES[rng.integers(len(TEMPLATES))].format(c=COLOURS[rng.integers(8)], a=ANIMALS[rng.integers(8)],
                                                           v=ACTIONS[rng.integers(8)]) for _ in range(n)]
