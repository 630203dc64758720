"""How each stage's memory, disk and CPU time grow with the number of images, and what
that projects at Flickr30K and MSCOCO size.

Every stage runs as the user would run it (the `fnemm` command, a fresh process) on the
first N photos of flickr8k-224 (real JPEG decoding; the centre crop, --crops 10 for all
ten: memory does not depend on it, the pooled rows are the same size), with a stand-in CNN
that has a real CNN's tap layout and a near-free forward (bench/standin_cnn.py: the
same 18,057 raw / 17,056 FNE dimensions as MobileNetV2), so what is measured is
everything around the forward pass:

    extract       fnemm extract (decode, crop, pool, statistics, the FNE store)
    extract-pca   fnemm extract --from STORE --pca 256 (streaming PCA; fewer below 256 training images)
    extract-f32   fnemm extract --from STORE --layers late --post center-layer (float32 rows)
    train         fnemm train, 1 epoch of demo/FNE-MH on the FNE store
    train-f32     the same on the float32 store
    evaluate      fnemm evaluate --split train (N_train images x 5 N_train captions)
    index         fnemm index build --split all (exact sides, mapped files)

Peak memory is sampled every 20 ms over the process tree from /proc (RssAnon: the
process's own memory; RssFile: pages of mapped files, which the kernel can drop);
CPU seconds are the children's user + system time; disk is the output's size. The
growth exponent of each figure between the two largest sizes is log2 of their ratio
per doubling; the projections follow the straight line through those two sizes.

    python bench/memory_growth.py                      # N = 1000, 2000, 4000, 8000
    python bench/memory_growth.py --sizes 500,1000 --cnn efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_features        # bench/ is this script's folder, on sys.path

HERE = Path(__file__).resolve().parent
STAGES = ("extract", "extract-pca", "extract-f32", "train", "train-f32", "evaluate", "index")
TARGETS = {"Flickr30K": 31_783, "MSCOCO + restval": 123_287}     # all images of each


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss(pids: list[int]) -> tuple[int, int]:
    anon = file = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, file


def run_stage(argv: list[str], env: dict) -> dict:
    """Run one command; its peak anonymous / file-backed RSS (process tree), CPU, wall."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon": 0, "file": 0, "total": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            anon, file = _rss(_tree(proc.pid))
            peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
            peak["total"] = max(peak["total"], anon + file)
            stop.wait(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output = proc.communicate()[0]
    stop.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"anon_mb": peak["anon"] / 2**20, "file_mb": peak["file"] / 2**20,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "wall_s": time.perf_counter() - t0}


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def one_size(n: int, work: Path, images: Path, env: dict, stages: list[str], threads: int, crops: int) -> dict:
    from fnemm.datasets import load_dataset
    dataset = load_dataset("flickr8k-224").head(n)
    data = dataset.to_jsonl(work / f"data-{n}.jsonl")
    components = str(min(256, dataset.counts()["train"]))
    fnemm = [sys.executable, "-m", "fnemm.cli"]
    store, pca, f32 = work / f"store-{n}", work / f"pca-{n}", work / f"f32-{n}"
    run, run32, index = work / f"run-{n}", work / f"run32-{n}", work / f"index-{n}"
    common = ["--quiet", "--threads", str(threads)]
    train = ["train", "--preset", "demo/FNE-MH", "--dataset", data, "--epochs", "1", *common]
    commands = {
        "extract": (["extract", "--images", images, "--dataset", data, "--cnn", "standin_cnn:build",
                     "--out", store, "--workers", "1", "--crops", str(crops), "--quiet"], store),
        "extract-pca": (["extract", "--from", store, "--dataset", data, "--pca", components, "--out", pca, "--quiet"], pca),
        "extract-f32": (["extract", "--from", store, "--dataset", data, "--layers", "late", "--post",
                         "center-layer", "--out", f32, "--quiet"], f32),
        "train": ([*train, "--features", store, "--out", run], run),
        "train-f32": ([*train, "--features", f32, "--out", run32], run32),
        "evaluate": (["evaluate", "--checkpoint", run, "--features", store, "--dataset", data, "--split", "train",
                      "--threads", str(threads)], None),
        "index": (["index", "build", "--checkpoint", run, "--features", store, "--dataset", data, "--split", "all",
                   "--out", index, "--quiet"], index),
    }
    out = {}
    for stage in stages:
        argv, folder = commands[stage]
        got = run_stage([*fnemm, *[str(a) for a in argv]], env)
        got["disk_mb"] = disk_mb(folder) if folder else 0.0
        out[stage] = got
        print(f"  N={n:>6} {stage:<12} anon {got['anon_mb']:8.0f} MB  file {got['file_mb']:7.0f} MB  "
              f"cpu {got['cpu_s']:7.1f} s  wall {got['wall_s']:6.1f} s  disk {got['disk_mb']:7.0f} MB", flush=True)
    return out


