"""MobileNetV2 with real ImageNet weights, read from the bundled TensorFlow Lite file.

``../shared/data/models/mobilenet_v2_1.0_224_quant.tflite`` (8-bit, 1,001 classes,
index 0 = background) is dequantised into a float torch network (fnemm.features.cnn.tflite)
and checked against the reference interpreter (ai-edge-litert) in the tests.

Taps: the output of every convolution (after its fused ReLU6, if any): 36 CONV_2D
and 17 DEPTHWISE_CONV_2D = 53 layers, 18,057 features, the last being the 1x1
classifier conv (the 1,001 logits). Baseline ("FC7" for this network): the last
conv layer before the classifier, ``Conv_1``, pooled (1,280-d), which is exactly the
network's own global-average-pooled feature.
"""

from __future__ import annotations

from pathlib import Path

from fnemm.features.cnn import Preprocess, TappedCNN, register_cnn
from fnemm.features.cnn.tflite import TFLiteNet
from fnemm.io.errors import FnemmError
from fnemm.io.files import sha256_file
from fnemm.io.paths import find_data

FILENAME = "mobilenet_v2_1.0_224_quant.tflite"


def default_weights() -> Path | None:
    """$FNEMM_DATA/models/..., else ../shared/data/models/... beside the working or source tree."""
    return find_data(f"models/{FILENAME}")


def tapped(path: str | Path, quant: str = "fake") -> TappedCNN:
    """Any MobileNet-style classifier .tflite as a TappedCNN (every conv output tapped)."""
    net = TFLiteNet(path, quant=quant)
    convs = [i for i, k in enumerate(net.kinds) if k in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    if not convs:
        raise FnemmError(f"{path}: no convolutions in this model")
    pools = [i for i, k in enumerate(net.kinds) if k in ("AVERAGE_POOL_2D", "MEAN")]
    producer = {out: i for i, (_, out) in enumerate(net.wiring)}
    baseline = producer.get(net.wiring[pools[0]][0][0]) if pools else None
    if baseline not in convs:
        baseline = convs[-1]
    scale, zero_point = net.input_quant[:2] if net.input_quant else (1 / 127.5, 127.5)
    preprocess = Preprocess((zero_point,) * 3, (1 / scale,) * 3)
    info = {"weights": str(Path(path).resolve()), "weights_sha256": sha256_file(path),
            "weights_format": "tflite", "quant": quant}
    labels = [net.labels[i] for i in convs]
    # the classifier: a conv after the baseline's pooling (MobileNet's 1x1 logits conv)
    classifier = labels[-1] if convs[-1] != baseline else None
    # block ends: the first conv (stem), each projection, and the baseline conv
    blocks = [labels[0]] + [n for n in labels if n.endswith("/project")] + [net.labels[baseline]]
    return TappedCNN(net, [f"outputs.{i}" for i in convs], baseline=f"outputs.{baseline}",
                     preprocess=preprocess, input_size=net.input_size, info=info,
                     labels=labels, classifier=classifier, blocks=blocks)


def _path(weights: str | None) -> Path:
    path = Path(weights) if weights else default_weights()
    if path is None:
        raise FnemmError(f"mobilenet_v2: {FILENAME} not found in $FNEMM_DATA/models or ../shared/data/models; "
                         f"pass --weights PATH/{FILENAME}")
    return path


@register_cnn("mobilenet_v2")
def build(weights: str | None) -> TappedCNN:
    """Every activation on the uint8 grid of the integer runtime (as trained and shipped)."""
    return tapped(_path(weights), quant="fake")


@register_cnn("mobilenet_v2_float")
def build_float(weights: str | None) -> TappedCNN:
    """The same weights as a plain float network: ~20% faster, slightly further from LiteRT."""
    return tapped(_path(weights), quant="none")
