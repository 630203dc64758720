"""A stand-in CNN for benchmarks of everything around the forward pass (bench/memory_growth.py).

It has a real CNN's tap layout (the same tap labels, widths, classifier and blocks, so the
same FNE recipes, groups and feature dimensions: 18,057 raw / 17,056 FNE for MobileNetV2)
and a near-free forward: each tap is a linear map of the image's mean colour. The layout
is read from the JSON file named by $FNEMM_STANDIN_LAYOUT (``write_layout`` makes it from
the real CNN), so ``fnemm extract --cnn standin_cnn:build`` runs in a fresh process with
bench/ on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from fnemm.features.cnn import Preprocess, TappedCNN, build_cnn

LAYOUT_ENV = "FNEMM_STANDIN_LAYOUT"


def write_layout(cnn: str, path: Path) -> dict:
    """The tap layout of a real registered CNN, as JSON."""
    real = build_cnn(cnn)
    layout = {"cnn": cnn, "labels": [t.name for t in real.taps], "channels": [t.channels for t in real.taps],
              "baseline": real.baseline.name,
              "classifier": next((t for t in real.groups["all"] if t not in real.groups["paper"]), None),
              "blocks": list(real.groups.get("blocks", [])), "preprocess": real.preprocess.to_dict(),
              "input_size": real.input_size}
    Path(path).write_text(json.dumps(layout))
    return layout


class _Taps(nn.Module):
    def __init__(self, channels: list[int]):
        super().__init__()
        self.taps = nn.ModuleList(nn.Linear(3, c) for c in channels)
        gen = torch.Generator().manual_seed(0)
        for lin in self.taps:
            nn.init.normal_(lin.weight, generator=gen)
            nn.init.normal_(lin.bias, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.mean((2, 3))
        out = colour
        for lin in self.taps:
            out = lin(colour)
        return out


def build(weights: str | None = None) -> TappedCNN:
    layout = json.loads(Path(os.environ[LAYOUT_ENV]).read_text())
    net = _Taps(layout["channels"])
    names = [f"taps.{k}" for k in range(len(layout["channels"]))]
    labels = layout["labels"]
    baseline = names[labels.index(layout["baseline"])]
    return TappedCNN(net, names, baseline, Preprocess(**layout["preprocess"]), layout["input_size"],
                     info={"weights": f"stand-in for {layout['cnn']}"}, labels=labels,
                     classifier=layout["classifier"], blocks=layout["blocks"])
