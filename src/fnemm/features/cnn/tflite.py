"""A TensorFlow Lite image classifier as a float torch module.

Parses the .tflite flatbuffer (the ``tflite`` package's generated reader),
dequantises every weight (``real = scale * (q - zero_point)``, per tensor or per
channel; int32 biases with their own scale) and replays the operator list in
NCHW float32. Covered: CONV_2D, DEPTHWISE_CONV_2D, ADD, AVERAGE_POOL_2D, MEAN,
RESHAPE (to 2-D), SOFTMAX, QUANTIZE/DEQUANTIZE — what MobileNet-style classifiers
use. Anything else is a clear error naming the operator.

``quant`` chooses how closely to follow the integer runtime:
  - ``"fake"`` (default): after every operator, round to the tensor's uint8/int8 grid
    and clamp to its range, exactly the values the quantised network was trained
    (and is run) with; cheap next to the convolutions.
  - ``"none"``: the plain float network with dequantised weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fnemm.io.errors import FnemmError

DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8, 7: np.int16}
QRANGE = {3: (0, 255), 9: (-128, 127), 7: (-32768, 32767)}
FRESH_OUTPUT = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "AVERAGE_POOL_2D", "MEAN", "SOFTMAX"}  # not views
ACTIVATIONS = {0: None, 1: (0.0, float("inf")), 2: (-1.0, 1.0), 3: (0.0, 6.0)}   # NONE, RELU, RELU_N1_TO_1, RELU6


def _tflite():
    try:
        import tflite
    except ImportError:
        raise FnemmError("reading .tflite models needs the 'tflite' package; pip install tflite") from None
    return tflite


def _same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding: total pad split with the extra pixel at the end."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int], act):
        super().__init__()
        self.conv, self.pad, self.act = conv, pad, act

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad)
        return _activate(self.conv(x), self.act)


class Add(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, a, b):
        return _activate(a + b, self.act)


class AvgPool(nn.Module):
    def __init__(self, kernel, stride, pad, act):
        super().__init__()
        self.kernel, self.stride, self.pad, self.act = kernel, stride, pad, act

    def forward(self, x):
        if any(self.pad):    # TF averages over the valid pixels only
            x = F.pad(x, self.pad)
        return _activate(F.avg_pool2d(x, self.kernel, self.stride), self.act)


class Mean(nn.Module):
    def __init__(self, dims: tuple[int, ...], keep: bool):
        super().__init__()
        self.dims, self.keep = dims, keep

    def forward(self, x):
        return x.mean(self.dims, keepdim=self.keep)


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class Softmax(nn.Module):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return torch.softmax(self.beta * x, dim=1)


def _activate(x, act):
    return x if act is None else x.clamp_(*act)      # x is the op's own fresh output


class FakeQuant(nn.Module):
    """Round to a tensor's integer grid and clamp to its range, in float.

    Memory-bound, so in place when the operator's output is its own fresh tensor
    (torch's fused fake_quantize_per_tensor_affine measured 2x slower here on CPU,
    an out-of-place first step 25% slower)."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, inplace: bool):
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax
        self.inplace = inplace

    def forward(self, x):
        q = x.mul_(1 / self.scale) if self.inplace else x.mul(1 / self.scale)
        q.round_().clamp_(self.qmin - self.zero_point, self.qmax - self.zero_point)
        return q.mul_(self.scale)


