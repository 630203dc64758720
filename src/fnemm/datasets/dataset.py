"""The one ``Dataset`` type: image ids, their captions and their splits, with the ways a
study cuts it (re-splits, learning-curve subsets, a quick head)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fnemm.io.errors import FnemmError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "dev": "val", "valid": "val",
                  "validation": "val", "test": "test", "restval": "restval"}


@dataclass
class Dataset:
    name: str
    image_ids: list[str]
    captions: list[list[str]]   # captions[k] describe image_ids[k]
    splits: list[str]           # 'train' | 'val' | 'test' | 'restval', per image
    # what to do about a split the files do not have: {split: one line of advice}
    missing: dict[str, str] = field(default_factory=dict, repr=False)
    # where the photos are, when the dataset knows (the bundled benchmarks): the default --images
    images: Path | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (len(self.image_ids) == len(self.captions) == len(self.splits)):
            raise ValueError("image_ids, captions and splits must have one entry per image")

    def __repr__(self) -> str:           # not every caption, in a notebook
        return f"Dataset({self.summary()})"

    def split_indices(self, split: str) -> list[int]:
        """Positions of the images of ``split`` (MSCOCO's restval images are their own
        split: not 'train' unless :meth:`with_restval` made them so)."""
        return [k for k, s in enumerate(self.splits) if s == split]

    def with_restval(self) -> "Dataset":
        """MSCOCO's restval images as training images (113,287 in all instead of 82,783)."""
        if "restval" not in self.splits:
            return self
        return Dataset(f"{self.name}+restval", list(self.image_ids), list(self.captions),
                       ["train" if s == "restval" else s for s in self.splits], dict(self.missing), self.images)

    def subset(self, indices: list[int]) -> "Dataset":
        return Dataset(self.name, [self.image_ids[k] for k in indices],
                       [self.captions[k] for k in indices], [self.splits[k] for k in indices], dict(self.missing),
                       self.images)

    def resplit(self, seed: int) -> "Dataset":
        """The same images with the split of each drawn at random (``seed``), every split
        keeping its size; seed 0 is the dataset's own split. A re-split is a fresh draw of
        train/val/test images for studies whose differences must hold beyond one split."""
        if seed == 0:
            return self
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.splits))
        splits = [self.splits[k] for k in order]          # the same multiset, shuffled
        return Dataset(f"{self.name}#split{seed}", list(self.image_ids), list(self.captions), splits,
                       dict(self.missing), self.images)

    def with_train_size(self, n: int, seed: int = 0) -> "Dataset":
        """Only ``n`` of the training images, val and test as they are: a point of a
        learning curve. The kept images are the first ``n`` of one permutation of the
        training images drawn with ``seed``, so the sizes of one seed are nested (the
        1,000 images of a curve are among its 2,000)."""
        train = self.split_indices("train")
        if not 0 < n <= len(train):
            raise FnemmError(f"{self.name}: cannot keep {n} training images of {len(train)}")
        if n == len(train):
            return self
        order = np.random.default_rng(seed).permutation(len(train))
        drop = {train[k] for k in order[n:]}
        data = self.subset([k for k in range(len(self.image_ids)) if k not in drop])
        data.name = f"{self.name}#train{n}"
        return data

    def head(self, n: int) -> "Dataset":
        """A small version for quick runs: the first images of each split, about n in all
        (a fifth for val and for test, at least 2 each, the rest train)."""
        share = {"val": max(2, n // 5), "test": max(2, n // 5)}
        share["train"] = max(2, n - share["val"] - share["test"])
        keep = [k for s in ("train", "val", "test") for k in self.split_indices(s)[:share[s]]]
        return self.subset(sorted(keep))

    def to_jsonl(self, path: str | Path) -> Path:
        """Write as a .jsonl that ``load_dataset`` reads back (atomically)."""
        from fnemm.io.files import atomic_write_text
        atomic_write_text(path, "".join(json.dumps({"image": i, "captions": c, "split": s}) + "\n"
                                        for i, c, s in zip(self.image_ids, self.captions, self.splits)))
        return Path(path)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (*SPLITS, "restval")}
        for s in self.splits:
            out[s] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{c[s]} {s}" for s in (*SPLITS, "restval") if c[s]]
        n_caps = sum(len(x) for x in self.captions)
        return f"{self.name}: {len(self.image_ids)} images ({', '.join(parts)}), {n_caps} captions"


def _norm_split(value, where: str) -> str:
    split = _SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise FnemmError(f"{where}: unknown split {value!r}; use train, val (or dev), test or restval")
    return split


def _build(name: str, order: list[str], caps: dict[str, list[str]], split: dict[str, str],
           source: Path) -> Dataset:
    if not order:
        raise FnemmError(f"{source}: no images with captions in it; a dataset needs at least one "
                         f"(see `fnemm train --help` for the formats)")
    missing = [i for i in order if not caps.get(i)]
    if missing:
        raise FnemmError(f"{source}: image {missing[0]} has no captions "
                         f"({len(missing)} images without captions)")
    return Dataset(name, order, [caps[i] for i in order], [split[i] for i in order])
