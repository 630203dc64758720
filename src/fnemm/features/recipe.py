"""Which layers, and which post-processing, turn a CNN's raw activations into the
image features a model trains on (pure functions; the store records the recipe).

Layers (``--layers``): a comma-separated list of items, each

    a group        all | paper | late | blocks  (every CNN defines them, see
                   ``fnemm.features.cnn.tap_groups``), or lastN% (the last N% of ``paper``)
    a tap name     e.g. Conv_1, fc7, blocks.15/project
    a glob         e.g. '*/project', 'conv5_*'
    a range        START:STOP over tap positions, Python-style (e.g. -13: or 40:52)

and an item starting with ``!`` removes what it matches: ``all,!*/depthwise`` (a spec
that starts with one removes from ``paper``: ``!*/depthwise``). The taps are used in
network order whatever the order of the items.

Post-processing (``--post``), with the mean and std of the *training* images:

    fne              the paper: z-score, then {-1, 0, 1} with the thresholds (int8)
    zscore           z-scores, clipped to +-clip
    zscore-layer-l2  z-scores, each layer's block L2-normalised
    center           x - mean: raw relative magnitudes kept
    center-layer     x - mean, each layer divided by its own RMS std: every layer
                     weighs alike, features within a layer keep their raw proportions
    layer-l2         raw activations, each layer's block L2-normalised
    l2               raw activations, the whole vector L2-normalised (the baseline's
                     treatment, on any layers)

then, optionally, ``pca`` (project on the top N principal components of the
training rows) and ``baseline`` (append the L2 baseline layer, scaled to each row's
norm of what comes before it). A global scale never matters: the image map is linear
and bias-free and its output is L2-normalised.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from fnemm.io.errors import FnemmError
from fnemm.features.fne import THRESHOLDS, discretise, l2_normalise, standardise

POSTS = ("fne", "zscore", "zscore-layer-l2", "center", "center-layer", "layer-l2", "l2")
_RANGE = re.compile(r"^(-?\d*):(-?\d*)$")
_LAST = re.compile(r"^last(\d{1,3})%$")


@dataclass(frozen=True)
class Recipe:
    layers: str = "paper"                         # --layers spec
    post: str = "fne"                             # one of POSTS
    thresholds: tuple[float, float] = THRESHOLDS  # fne only
    clip: float = 3.0                             # zscore only
    pca: int = 0                                  # > 0: that many principal components
    baseline: bool = False                        # append the L2 baseline layer

    def __post_init__(self):
        if self.post not in POSTS:
            raise FnemmError(f"--post {self.post}: expected one of {', '.join(POSTS)}")
        low, high = self.thresholds
        if not low < high:
            raise FnemmError(f"--thresholds {low},{high}: the low threshold must be below the high one")
        if self.clip <= 0 or self.pca < 0:
            raise FnemmError("--clip must be > 0 and --pca >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["thresholds"] = tuple(d.get("thresholds", THRESHOLDS))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def dtype(self) -> np.dtype:
        if self.post == "fne" and not self.pca and not self.baseline:
            return np.dtype(np.int8)
        return np.dtype(np.float32)

    def describe(self) -> str:
        text = f"layers {self.layers}, {self.post}"
        if self.post == "fne":
            text += f" {self.thresholds[0]:g}/{self.thresholds[1]:g}"
        elif self.post == "zscore":
            text += f" (clip {self.clip:g})"
        return text + (f", PCA {self.pca}" if self.pca else "") + (", + baseline" if self.baseline else "")


def select_layers(spec: str, names: list[str], groups: dict[str, list[str]]) -> list[int]:
    """Positions (network order) of the taps that ``spec`` picks; ``names`` are the tap
    labels and ``groups`` the CNN's named groups."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise FnemmError(f"--layers {spec!r}: name at least one layer or group (e.g. paper)")
    picked: set[int] = set()
    if items[0].startswith("!"):
        items.insert(0, "paper")
    position = {n: k for k, n in enumerate(names)}
    for item in items:
        drop = item.startswith("!")
        word = item[1:] if drop else item
        found = _match(word, names, groups, position)
        if not found:
            raise FnemmError(f"--layers {spec!r}: {word!r} matches no layer; groups: "
                             f"{', '.join(sorted(groups))}, lastN%; layers: {names[0]} ... {names[-1]} "
                             f"(`fnemm layers --cnn NAME` lists them)")
        picked = picked - found if drop else picked | found
    if not picked:
        raise FnemmError(f"--layers {spec!r}: nothing is left")
    return sorted(picked)