class TFLiteNet(nn.Module):
    """The operator list of a .tflite graph, run on (B, 3, H, W) float input in the
    model's real-valued input domain. ``ops[i]`` is the i-th operator; ``labels[i]`` its
    readable name; ``kinds[i]`` its builtin operator name."""

    def __init__(self, path: str | Path, quant: str = "fake"):
        super().__init__()
        if quant not in ("fake", "none"):
            raise FnemmError(f"quant={quant!r}: expected 'fake' or 'none'")
        self.path = Path(path)
        tfl = _tflite()
        try:
            buf = self.path.read_bytes()
            model = tfl.Model.GetRootAsModel(buf, 0)
            graph = model.Subgraphs(0)
            n_ops = graph.OperatorsLength()
        except FileNotFoundError:
            raise FnemmError(f"{self.path}: no such file (--weights takes a .tflite model or a fine-tuned run's cnn.pt)") from None
        except Exception as e:  # noqa: BLE001 (flatbuffers raises assorted errors on garbage)
            raise FnemmError(f"{self.path}: not a readable TensorFlow Lite model ({type(e).__name__})") from None
        self._tfl, self._model, self._graph = tfl, model, graph
        self._opnames = {v: k for k, v in vars(tfl.BuiltinOperator).items() if not k.startswith("_")}
        self.input_id = int(graph.Inputs(0))
        shape = graph.Tensors(self.input_id).ShapeAsNumpy()
        self.input_size = int(shape[1])
        self.input_quant = self._quant(self.input_id)
        self.ops = nn.ModuleList()
        self.outputs = nn.ModuleList()      # per operator: its output's grid (or identity)
        self.labels, self.kinds, self.wiring = [], [], []
        for i in range(n_ops):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            kind = self._opnames.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            module, inputs = self._convert(op, kind)
            out = int(op.Outputs(0))
            self.ops.append(module)
            self.kinds.append(kind)
            self.labels.append(_label(graph.Tensors(out).Name().decode(), kind, i))
            self.wiring.append((inputs, out))
            q = self._quant(out)
            fresh = kind in FRESH_OUTPUT
            if quant == "fake" and q:
                self.outputs.append(FakeQuant(*q, inplace=fresh))
                lo, hi = q[0] * (q[2] - q[1]), q[0] * (q[3] - q[1])
                act = getattr(module, "act", None)
                if act is not None and act[0] <= lo and hi <= act[1]:
                    module.act = None      # the grid's range already lies inside the activation's
            else:
                self.outputs.append(nn.Identity())
        self.output_id = int(graph.Outputs(0))
        del self._tfl, self._model, self._graph
        self._last_use = {}
        for i, (inputs, _) in enumerate(self.wiring):
            for t in inputs:
                self._last_use[t] = i

    # -- reading the flatbuffer ------------------------------------------------------
    def _quant(self, t: int):
        """(scale, zero_point, qmin, qmax) of a per-tensor quantised tensor, else None."""
        tensor = self._graph.Tensors(t)
        q = tensor.Quantization()
        if q is None or q.ScaleLength() != 1 or tensor.Type() not in QRANGE:
            return None
        return (float(q.Scale(0)), int(q.ZeroPoint(0)), *QRANGE[tensor.Type()])

    def _const(self, t: int) -> np.ndarray:
        """A constant tensor, dequantised to float32 (or raw ints for shape/axis tensors)."""
        tensor = self._graph.Tensors(t)
        data = self._model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(data, int) or data.size == 0:
            raise FnemmError(f"{self.path}: tensor {tensor.Name().decode()!r} has no data "
                             f"(external buffers are not supported)")
        dtype = DTYPES.get(tensor.Type())
        if dtype is None:
            raise FnemmError(f"{self.path}: tensor type {tensor.Type()} is not supported")
        array = np.frombuffer(data.tobytes(), dtype=dtype).reshape(tensor.ShapeAsNumpy())
        q = tensor.Quantization()
        if q is None or q.ScaleLength() == 0 or dtype in (np.float32, np.float16):
            return array
        scale, zp = q.ScaleAsNumpy().astype(np.float64), q.ZeroPointAsNumpy().astype(np.float64)
        if scale.size > 1:          # per channel along QuantizedDimension
            shape = [1] * array.ndim
            shape[q.QuantizedDimension()] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return ((array.astype(np.float64) - zp) * scale).astype(np.float32)

    def _options(self, op, cls):
        opts = cls()
        table = op.BuiltinOptions()
        if table is not None:
            opts.Init(table.Bytes, table.Pos)
        return opts

    def _spatial(self, t: int) -> tuple[int, int]:
        shape = self._graph.Tensors(t).ShapeAsNumpy()
        return int(shape[1]), int(shape[2])

    def _pads(self, op, padding: int, kh: int, kw: int, sh: int, sw: int, dh=1, dw=1):
        if padding == self._tfl.Padding.VALID:
            return (0, 0, 0, 0)
        h, w = self._spatial(op.Inputs(0))
        top, bottom = _same_pad(h, kh, sh, dh)
        left, right = _same_pad(w, kw, sw, dw)
        return (left, right, top, bottom)

    def _convert(self, op, kind: str):
        tfl, x = self._tfl, [int(op.Inputs(0))]
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            depthwise = kind == "DEPTHWISE_CONV_2D"
            o = self._options(op, tfl.DepthwiseConv2DOptions if depthwise else tfl.Conv2DOptions)
            w = self._const(op.Inputs(1))
            if depthwise:                       # 1HW(C*m) -> (C*m)1HW
                w = w.transpose(3, 0, 1, 2)
            else:                               # OHWI -> OIHW
                w = w.transpose(0, 3, 1, 2)
            out_c, in_c, kh, kw = w.shape
            groups = out_c // o.DepthMultiplier() if depthwise else 1
            if depthwise:
                in_c = groups
            left, right, top, bottom = self._pads(op, o.Padding(), kh, kw, o.StrideH(), o.StrideW(),
                                                  o.DilationHFactor(), o.DilationWFactor())
            # SAME's symmetric part inside the convolution (no padded copy of the input: the
            # same numbers, 13% faster a crop); only its extra end pixel, if any, by F.pad
            conv = nn.Conv2d(in_c, out_c, (kh, kw), stride=(o.StrideH(), o.StrideW()), padding=(top, left),
                             dilation=(o.DilationHFactor(), o.DilationWFactor()),
                             groups=groups, bias=op.InputsLength() > 2 and op.Inputs(2) >= 0)
            conv.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            if conv.bias is not None:
                conv.bias.data.copy_(torch.from_numpy(self._const(op.Inputs(2)).astype(np.float32)))
            return Conv(conv, (0, right - left, 0, bottom - top), ACTIVATIONS[o.FusedActivationFunction()]), x
        if kind == "ADD":
            o = self._options(op, tfl.AddOptions)
            return Add(ACTIVATIONS[o.FusedActivationFunction()]), [int(op.Inputs(0)), int(op.Inputs(1))]
        if kind == "AVERAGE_POOL_2D":
            o = self._options(op, tfl.Pool2DOptions)
            kh, kw, sh, sw = o.FilterHeight(), o.FilterWidth(), o.StrideH(), o.StrideW()
            pads = self._pads(op, o.Padding(), kh, kw, sh, sw)
            if any(pads):
                raise FnemmError(f"{self.path}: AVERAGE_POOL_2D with SAME padding is not supported")
            return AvgPool((kh, kw), (sh, sw), pads, ACTIVATIONS[o.FusedActivationFunction()]), x
        if kind == "MEAN":
            o = self._options(op, tfl.ReducerOptions)
            nchw = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1, -2: 3, -3: 2}
            axes = tuple(sorted(nchw[int(a)] for a in self._const(op.Inputs(1)).reshape(-1)))
            return Mean(axes, bool(o.KeepDims())), x
        if kind == "RESHAPE":
            shape = self._graph.Tensors(op.Outputs(0)).ShapeAsNumpy()
            if len(shape) != 2:
                raise FnemmError(f"{self.path}: RESHAPE to {list(shape)} is not supported (only to 2-D)")
            return Flatten(), x
        if kind == "SOFTMAX":
            return Softmax(float(self._options(op, tfl.SoftmaxOptions).Beta())), x
        if kind in ("QUANTIZE", "DEQUANTIZE"):
            return nn.Identity(), x            # the value is the same real number on another grid
        raise FnemmError(f"{self.path}: operator {kind} is not supported by fnemm's TFLite reader")

    # -- running ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_id: x}
        for i, (op, output, (inputs, out)) in enumerate(zip(self.ops, self.outputs, self.wiring)):
            env[out] = output(op(*[env[t] for t in inputs]))
            for t in inputs:
                if self._last_use[t] == i and t != self.output_id:
                    env.pop(t, None)       # free early maps as soon as nothing reads them
        return env[self.output_id]


def _label(tensor_name: str, kind: str, index: int) -> str:
    """'MobilenetV2/expanded_conv_1/expand/Relu6;...' -> 'expanded_conv_1/expand'."""
    first = tensor_name.split(";")[0]
    parts = first.split("/")
    if len(parts) > 2:
        parts = parts[1:-1]            # drop the model scope and the final op name
    return "/".join(parts) or f"{kind.lower()}_{index}"