def exponent(small: float, large: float, ratio: float) -> float:
    return math.log(max(large, 1e-9) / max(small, 1e-9)) / math.log(ratio)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,2000,4000,8000")
    ap.add_argument("--cnn", default="mobilenet_v2", help="whose tap layout the stand-in has")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crops", type=int, choices=[1, 10], default=1)
    ap.add_argument("--work", help="a folder for the stores and runs (default: a temporary one, removed)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--redraw", metavar="JSON", help="print the table of an earlier run's --json, run nothing")
    args = ap.parse_args()
    if args.redraw:
        saved = json.loads(Path(args.redraw).read_text())
        print(f"memory_growth (redrawn from {args.redraw}): {saved['cpu']}; stand-in for {saved['cnn']}")
        report({int(n): f for n, f in saved["figures"].items()}, saved["sizes"], list(saved["stages"]))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        raise SystemExit(f"--stages: unknown {bad}; choose from {', '.join(STAGES)}")
    from fnemm.datasets import load_dataset
    images = load_dataset("flickr8k-224").images
    if images is None or not Path(images).is_dir():
        raise SystemExit("the flickr8k-224 photos are not here (../shared/data/flickr8k/images-224)")
    print(f"memory_growth: {cpu_features()}; stand-in for {args.cnn}; sizes {sizes}; stages {stages}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fnemm-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    import standin_cnn
    layout = work / f"layout-{args.cnn}.json"
    standin_cnn.write_layout(args.cnn, layout)
    env = {**os.environ, standin_cnn.LAYOUT_ENV: str(layout),
           "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        figures = {n: one_size(n, work, Path(images), env, stages, args.threads, args.crops) for n in sizes}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = report(figures, sizes, stages)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_features(), "cnn": args.cnn, "sizes": sizes,
                                               "figures": figures, "stages": summary}, indent=1))


def report(figures: dict, sizes: list[int], stages: list[str]) -> dict:
    """The table: peaks per size, growth exponents between the two largest sizes, and
    projections by the straight line through those two points (memory and disk are a
    fixed part plus a part per image; never below the largest measured)."""
    a, b = sizes[-2:] if len(sizes) > 1 else (sizes[0], sizes[0])
    print(f"\n| stage | peak anon MB at {', '.join(f'{n:,}' for n in sizes)} images | exponent {a:,} -> {b:,} "
          f"(anon / file / cpu / disk) | " + " | ".join(f"{k} ({v:,}): anon GB, disk GB, CPU h"
                                                        for k, v in TARGETS.items()) + " |")
    print("|---|---|---|" + "---|" * len(TARGETS))
    summary = {}
    for stage in stages:
        row = [figures[n][stage] for n in sizes]
        lo, hi = figures[a][stage], figures[b][stage]
        ex = {k: exponent(lo[k], hi[k], b / a) if b != a else float("nan")
              for k in ("anon_mb", "file_mb", "cpu_s", "disk_mb")}
        proj = {name: {k: max(hi[k], hi[k] + (hi[k] - lo[k]) / max(b - a, 1) * (total - b))
                       for k in ("anon_mb", "disk_mb", "cpu_s")} for name, total in TARGETS.items()}
        summary[stage] = {"sizes": sizes, "figures": row, "exponents": ex, "projections": proj}
        peaks = " / ".join(f"{r['anon_mb']:.0f}" for r in row)
        print(f"| {stage} | {peaks} | "
              f"{ex['anon_mb']:.2f} / {ex['file_mb']:.2f} / {ex['cpu_s']:.2f} / {ex['disk_mb']:.2f} | "
              + " | ".join(f"{p['anon_mb'] / 1024:.1f}, {p['disk_mb'] / 1024:.1f}, {p['cpu_s'] / 3600:.2f}"
                           for p in proj.values()) + " |")
    print("\n(projections: the straight line through the two largest sizes; the training figures are one "
          "epoch's; a stage whose method changes with the data's size, such as --pca (exact up to 256 MiB "
          "of centred training rows, subspace iteration above), is not on that line across the change)")
    return summary

if __name__ == "__main__":
    main()
