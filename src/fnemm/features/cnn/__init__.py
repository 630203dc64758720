"""Pretrained CNNs in plain torch, each exposing named layer outputs ("taps").

A CNN is registered by name with a builder ``builder(weights: str | None) -> TappedCNN``.
A :class:`TappedCNN` wraps any ``nn.Module``: forward hooks on the tapped
sub-modules collect their outputs, conv maps are averaged over space (one value
per channel, the Full-Network Embedding's pooling) and everything is concatenated
in tap order, so one forward pass gives every tap of every crop.

Adding your own CNN::

    from fnemm.features.cnn import TappedCNN, Preprocess, register_cnn

    @register_cnn("resnet18")
    def build(weights):
        net = MyResNet18(); net.load_state_dict(torch.load(weights))
        return TappedCNN(net, taps=["layer1", "layer2", "layer3", "layer4", "fc"],
                         baseline="layer4", preprocess=Preprocess.imagenet())

or pass ``--cnn mypackage.module:build`` to ``fnemm extract`` without registering.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from fnemm.io.errors import FnemmError


@dataclass(frozen=True)
class Preprocess:
    """uint8 RGB pixels -> network input: ``((pixels * scale) - mean) / std`` per channel,
    channels in RGB order, or BGR when ``bgr`` (Caffe/Keras weights)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0
    bgr: bool = False

    @classmethod
    def imagenet(cls) -> "Preprocess":          # torchvision weights
        return cls((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255)

    @classmethod
    def caffe(cls) -> "Preprocess":             # Keras / Caffe VGG weights: BGR, mean pixel only
        return cls((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), 1.0, bgr=True)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32."""
        x = pixels.permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * self.scale - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tap:
    name: str
    kind: str          # 'conv' (spatially averaged) or 'fc'
    channels: int
    start: int         # column slice of the tap in the concatenated feature vector
    stop: int


class TappedCNN(nn.Module):
    """A CNN whose forward returns the pooled outputs of its taps, concatenated.

    ``net``: any module taking (B, 3, input_size, input_size) float input.
    ``taps``: names of sub-modules (``net.get_submodule``) whose outputs are features,
    in feature order. 4-D outputs are averaged over space, 2-D ones taken as they are.
    ``baseline``: the tap used for the single-layer baseline ("FC7").
    ``labels``: readable tap names for the manifest (default: the module names).
    ``classifier``: the label of the tap that is the class scores (left out of the
    ``paper`` group, as the paper leaves out VGG16's fc8); ``blocks``: labels of the
    taps that end a block (the ``blocks`` group). See :attr:`groups`.
    """

    def __init__(self, net: nn.Module, taps: list[str], baseline: str, preprocess: Preprocess,
                 input_size: int = 224, info: dict | None = None, labels: list[str] | None = None,
                 classifier: str | None = None, blocks: list[str] | None = None):
        super().__init__()
        self.net = net.eval()
        self.preprocess = preprocess
        self.input_size = input_size
        self.info = dict(info or {})         # what produced it: weights path, sha256, format...
        if baseline not in taps:
            raise FnemmError(f"baseline tap {baseline!r} is not one of the taps")
        self._outputs: list[torch.Tensor] = []
        self._hooks = []
        for name in taps:
            try:
                module = net.get_submodule(name)
            except AttributeError:
                raise FnemmError(f"tap {name!r}: the network has no such sub-module") from None
            self._hooks.append(module.register_forward_hook(self._hook))
        self.tap_modules = list(taps)        # the sub-module of each tap, in tap order
        self.taps = self._describe(taps, labels or taps)
        self.baseline = self.taps[taps.index(baseline)]
        self.groups = tap_groups([t.name for t in self.taps], classifier, blocks, self.baseline.name)
        for p in self.parameters():
            p.requires_grad_(False)

    def _hook(self, module, inputs, output):
        # Pool at once: the full maps of early layers are large, their means are not.
        self._outputs.append(output.mean((2, 3)) if output.dim() == 4 else output.flatten(1))

    def _describe(self, names: list[str], labels: list[str]) -> list[Tap]:
        with torch.no_grad():
            x = torch.zeros(1, 3, self.input_size, self.input_size)
            kinds = []
            self._outputs = []
            handles = [self.net.get_submodule(n).register_forward_hook(
                lambda m, i, o: kinds.append("conv" if o.dim() == 4 else "fc")) for n in names]
            try:
                self.net(x)
            finally:
                for h in handles:
                    h.remove()
            widths = [o.shape[1] for o in self._outputs]
            self._outputs = []
        if len(widths) != len(names):
            raise FnemmError(f"{len(names)} taps but {len(widths)} outputs in a forward pass: "
                             f"each tapped module must run exactly once")
        taps, start = [], 0
        for name, kind, width in zip(labels, kinds, widths):
            taps.append(Tap(name, kind, int(width), start, start + int(width)))
            start += int(width)
        return taps

    def untap(self) -> nn.Module:
        """The bare network, hooks removed (this object no longer extracts): for benchmarks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.net

    @property
    def dim(self) -> int:
        return self.taps[-1].stop

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 crops -> (B, dim) float32 pooled tap outputs."""
        self._outputs = []
        try:
            self.net(self.preprocess(pixels))
            return torch.cat([o.float() for o in self._outputs], 1)
        finally:
            self._outputs = []


def tap_groups(labels: list[str], classifier: str | None = None, blocks: list[str] | None = None,
               baseline: str | None = None) -> dict[str, list[str]]:
    """The named layer groups of a CNN's taps (``--layers GROUP``):

    ``all``      every tap;
    ``paper``    every tap but the classifier's scores (the paper taps VGG16's 13 conv
                 layers, fc6 and fc7, not fc8);
    ``late``     the last quarter of ``paper`` (the late layers the FNE literature
                 finds most useful for retrieval);
    ``blocks``   the taps that end a block (VGG16: each block's last conv, fc6, fc7;
                 MobileNetV2 / EfficientNet: stem, every projection, the last conv);
    ``baseline`` the baseline layer alone (the "FC7" of the paper's baseline).
    """
    for name in [classifier, baseline, *(blocks or [])]:
        if name is not None and name not in labels:
            raise FnemmError(f"layer group: {name!r} is not one of the taps")
    paper = [t for t in labels if t != classifier]
    late = paper[len(paper) - math.ceil(len(paper) / 4):]
    groups = {"all": list(labels), "paper": paper, "late": late,
              "blocks": [t for t in labels if t in set(blocks)] if blocks else paper}
    if baseline is not None:
        groups["baseline"] = [baseline]
    return groups


Builder = Callable[[str | None], TappedCNN]
_REGISTRY: dict[str, Builder] = {}


def register_cnn(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder
    return wrap


def cnn_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    from fnemm.features.cnn import efficientnet_lite, mobilenet_v2, vgg16  # noqa: F401  (they register themselves)


def build_cnn(name: str, weights: str | None = None) -> TappedCNN:
    """A registered CNN by name, or ``package.module:function`` for a user's own builder."""
    _load_builtins()
    if name in _REGISTRY:
        builder = _REGISTRY[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise FnemmError(f"--cnn {name}: cannot import the builder ({e})") from None
    else:
        import difflib
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise FnemmError(f"--cnn {name}: unknown CNN; {hint}choose one of {', '.join(sorted(_REGISTRY))} "
                         f"or give package.module:function")
    from fnemm.features.cnn import finetuned
    if weights and weights != "random" and finetuned.is_finetuned(weights):
        cnn = finetuned.load(name, weights, builder)      # RUN/cnn.pt of `fnemm train --finetune`
    else:
        cnn = builder(weights)
    if not isinstance(cnn, TappedCNN):
        raise FnemmError(f"--cnn {name}: the builder must return a fnemm.features.cnn.TappedCNN")
    cnn.info.setdefault("cnn", name)
    return cnn


def check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise FnemmError(f"{what}: non-finite activations (inf/nan); the weights file may be corrupt")
