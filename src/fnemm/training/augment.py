"""Photos for training on pixels (fine-tuning): decoded once as extraction resizes them,
torchvision-style random-resized crops and flips from a seeded RNG, extraction's eval crops."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fnemm.features.fne import CROP, RESIZE, crops, resized

CACHE_BYTES = int(float(os.environ.get("FNEMM_IMAGE_CACHE_GB", "4")) * 2**30)   # decoded images kept in memory


def random_resized_crop(rng: np.random.Generator, size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of a random crop of a size x size image, as
    torchvision's RandomResizedCrop (10 tries, then the centre) + RandomHorizontalFlip."""
    area = size * size
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            return top, left, h, w, bool(rng.random() < 0.5)
    return 0, 0, size, size, bool(rng.random() < 0.5)


def apply_crop(image: np.ndarray, box: tuple[int, int, int, int, bool], out: int = CROP) -> np.ndarray:
    top, left, h, w, flip = box
    patch = Image.fromarray(image[top:top + h, left:left + w]).resize((out, out), Image.BILINEAR)
    a = np.asarray(patch)
    return a[:, ::-1] if flip else a


class ImageBank:
    """The photos of one split, as extraction resizes them (RGB, 256 x 256 uint8),
    decoded on first use and kept in memory up to a budget (FNEMM_IMAGE_CACHE_GB, 4)."""

    def __init__(self, paths: list[Path], workers: int = 4):
        self.paths = paths
        self._cache: dict[int, np.ndarray] = {}
        self._budget = CACHE_BYTES
        self._pool = ThreadPoolExecutor(max(1, workers))

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, k: int) -> np.ndarray:
        if k in self._cache:
            return self._cache[k]
        with Image.open(self.paths[k]) as img:
            a = np.asarray(resized(img, RESIZE))
        if self._budget >= a.nbytes:
            self._cache[k] = a
            self._budget -= a.nbytes
        return a

    def images(self, idx) -> list[np.ndarray]:
        return list(self._pool.map(self._load, [int(k) for k in idx]))

    def augmented(self, idx, boxes) -> np.ndarray:
        """(len(idx), 224, 224, 3) uint8: image idx[j] cropped and flipped by boxes[j]."""
        return np.stack(list(self._pool.map(lambda a_b: apply_crop(*a_b), zip(self.images(idx), boxes))))

    def eval_crops(self, n_crops: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The crops extraction takes, images ``start:stop`` in order: (n * n_crops, 224, 224, 3)."""
        ks = range(start, len(self) if stop is None else stop)
        return np.concatenate([crops(Image.fromarray(a), n_crops) for a in self.images(ks)])


def readable(paths: list[Path | None]) -> tuple[list[int], dict[int, str]]:
    """(indices of images that open, {index: why not} for the others)."""
    ok, bad = [], {}
    for k, p in enumerate(paths):
        if p is None:
            bad[k] = "missing: no such file under the images folder"
            continue
        try:
            with Image.open(p) as img:
                img.verify()
            ok.append(k)
        except Exception as e:  # noqa: BLE001 (PIL raises many kinds for a corrupt file)
            bad[k] = f"unreadable: {type(e).__name__}"
    return ok, bad
