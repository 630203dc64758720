"""DDP training throughput: the same run as 1 process and as N processes (torchrun).

Both runs train the same config on the same synthetic data (tests/synthetic.py, with
--images images of --dim-dimensional features) for --epochs epochs, validation
included, in this one invocation; the ratio of their wall times is the speed-up. On
a CPU each process gets --threads threads (gloo); on GPUs one GPU each (NCCL).

    .venv/bin/python bench/ddp_speed.py [--procs 2] [--images 6000] [--dim 4096] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_features        # bench/ is this script's folder, on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run(procs: int, common: list[str], out: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "fnemm.cli", "train", "--out", str(out), *common, "--threads", str(threads)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import synthetic
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl, npy, ids = synthetic.write(tmp / "data", n_images=args.images, dim=args.dim)
        common = ["--preset", "flickr8k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids),
                  "--epochs", str(args.epochs), "--quiet", "--checkpoint-every", "0", "--device", args.device]
        single = run(1, common, tmp / "one", args.threads)
        multi = run(args.procs, common, tmp / "many", args.threads)
        rsum = [json.loads((tmp / r / "metrics.jsonl").read_text().splitlines()[-1])["val"]["rsum"]
                for r in ("one", "many")]
    pairs = int(args.images * 0.7) * args.epochs
    print(f"CPU: {cpu_features()}")
    print(f"{args.images} images ({pairs} training pairs over {args.epochs} epochs), {args.dim}-d features, "
          f"flickr8k/FNE-MH, {args.threads} thread(s) per process, {args.device}")
    print(f"1 process        : {single:7.1f} s  ({pairs / single:7.0f} pairs/s, incl. start-up and validation)")
    print(f"{args.procs} processes      : {multi:7.1f} s  ({pairs / multi:7.0f} pairs/s)")
    print(f"speed-up         : {single / multi:7.2f}x   (last val rsum {rsum[0]:.1f} vs {rsum[1]:.1f})")


if __name__ == "__main__":
    main()
