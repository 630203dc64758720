"""A tiny CNN for extraction tests: ``--cnn tinycnn:build`` (tests/ on PYTHONPATH)."""

import numpy as np
import torch
from PIL import Image
from torch import nn

from fnemm.features.cnn import Preprocess, TappedCNN


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=4),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Sequential(nn.Linear(24, 5), nn.ReLU())

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def build(weights=None):
    torch.manual_seed(0)
    net = Tiny()
    return TappedCNN(net, ["features.1", "features.3", "fc.1"], baseline="fc.1",
                     preprocess=Preprocess.imagenet(), info={"weights": "seed 0"},
                     labels=["conv1", "conv2", "fc"])


def write_images(folder, n, seed=0, grey=(), corrupt=()):
    """n random JPEGs img000.jpg...; indices in ``grey`` saved as mode L, in
    ``corrupt`` as truncated files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n):
        name = f"img{k:03d}.jpg"
        h, w = rng.integers(40, 90, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        if k in grey:
            img = img.convert("L")
        img.save(folder / name, quality=90)
        if k in corrupt:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 3])
        names.append(name)
    return names
