"""Extraction speed: crops/s of fnemm's CNNs, the cost of the FNE over a bare
forward pass, VGG16's conv throughput against this CPU's matmul, and our
MobileNetV2 against the reference LiteRT interpreter on the same crops.

All in this process, same threads; random VGG16 weights (speed does not depend
on the values). Needs ../shared/data for MobileNetV2 and ai-edge-litert for the
last comparison.

    .venv/bin/python bench/extract_speed.py [--threads 2] [--seconds 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fnemm.features.cnn import build_cnn
from fnemm.features.cnn.mobilenet_v2 import default_weights
from fnemm.features.images import forward_images, keep_freed_memory
from fnemm.features.fne import crops, discretise, resized, standardise
from machine import cpu_features        # bench/ is this script's folder, on sys.path

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"


def rate(fn, n_per_call: int, seconds: float) -> float:
    """Calls of ``fn`` per second x n_per_call (at least 2 calls)."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        fn()
        calls += 1
    return calls * n_per_call / (time.perf_counter() - start)


def best_rates(fns: dict, n_per_call: int, seconds: float, rounds: int = 3) -> dict:
    """The best of ``rounds`` interleaved measurements of each function, after a
    warm-up call of each: the first calls grow the heap and page in the weights,
    which would otherwise count against whichever runs first (seen: +59% 'overhead')."""
    for fn in fns.values():
        fn()
    best = {k: 0.0 for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best[k] = max(best[k], rate(fn, n_per_call, seconds / rounds))
    return best


def matmul_gflops(seconds: float) -> float:
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    return best_rates({"mm": lambda: a @ b}, 2 * n ** 3, seconds)["mm"] / 1e9


def vgg16_conv_gflop(net) -> float:
    """Multiply-adds x 2 of the 13 convolutions for one 224x224 crop."""
    total, size = 0, 224
    for m in net.features:
        if isinstance(m, torch.nn.Conv2d):
            total += 2 * size * size * m.in_channels * m.out_channels * 9
        elif isinstance(m, torch.nn.MaxPool2d):
            size //= 2
    return total / 1e9


def real_crops(n_images: int) -> np.ndarray:
    from PIL import Image
    files = sorted(IMAGES.glob("*.jpg"))[:n_images] if IMAGES.exists() else []
    if not files:
        return np.random.default_rng(0).integers(0, 256, (n_images * 10, 224, 224, 3), dtype=np.uint8)
    return np.concatenate([crops(Image.open(f), 10) for f in files])


def real_images(n_images: int, skip: int = 0) -> np.ndarray:
    """(n, 256, 256, 3) uint8 as extraction reads them (the crops are cut in forward_images)."""
    from PIL import Image
    files = sorted(IMAGES.glob("*.jpg"))[skip:skip + n_images] if IMAGES.exists() else []
    if not files:
        return np.random.default_rng(skip).integers(0, 256, (n_images, 256, 256, 3), dtype=np.uint8)
    return np.stack([np.asarray(resized(Image.open(f))) for f in files])


def code_agreement(cnn, images: np.ndarray) -> tuple[float, float]:
    """(share of FNE codes equal, share of +-1 codes flipped to -+1) between bf16 and fp32
    runs of the CNN, standardised with the fp32 run's statistics over these images."""
    fp32 = np.concatenate([forward_images(cnn, images[k:k + 8], 10, "cpu") for k in range(0, len(images), 8)])
    bf16 = np.concatenate([forward_images(cnn, images[k:k + 8], 10, "cpu", "bf16")
                           for k in range(0, len(images), 8)])
    mean, std = fp32.mean(0), fp32.std(0)
    a, b = (discretise(standardise(x, mean, std)) for x in (fp32, bf16))
    return float((a == b).mean()), float(((a * b) < 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    gflops = matmul_gflops(args.seconds)
    print(f"CPU: {cpu_features()}; fp32 matmul 4096^3: {gflops:.0f} GFLOP/s ({args.threads} threads)")

    pixels = real_crops(4)                     # 4 images x 10 crops (the bare forward's input)
    images = real_images(4)                    # the same 4 images as forward_images takes them
    x = torch.from_numpy(pixels)
    results = {}
    for name, weights in (("mobilenet_v2", None), ("mobilenet_v2_float", None), ("vgg16", "random")):
        if name.startswith("mobilenet") and default_weights() is None:
            print(f"{name}: skipped (no ../shared/data)")
            continue
        cnn = build_cnn(name, weights)
        plain = build_cnn(name, weights)
        net, pre = plain.untap(), plain.preprocess
        with torch.no_grad():
            r = best_rates({"fne": lambda: forward_images(cnn, images, 10, "cpu"),
                            "bf16": lambda: forward_images(cnn, images, 10, "cpu", "bf16"),
                            "bare": lambda: net(pre(x))}, len(pixels), 2 * args.seconds)
        fne, bare, bf16 = r["fne"], r["bare"], r["bf16"]
        results[name] = fne
        print(f"{name:19s} FNE {fne:6.1f} crops/s ({fne / 10:5.2f} img/s at 10 crops)   bare forward "
              f"{bare:6.1f} crops/s   FNE overhead {100 * (bare / fne - 1):+5.1f}%")
        if name != "mobilenet_v2":              # the int8-grid network rounds anyway
            same, flipped = code_agreement(cnn, real_images(32, skip=100))
            print(f"{'':19s} --precision bf16: {bf16:6.1f} crops/s ({bf16 / fne:.2f}x fp32); FNE codes of 32 "
                  f"photos equal to fp32's: {100 * same:.2f}% (sign flips {100 * flipped:.3f}%)")
        if name == "vgg16":
            with torch.no_grad():
                conv = best_rates({"conv": lambda: net.features(pre(x[:8]))}, 8, args.seconds)["conv"]
            achieved = conv * vgg16_conv_gflop(net)
            print(f"vgg16 convolutions: {vgg16_conv_gflop(net):.1f} GFLOP/crop, {conv:.1f} crops/s = "
                  f"{achieved:.0f} GFLOP/s = {achieved / gflops:.2f} of the matmul rate")

    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        print("ai-edge-litert not installed: no LiteRT comparison")
        return
    if "mobilenet_v2" not in results:
        return
    for preserve in (True, False):
        it = Interpreter(model_path=str(default_weights()), num_threads=args.threads,
                         experimental_preserve_all_tensors=preserve,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        inp = it.get_input_details()[0]["index"]
        taps = [o["outputs"][0] for o in it._get_ops_details() if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]

        def run_litert():
            for c in pixels:
                it.set_tensor(inp, c[None])
                it.invoke()
                if preserve:        # the FNE needs every conv output, pooled
                    [it.get_tensor(t).mean((0, 1, 2)) for t in taps]

        lite = best_rates({"lite": run_litert}, len(pixels), args.seconds)["lite"]
        what = "with every conv output pooled (FNE)" if preserve else "classification only, no taps"
        print(f"LiteRT uint8 interpreter, {what}: {lite:6.1f} crops/s; "
              f"fnemm mobilenet_v2 FNE / LiteRT = {results['mobilenet_v2'] / lite:.2f}x")


if __name__ == "__main__":
    main()
