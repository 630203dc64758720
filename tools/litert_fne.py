"""Reference FNE features from the LiteRT interpreter (not part of the package).

Runs ../shared/data/models/mobilenet_v2_1.0_224_quant.tflite in the reference
runtime (ai-edge-litert, with every intermediate tensor preserved), spatially
averages the dequantised output of every CONV_2D / DEPTHWISE_CONV_2D layer,
averages over crops (resize 256x256, centre 224 crop, or the 10 crops), then
standardises on the training images only and discretises to {-1, 0, 1}
(thresholds -0.25 / 0.15), and writes a plain feature file that `fnemm train`
reads (``--features OUT.npy``, ids beside it).

This exists to train on real features before `fnemm extract` lands, and is the
independent reference that extractor is checked against. Needs
``pip install ai-edge-litert pillow``.

    .venv/bin/python tools/litert_fne.py --images ../shared/data/flickr8k/images \
        --train-list ../shared/data/flickr8k/Flickr_8k.trainImages.txt --out runs/litert/fne.npy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

MODEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "mobilenet_v2_1.0_224_quant.tflite"


def crops(img: Image.Image, n: int) -> list[np.ndarray]:
    a = np.asarray(img.convert("RGB").resize((256, 256), Image.BILINEAR))
    boxes = [(16, 16)] if n == 1 else [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    out = [a[y:y + 224, x:x + 224] for y, x in boxes]
    if n == 10:
        out += [c[:, ::-1] for c in out]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--train-list", required=True, help="image ids whose statistics standardise")
    ap.add_argument("--out", required=True, help="OUT.npy (+ OUT.ids.txt, OUT.raw.npy)")
    ap.add_argument("--crops", type=int, default=1, choices=[1, 10])
    args = ap.parse_args()
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(MODEL), experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    details = it.get_tensor_details()
    taps = [o["outputs"][0] for o in it._get_ops_details()
            if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    quant = [details[t]["quantization"] for t in taps]
    inp = it.get_input_details()[0]["index"]
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rows, t0 = [], time.perf_counter()
    for path in tqdm(files, unit="img"):
        acc = None
        for crop in crops(Image.open(path), args.crops):
            it.set_tensor(inp, np.ascontiguousarray(crop)[None])
            it.invoke()
            v = np.concatenate([(it.get_tensor(t).astype(np.float32).reshape(-1, details[t]["shape"][-1])
                                 .mean(0) - zp) * sc for t, (sc, zp) in zip(taps, quant)])
            acc = v if acc is None else acc + v
        rows.append(acc / args.crops)
    raw = np.stack(rows)
    ids = [p.name for p in files]
    train = set(Path(args.train_list).read_text().split())
    mask = np.array([i in train for i in ids])
    mean, std = raw[mask].mean(0), raw[mask].std(0)
    z = (raw - mean) / np.where(std > 0, std, 1)
    fne = np.where(z < -0.25, -1, np.where(z > 0.15, 1, 0)).astype(np.int8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, fne)
    np.save(out.with_suffix(".raw.npy"), raw.astype(np.float16))
    out.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
    vals, counts = np.unique(fne, return_counts=True)
    print(f"{len(ids)} images, {len(taps)} conv layers, {fne.shape[1]} features, {args.crops} crop(s), "
          f"{time.perf_counter() - t0:.0f} s; fraction " +
          ", ".join(f"{v:+d}: {c / fne.size:.3f}" for v, c in zip(vals, counts)))


if __name__ == "__main__":
    main()
