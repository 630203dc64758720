"""VGG16 (configuration D, Simonyan & Zisserman 2015), the paper's CNN, in plain torch.

Module names follow torchvision's ``vgg16`` (``features.N``, ``classifier.N``), so a
torchvision state dict (``vgg16-397923af.pth``) loads as it is. Keras' HDF5 weights
(``vgg16_weights_tf_dim_ordering_tf_kernels.h5``, layers ``block1_conv1`` ... ``fc1``,
``fc2``, ``predictions``) are transposed into the same modules; they expect Caffe
preprocessing (BGR, mean pixel subtracted), torchvision's expect ImageNet mean/std.

Taps (paper-spec): the 13 conv layers after ReLU, fc6 and fc7 after ReLU:
64+64+128+128+256*3+512*6 = 4,224 conv features + 4,096 + 4,096 = 12,416.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fnemm.features.cnn import Preprocess, TappedCNN, register_cnn
from fnemm.io.errors import FnemmError
from fnemm.io.files import sha256_file

CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
KERAS_CONV = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
              "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2",
              "block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3"]
KERAS_FC = ["fc1", "fc2", "predictions"]
HOW = ("pass --weights with ImageNet VGG16 weights: torchvision's vgg16-397923af.pth or Keras' "
       "vgg16_weights_tf_dim_ordering_tf_kernels.h5")


class VGG16(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def conv_relus(self) -> list[str]:
        """Names of the ReLU after each of the 13 conv layers."""
        return [f"features.{i + 1}" for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]


TAPS_FC = ["classifier.1", "classifier.4"]       # fc6, fc7 after ReLU


LABELS = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)] + ["fc6", "fc7"]


# each block's last conv, and the fully connected layers: the ``blocks`` group
BLOCKS = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "fc6", "fc7"]


def tap_names(net: VGG16) -> list[str]:
    return net.conv_relus() + TAPS_FC


def load_torch(net: VGG16, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise FnemmError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}); {HOW}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FnemmError(f"{path}: expected a state dict; {HOW}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise FnemmError(f"{path}: not VGG16 weights ({len(missing)} tensors missing, e.g. {missing[0]!r}); {HOW}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            if k == "classifier.6.weight" or k == "classifier.6.bias":
                continue          # another number of classes: the taps stop at fc7
            raise FnemmError(f"{path}: {k} has shape {tuple(state[k].shape)}, VGG16 needs {tuple(v.shape)}; {HOW}")
    if state["classifier.6.weight"].shape != own["classifier.6.weight"].shape:
        net.classifier[6] = nn.Linear(4096, state["classifier.6.weight"].shape[0])
    net.load_state_dict({k: state[k] for k in net.state_dict()})


def _keras_layer(group, name: str, path: Path) -> list[np.ndarray]:
    if name not in group:
        raise FnemmError(f"{path}: no layer {name!r}; not Keras VGG16 weights; {HOW}")
    g = group[name]
    names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs.get("weight_names", [])]
    if names:
        return [np.asarray(g[n]) for n in names]
    arrays: list[np.ndarray] = []
    g.visititems(lambda _, obj: arrays.append(np.asarray(obj)) if hasattr(obj, "shape") else None)
    return sorted(arrays, key=lambda a: -a.ndim)      # kernel, then bias


def load_keras(net: VGG16, path: Path) -> None:
    try:
        import h5py
    except ImportError:
        raise FnemmError(f"{path}: reading Keras .h5 weights needs h5py; pip install 'fnemm[keras]'") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FnemmError(f"{path}: not a readable HDF5 file ({e}); {HOW}") from None
    with f:
        group = f["model_weights"] if "model_weights" in f else f
        for conv, name in zip(net.convs(), KERAS_CONV):
            kernel, bias = _keras_layer(group, name, path)
            if kernel.shape != (3, 3, conv.in_channels, conv.out_channels):
                raise FnemmError(f"{path}: {name} kernel has shape {kernel.shape}, VGG16 needs "
                                 f"{(3, 3, conv.in_channels, conv.out_channels)}; {HOW}")
            # Keras' convolution is a correlation too: HWIO -> OIHW, no flip.
            conv.weight.data.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.data.copy_(torch.from_numpy(bias))
        fcs = [net.classifier[0], net.classifier[3], net.classifier[6]]
        for k, (fc, name) in enumerate(zip(fcs, KERAS_FC)):
            if k == 2 and name not in group:           # no classifier: fine, the taps stop at fc7
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)
                break
            kernel, bias = _keras_layer(group, name, path)
            if k == 0 and kernel.shape == (25088, 4096):
                # Keras flattens the 7x7x512 map channels-last (h, w, c); torch flattens (c, h, w).
                kernel = kernel.reshape(7, 7, 512, 4096).transpose(2, 0, 1, 3).reshape(25088, 4096)
            if k == 2 and kernel.shape[1] != fc.out_features:
                fc = net.classifier[6] = nn.Linear(4096, kernel.shape[1])
            if kernel.shape != (fc.in_features, fc.out_features):
                raise FnemmError(f"{path}: {name} kernel has shape {kernel.shape}, VGG16 needs "
                                 f"{(fc.in_features, fc.out_features)}; {HOW}")
            fc.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            fc.bias.data.copy_(torch.from_numpy(bias))


def load_weights(net: VGG16, weights: str | Path) -> str:
    """Load a .pth/.pt (torchvision) or .h5/.hdf5 (Keras) file; returns the format name."""
    path = Path(weights)
    if not path.is_file():
        raise FnemmError(f"{path}: no such weights file; {HOW}")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        load_keras(net, path)
        return "keras"
    load_torch(net, path)
    return "torchvision"


@register_cnn("vgg16")
def build(weights: str | None) -> TappedCNN:
    """VGG16 with ImageNet weights from ``weights`` (required; ``"random"`` for speed tests)."""
    if weights is None:
        raise FnemmError(f"vgg16 has no bundled weights; {HOW}")
    if weights == "random":
        net = VGG16()
        info, preprocess = {"weights": "random", "weights_format": "random"}, Preprocess.imagenet()
    else:
        with torch.device("meta"):      # no time spent initialising 138M weights about to be replaced
            net = VGG16()
        net = net.to_empty(device="cpu")
        fmt = load_weights(net, weights)
        preprocess = Preprocess.caffe() if fmt == "keras" else Preprocess.imagenet()
        info = {"weights": str(Path(weights).resolve()), "weights_sha256": sha256_file(weights), "weights_format": fmt}
    return TappedCNN(net, tap_names(net), baseline="classifier.4", preprocess=preprocess,
                     info=info, labels=LABELS, blocks=BLOCKS)
