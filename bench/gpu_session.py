"""One GPU session's measurements (issues 15 and 16), as one prepared run.

A GPU machine is lent for minutes, bare, without network or our dependencies. Here,
`bash bench/gpu_kit.sh` puts into .gpu/ (ignored by git) the wheels it lacks, the
bundled photos and captions, the MobileNetV2 file and the extraction code as it was
before images were shipped once (the "before" of issue 15). There, one command:

    python3 bench/gpu_session.py --out $OUT   # device tool: carry [".gpu/whl", ".gpu/data", ".gpu/before"]

measures, on the same photos, each as one timed `fnemm extract` process (model load,
decoding, forward pass and assembly; images/s = photos / wall seconds):
- extraction before/after for VGG16 (random weights: speed does not depend on them)
  and MobileNetV2, fp32, and after with --precision bf16;
- the agreement of bf16 and fp32 FNE codes (equal, and sign flips -1 <-> +1);
- fine-tuning: demo/FC7-MH trained on the MobileNetV2 store, then `train --finetune`
  for --ft-epochs epochs, seconds per epoch from its metrics (validation included);
- what crashed on GPUs (issue 23): torchrun training through NCCL past epoch 1, and a
  run killed after epoch 1 resumed on the GPU to an unbroken run's weights;
- concurrent photo uploads (issue 26): bench/upload_speed.py, shared forward passes
  (the service's GPU default) against one pass each;
- the paper's Flickr8K benchmark (issue 22): extraction of the kit's images-224 photos
  with MobileNetV2 and EfficientNet-Lite0, and bench/train_speed.py's step of
  flickr8k/FNE-MH at 17,056 and 21,008 features and flickr8k/FC7-MH at 1,280.
It writes OUT/gpu_summary.json and OUT/gpu_summary.txt (the 8-file limit: logs are
summarised, not copied). `--device cpu --images 8 --skip-precision` rehearses it here in minutes.
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
    ap.add_argument("--skip-precision", action="store_true",
                    help="skip the VGG16 / bf16 extraction timings (a rehearsal on a CPU without bf16 units)")
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

    # in order of what matters now, each result saved as it comes (a call cut short
    # still returns the ones before): the open benchmark's figures (issue 22), the GPU
    # paths that crashed (issue 23), fine-tuning and uploads, then the precision timings
    _flickr8k_224(fnemm, say, summary, data, work, args, new_env)
    base = extract("mobilenet_v2-after-fp32", "mobilenet_v2", "fp32", new_env)
    if base:
        _ddp_and_resume(fnemm, say, summary, base, dataset, work, args.device, new_env)
        # fine-tuning: a converged FC7 run on the bundled int8 MobileNetV2 store, then --finetune
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
        # concurrent uploads: shared forward passes against one each (the service's GPU default)
        cmd = [sys.executable, str(ROOT / "bench" / "upload_speed.py"), "--store", str(base), "--photos", str(images),
               "--device", args.device, "--requests", "48", "--clients", "16"]
        done = subprocess.run(cmd, env=new_env, capture_output=True, text=True)
        summary["runs"]["upload-speed"] = {"rc": done.returncode, "out": (done.stdout + done.stderr)[-900:]}
        say("upload_speed:\n  " + "\n  ".join((done.stdout + done.stderr).strip().splitlines()[-6:]))
    stores = {}
    for cnn in () if args.skip_precision else ("vgg16", "mobilenet_v2_float"):
        if (KIT / "before" / "src").is_dir():
            extract(f"{cnn}-before-fp32", cnn, "fp32", old_env)
        for precision in ("fp32", "bf16"):
            stores[cnn, precision] = extract(f"{cnn}-after-{precision}", cnn, precision, new_env)
    import numpy as np
    for cnn in () if args.skip_precision else ("vgg16", "mobilenet_v2_float"):
        a, b = stores[cnn, "fp32"], stores[cnn, "bf16"]
        if a and b:
            x, y = np.load(a / "fne.npy"), np.load(b / "fne.npy")
            agree = {"equal": round(float((x == y).mean()), 5), "sign_flips": round(float((x * y < 0).mean()), 6)}
            summary[f"{cnn}_bf16_vs_fp32_codes"] = agree
            say(f"{cnn} bf16 vs fp32 FNE codes: {agree['equal']:.2%} equal, {agree['sign_flips']:.3%} sign flips")

    say("done")


def _ddp_and_resume(fnemm, say, summary: dict, base: Path, dataset: str, work: Path, device: str, env: dict) -> None:
    """What crashed on GPUs before (issue 23): a torchrun training (one process: NCCL all
    the same) past the end of its first epoch, and a run killed after epoch 1 resumed on
    the GPU, whose weights must equal an unbroken run's."""
    common = ["--preset", "demo/FC7-MH", "--dataset", dataset, "--features", base, "--device", device,
              "--epochs", "3", "--checkpoint-every", "0", "--quiet", "--set", "model.image_dropout=0.2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "fnemm.cli", "train",
           *[str(a) for a in common], "--out", str(work / "ddp")]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    epochs = len((work / "ddp" / "metrics.jsonl").read_text().splitlines()) if (work / "ddp" / "metrics.jsonl").exists() else 0
    summary["runs"]["torchrun-nccl"] = {"rc": done.returncode, "epochs": epochs, "wall_s": round(time.perf_counter() - t, 1),
                                        "tail": (done.stdout + done.stderr)[-600:]}
    say(f"torchrun --nproc-per-node 1 (NCCL), 3 epochs: rc {done.returncode}, {epochs} epochs written"
        + ("" if done.returncode == 0 else f"\n  {(done.stdout + done.stderr)[-300:]}"))
    ref, cut = work / "ref", work / "cut"
    fnemm("gpu-unbroken", ["train", *common, "--out", ref], env)
    subprocess.run([sys.executable, "-m", "fnemm.cli", "train", *[str(a) for a in common], "--out", str(cut)],
                   env={**env, "FNEMM_DIE_AT": "epoch-1"}, capture_output=True)
    run = fnemm("gpu-resume", ["train", "--out", cut, "--resume", "--quiet", "--device", device], env)
    if run["rc"] == 0 and (ref / "last.pt").exists():
        import torch
        a, b = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (ref, cut))
        run["same_weights"] = all(torch.equal(a[k], b[k]) for k in a)
        say(f"  resumed on {device} after a kill at epoch 1: weights equal an unbroken run's: {run['same_weights']}")


