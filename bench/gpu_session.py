"""One GPU session's measurements (issues 15 and 16), as one prepared run.

A GPU machine is lent for minutes, bare, without network or our dependencies. Here,
`bash bench/gpu_kit.sh` puts into .gpu/ (ignored by git) the wheels it lacks, the
bundled photos and captions, the MobileNetV2 file and the extraction code as it was
before images were shipped once (the "before" of issue 15). There, one command:

    python3 bench/gpu_session.py --out $OUT          # device tool: carry [".gpu"]

measures, on the same photos, each as one timed `fnemm extract` process (model load,
decoding, forward pass and assembly; images/s = photos / wall seconds):
- extraction before/after for VGG16 (random weights: speed does not depend on them)
  and MobileNetV2, fp32, and after with --precision bf16;
- the agreement of bf16 and fp32 FNE codes (equal, and sign flips -1 <-> +1);
- fine-tuning: demo/FC7-MH trained on the MobileNetV2 store, then `train --finetune`
  for --ft-epochs epochs, seconds per epoch from its metrics (validation included).
It writes OUT/gpu_summary.json and OUT/gpu_summary.txt (the 8-file limit: logs are
summarised, not copied). `--device cpu --images 8` rehearses it here in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_summary.json/.txt")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=0, help="only the first N photos (default: all 991)")
    ap.add_argument("--workers", type=int, default=12, help="decoding processes for extraction")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--work", default="/tmp/fnemm-gpu")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = KIT / "data" if (KIT / "data").is_dir() else ROOT.parent / "shared" / "data"
    env = {**os.environ, "FNEMM_DATA": str(data), "PYTHONUNBUFFERED": "1"}
    site = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    new_env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *site])}
    old_env = {**env, "PYTHONPATH": os.pathsep.join([str(KIT / "before" / "src"), *site])}
    images = data / "flickr8k" / "images"
    dataset = f"flickr8k-1k={data / 'flickr8k'}"
    if args.images:
        sys.path.insert(0, str(ROOT / "src"))
        from fnemm.datasets import load_dataset
        dataset = str(load_dataset(dataset).head(args.images).to_jsonl(work / "photos.jsonl"))
    summary: dict = {"device": args.device, "torch": _torch_info(), "runs": {}}
    txt = []

    def say(line: str) -> None:
        print(line, flush=True)
        txt.append(line)
        (out / "gpu_summary.txt").write_text("\n".join(txt) + "\n")
        (out / "gpu_summary.json").write_text(json.dumps(summary, indent=1))

    say(f"torch {summary['torch']}")

    def fnemm(name: str, argv: list, environment: dict) -> dict:
        cmd = [sys.executable, "-m", "fnemm.cli", *[str(a) for a in argv]]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=environment, capture_output=True, text=True)
        wall = time.perf_counter() - t
        run = {"rc": done.returncode, "wall_s": round(wall, 2), "tail": (done.stdout + done.stderr)[-600:]}
        summary["runs"][name] = run
        say(f"{name}: rc {done.returncode}, {wall:.1f} s" + ("" if done.returncode == 0 else
                                                               f"\n  {run['tail'][-300:]}"))
        return run

    def extract(name: str, cnn: str, precision: str, environment: dict) -> Path | None:
        store = work / name
        argv = ["extract", "--images", images, "--dataset", dataset, "--cnn", cnn, "--device", args.device,
                "--workers", args.workers, "--out", store, "--quiet"]
        if cnn == "vgg16":
            argv += ["--weights", "random"]
        if precision != "fp32":
            argv += ["--precision", precision]
        run = fnemm(name, argv, environment)
        if run["rc"] != 0:
            return None
        n = len(json.loads((store / "manifest.json").read_text())["image_ids"])
        run["images"], run["images_per_s"] = n, round(n / run["wall_s"], 1)
        say(f"  {n} photos, {run['images_per_s']} images/s (10 crops, whole process)")
        return store

    stores = {}
    for cnn in ("vgg16", "mobilenet_v2_float"):
        if (KIT / "before" / "src").is_dir():
            extract(f"{cnn}-before-fp32", cnn, "fp32", old_env)
        for precision in ("fp32", "bf16"):
            stores[cnn, precision] = extract(f"{cnn}-after-{precision}", cnn, precision, new_env)
    import numpy as np
    for cnn in ("vgg16", "mobilenet_v2_float"):
        a, b = stores[cnn, "fp32"], stores[cnn, "bf16"]
        if a and b:
            x, y = np.load(a / "fne.npy"), np.load(b / "fne.npy")
            agree = {"equal": round(float((x == y).mean()), 5), "sign_flips": round(float((x * y < 0).mean()), 6)}
            summary[f"{cnn}_bf16_vs_fp32_codes"] = agree
            say(f"{cnn} bf16 vs fp32 FNE codes: {agree['equal']:.2%} equal, {agree['sign_flips']:.3%} sign flips")

    # fine-tuning: a converged FC7 run on the bundled int8 MobileNetV2 store, then --finetune
    base = extract("mobilenet_v2-after-fp32", "mobilenet_v2", "fp32", new_env)
    if base:
        fc7 = work / "fc7"
        if fnemm("train-fc7", ["train", "--preset", "demo/FC7-MH", "--dataset", dataset, "--features", base,
                               "--out", fc7, "--device", args.device, "--quiet"], new_env)["rc"] == 0:
            ft = work / "ft"
            run = fnemm("finetune", ["train", "--finetune", fc7, "--dataset", dataset, "--finetune-cnn",
                                     "mobilenet_v2_float", "--epochs", args.ft_epochs, "--device", args.device,
                                     "--out", ft, "--quiet"], new_env)
            if run["rc"] == 0:
                epochs = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
                info = json.loads((ft / "run.json").read_text())
                run["epoch_s"] = [e.get("time_s") for e in epochs]
                run["train_photos"], run["val_photos"] = info["n_train"], info["n_val"]
                run["val_rsum"] = [round(e["val"]["rsum"], 1) for e in epochs]
                per = min(s for s in run["epoch_s"] if s)
                say(f"  fine-tuning epochs {run['epoch_s']} s ({info['n_train']} training photos + validation "
                    f"on {info['n_val']} x 10 crops): {info['n_train'] / per:.1f} training photos/s incl. "
                    f"validation; val rsum {run['val_rsum']}")
    say("done")


def _torch_info() -> str:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{torch.__version__}, {gpu}"


if __name__ == "__main__":
    main()