def _match(word: str, names: list[str], groups: dict[str, list[str]], position: dict[str, int]) -> set[int]:
    if word in groups:
        return {position[n] for n in groups[word]}
    if last := _LAST.match(word):
        share = int(last.group(1))
        if not 0 < share <= 100:
            raise FnemmError(f"--layers {word}: a share between 1% and 100%")
        paper = groups["paper"]
        return {position[n] for n in paper[len(paper) - math.ceil(len(paper) * share / 100):]}
    if word in position:
        return {position[word]}
    if rng := _RANGE.match(word):
        start, stop = (int(v) if v not in ("", "-") else None for v in rng.groups())
        return set(range(len(names))[slice(start, stop)])
    if any(c in word for c in "*?["):
        return {k for k, n in enumerate(names) if fnmatch.fnmatchcase(n, word)}
    return set()


def columns(taps: list[dict], picked: list[int]) -> tuple[np.ndarray, list[slice]]:
    """(raw column of every selected feature, each selected layer's slice of the result)."""
    cols, blocks, start = [], [], 0
    for k in picked:
        t = taps[k]
        cols.append(np.arange(t["start"], t["stop"]))
        width = t["stop"] - t["start"]
        blocks.append(slice(start, start + width))
        start += width
    return np.concatenate(cols), blocks


def _per_layer(x: np.ndarray, blocks: list[slice], fn) -> np.ndarray:
    for b in blocks:
        x[:, b] = fn(x[:, b])
    return x


def transform(raw: np.ndarray, mean: np.ndarray, std: np.ndarray, recipe: Recipe,
              blocks: list[slice]) -> np.ndarray:
    """Post-process the selected raw columns of some images (rows), given the training
    mean/std of those columns and each layer's slice: ``recipe`` without PCA/baseline."""
    post = recipe.post
    if post == "fne":
        return discretise(standardise(raw, mean, std), *recipe.thresholds)
    if post in ("zscore", "zscore-layer-l2"):
        z = standardise(raw, mean, std)
        if post == "zscore":
            return np.clip(z, -recipe.clip, recipe.clip, out=z)
        return _per_layer(z, blocks, l2_normalise)
    x = np.asarray(raw, np.float32)
    if post == "l2":
        return l2_normalise(x)
    if post == "layer-l2":
        return _per_layer(x.copy(), blocks, l2_normalise)
    centred = (x - mean).astype(np.float32)
    if post == "center":
        return centred
    # center-layer: each layer over the root mean square of its training stds
    for b in blocks:
        rms = float(np.sqrt(np.mean(np.square(std[b], dtype=np.float64))))
        centred[:, b] /= rms if rms > 0 else 1.0
    return centred


def finish(x: np.ndarray, recipe: Recipe, pca: tuple[np.ndarray, np.ndarray] | None,
           baseline: np.ndarray | None) -> np.ndarray:
    """PCA and the appended baseline, after :func:`transform`; the final dtype."""
    if recipe.pca:
        mean, comps = pca
        x = ((np.asarray(x, np.float64) - mean) @ comps.T).astype(np.float32)
    if recipe.baseline:
        # as long as the row before it: neither part drowns the other at the start
        x = np.asarray(x, np.float32)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.concatenate([x, norm * l2_normalise(baseline)], 1)
    return x.astype(recipe.dtype, copy=False)


@dataclass
class Encoder:
    """Raw rows -> a store's arrays, exactly as the store made them: ``fne`` (the
    recipe's features) and ``fc7`` (the baseline layer, L2-normalised)."""
    recipe: Recipe
    mean: np.ndarray                 # training mean / std of every raw column
    std: np.ndarray
    cols: np.ndarray                 # the selected layers' raw columns
    blocks: list[slice]              # each selected layer's slice of those
    baseline: slice                  # the baseline layer's raw columns
    pca: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(cls, recipe: Recipe, mean: np.ndarray, std: np.ndarray, taps: list[dict],
              groups: dict[str, list[str]], baseline: str, pca=None) -> "Encoder":
        names = [t["name"] for t in taps]
        picked = select_layers(recipe.layers, names, groups)
        cols, blocks = columns(taps, picked)
        base = taps[names.index(baseline)]
        return cls(recipe, mean, std, cols, blocks, slice(base["start"], base["stop"]), pca)

    @property
    def width(self) -> int:
        n = self.recipe.pca or len(self.cols)
        return n + (self.baseline.stop - self.baseline.start if self.recipe.baseline else 0)

    def features(self, raw: np.ndarray) -> np.ndarray:
        """Before PCA (what PCA is fitted on)."""
        raw = np.asarray(raw)
        return transform(raw[:, self.cols], self.mean[self.cols], self.std[self.cols], self.recipe, self.blocks)

    def __call__(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        raw = np.asarray(raw)
        base = raw[:, self.baseline]
        return {"fne": finish(self.features(raw), self.recipe, self.pca, base),
                "fc7": l2_normalise(base)}


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
    precision: str = "fp32"           # the CNN in fp32, or bf16 (autocast; codes checked in bench/extract_speed.py)
    ray: str | None = None            # the forward pass on Ray: a cluster address, "" for this machine
    ray_actors: int = 0               # CNN actors on Ray (0: one per GPU, else half the CPUs)