def _flickr8k_224(fnemm, say, summary: dict, data: Path, work: Path, args, env: dict) -> None:
    """The paper's benchmark on a GPU (issue 22): extraction of the images-224 photos the
    kit carries (a few hundred: the working tree that travels is 64 MiB), the training
    step of the paper's presets at the FNE widths of both bundled CNNs, and the
    benchmark's reproduction command on those photos."""
    photos = data / "flickr8k" / "images-224"
    if not photos.is_dir():
        say("flickr8k-224: no photos in the kit (bash bench/gpu_kit.sh)")
        return
    names = {p.name for p in photos.iterdir()}
    sys.path.insert(0, str(ROOT / "src"))
    from fnemm.datasets import load_dataset
    full = load_dataset(data / "flickr8k")
    kit = full.subset([k for k, i in enumerate(full.image_ids) if i in names])
    kit = kit.head(args.images) if args.images else kit          # the official splits in proportion
    keep = kit.image_ids
    spec = str(kit.to_jsonl(work / "f8k224.jsonl"))
    for cnn in ("mobilenet_v2_float", "efficientnet_lite0"):
        store = work / f"f8k224-{cnn}"
        run = fnemm(f"f8k224-extract-{cnn}", ["extract", "--images", photos, "--dataset", spec, "--cnn", cnn,
                                              "--device", args.device, "--workers", args.workers, "--out", store,
                                              "--quiet"], env)
        if run["rc"] == 0:
            run["images_per_s"] = round(len(keep) / run["wall_s"], 1)
            say(f"  {len(keep)} images-224 photos, {run['images_per_s']} images/s (10 crops, whole process)")
    for preset, dim in (("flickr8k/FNE-MH", 17056), ("flickr8k/FNE-MH", 21008), ("flickr8k/FC7-MH", 1280)):
        cmd = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--preset", preset, "--feature-dim", str(dim),
               "--device", args.device, "--steps", "20" if args.device != "cpu" else "1"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        summary["runs"][f"train-speed-{preset}-{dim}"] = {"rc": done.returncode, "out": done.stdout[-900:]}
        say(f"train_speed {preset} at {dim} features:\n  " + "\n  ".join(done.stdout.strip().splitlines()[-6:])
            if done.returncode == 0 else f"train_speed {preset}: rc {done.returncode} {done.stderr[-300:]}")
    # the reproduction command itself (README: `make flickr8k DEVICE=cuda`), every part of
    # its grid on the kit's photos: extraction, derived recipes, paper presets with patience,
    # seeds, a learning-curve point, the paired statistics and the report
    grid = work / "f8k224-study"
    run = fnemm("f8k224-study", ["study", "--dataset", spec, "--images", photos, "--presets", "flickr8k",
                                 "--patience", "2", "--epochs", "6", "--splits", "1", "--seeds", "2",
                                 "--cnns", "efficientnet_lite0", "--variants", "baseline,fne,late-center-layer,fne+baseline",
                                 "--train-sizes", str(len(kit.split_indices("train")) // 2), "--curve-variants", "baseline,fne",
                                 "--curve-cnns", "efficientnet_lite0", "--curve-seeds", "1", "--device", args.device,
                                 "--workers", args.workers, "--out", grid, "--quiet"], env)
    if run["rc"] == 0:
        run["finished_runs"] = len(list((grid / "runs").rglob("metrics-test.json")))
        run["report"] = (grid / "study.md").is_file()
        say(f"  {run['finished_runs']} runs finished on {args.device}, study.md written: {run['report']}")


def _torch_info() -> str:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{torch.__version__}, {gpu}"


if __name__ == "__main__":
    main()
