"""Photo uploads arriving together: images a second through a store's CNN when
concurrent requests share forward passes (StoreEncoder.batch_size 8, the service's
default on a GPU) against the same requests taking one pass each (batch_size 1, its
default on a CPU: the reference, in this process, on the same photos and threads), and
the latency each request sees.

Needs a feature store made by `fnemm extract` (default: the demo's, runs/demo/features)
and photos (default: the bundled Flickr8K ones).

    .venv/bin/python bench/upload_speed.py [--store runs/demo/features] [--clients 16]
        [--requests 48] [--threads 2] [--device cuda]

Measured on 2 shared AVX2 cores (MobileNetV2 demo store, 32 photos, 8 and 16 clients):
shared passes 0.86-0.91x the photos a second of one pass each, hence 1 on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from machine import cpu_features        # bench/ is this script's folder, on sys.path
from fnemm.features.encode import StoreEncoder

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def load(encoder: StoreEncoder, files: list[Path], clients: int) -> tuple[float, list[float]]:
    """``clients`` threads encode ``files`` between them; (images a second, latencies)."""
    todo, lock, latencies = list(files), threading.Lock(), []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                f = todo.pop()
            t = time.perf_counter()
            encoder.encode(f)
            with lock:
                latencies.append(time.perf_counter() - t)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(files) / (time.perf_counter() - start), latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(ROOT / "runs" / "demo" / "features"))
    ap.add_argument("--photos", default=str(PHOTOS))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8, help="photos a shared pass takes at most")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(Path(args.photos).glob("*.jpg"))[:args.requests]
    encoder = StoreEncoder(args.store, args.device)
    batch = args.batch
    print(f"CPU: {cpu_features()}; {args.threads} torch threads; store {args.store} ({encoder.manifest['cnn']}, "
          f"{encoder.crops} crops); {len(files)} photos from {args.clients} clients")
    encoder.encode(files[0])                                    # warm-up
    rows = {}
    for name, size in (("one pass each (reference)", 1), (f"shared passes (up to {batch})", batch),
                       ("one pass each, again", 1), ("shared passes, again", batch)):
        encoder.batch_size = size
        rate, lat = load(encoder, files, args.clients)
        rows.setdefault(size, []).append(rate)
        print(f"  {name:<30} {rate:6.2f} photos/s   latency p50 {statistics.median(lat):6.2f} s, "
              f"max {max(lat):6.2f} s")
    print(f"shared / one each: {max(rows[batch]) / max(rows[1]):.2f}x the photos a second (best of two each)")


if __name__ == "__main__":
    main()
