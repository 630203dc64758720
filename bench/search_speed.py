"""Search speed: text-query latency over 10k / 100k / 1M gallery images, exact vs
approximate (with recall@10 of approximate vs exact), and a fixed-rate loopback
load test of `fnemm serve`.

The gallery is synthetic, at any size: the images of tests/synthetic.py (three
attributes of 8 values each -> 512 kinds of image, plus noise) as a plain feature
matrix, embedded by a model trained for a few epochs on its 600-image dataset
(joint dim 512, word dim 300, as the demo presets). Index folders are written by
``build_index`` (what `fnemm index build` runs: HNSW/IVF tuned to recall@10 >= 0.95
on sample queries); queries are new captions of the same templates, each timed end
to end as the service runs it (tokenise, GRU, index search, top-k): the reference
in each row is exact inner-product search over the same vectors, in this process.

    .venv/bin/python bench/search_speed.py [--sizes 10000,100000,1000000]
        [--methods hnsw,ivf] [--queries 300] [--rate 50] [--seconds 30] [--work DIR]

Targets (issue 6): p50 < 20 ms at 1M with recall@10 >= 0.95; zero errors under load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import synthetic  # noqa: E402  (the project's synthetic dataset)
from liveserver import serving  # noqa: E402
from machine import cpu_features  # noqa: E402  (bench/, this script's folder)

from fnemm.joint.config import ModelConfig, StageConfig, TrainConfig  # noqa: E402
from fnemm.datasets import load_dataset  # noqa: E402
from fnemm.features.store import load_features  # noqa: E402
from fnemm.search.gallery import Gallery  # noqa: E402
from fnemm.search.vector_index import VectorIndex, recall_at  # noqa: E402
from fnemm.search.index_folder import build_index  # noqa: E402
from fnemm.training.trainer import train  # noqa: E402

DIM = 48


def train_model(work: Path) -> Path:
    run = work / "model"
    if (run / "best.pt").exists():
        return run
    jsonl, npy, ids = synthetic.write(work / "train", n_images=600, dim=DIM)
    config = TrainConfig(model=ModelConfig(word_dim=300, embed_dim=512),
                         stages=(StageConfig(loss="max", lr=2e-3, margin=0.2, max_epochs=8),), batch_size=64)
    summary = train(config, load_dataset(jsonl), load_features(npy, ids=ids), run, quiet=True)
    print(f"model: synthetic 600 images, 8 epochs, val rsum {summary['val']['rsum']:.1f} (of 600)")
    return run


def write_gallery(work: Path, n: int) -> tuple[Path, Path]:
    npy, ids = work / f"gallery-{n}.npy", work / f"gallery-{n}.ids.txt"
    if not npy.exists():
        feats, _ = synthetic.gallery(n, dim=DIM, seed=n)
        np.save(npy, feats)
        ids.write_text("".join(f"g{k:07d}\n" for k in range(n)))
    return npy, ids


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"p50 {np.percentile(a, 50):7.2f} ms  p99 {np.percentile(a, 99):7.2f} ms"


def time_queries(gallery: Gallery, index: VectorIndex, queries: list[str], k: int = 10):
    """Each query end to end as Gallery.text runs it, over ``index``: (latencies ms, top-k rows)."""
    gallery.images = index
    row = {image: k for k, image in enumerate(gallery.image_ids)}
    gallery.text(queries[0], k)                       # warm-up
    times, rows = [], []
    for q in queries:
        t = time.perf_counter()
        hits = gallery.text(q, k)
        times.append(1000 * (time.perf_counter() - t))
        rows.append([row[h.image] for h in hits])
    return times, np.array(rows)


async def fire(url: str, queries: list[str], rate: float, seconds: float, connections: int = 64,
               grace: float = 10.0) -> dict:
    """Open loop at ``rate`` for ``seconds``: request i is due at t0 + i / rate and its
    latency counts from then, so a slow server shows as queueing, not as a lower
    rate (no coordinated omission). ``connections`` keep-alive HTTP/1.1 connections
    take the due requests in turn. Bounded: whatever is unanswered ``grace`` seconds
    after the last request was due counts as an error.

    A plain asyncio-stream client, not httpx: httpx's connection pool does work
    quadratic in the queued requests and, on 2 cores, topped out near 80 req/s
    itself, starving the server it was measuring."""
    from urllib.parse import urlsplit
    where = urlsplit(url)
    n = int(rate * seconds)
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        todo.put_nowait(i)
    latencies, errors = [], []
    t0 = time.perf_counter() + 0.5

    def request(query: str) -> bytes:
        body = json.dumps({"query": query, "k": 10}).encode()
        return (f"POST /search/text HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        status = int((await reader.readline()).split()[1])
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ValueError("response without Content-Length")
        return status, await reader.readexactly(length)

    async def worker():
        reader = writer = None
        try:
            while not todo.empty():
                i = todo.get_nowait()
                due = t0 + i / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(where.hostname, where.port)
                    writer.write(request(queries[i % len(queries)]))
                    status, body = await answer(reader)
                    if status != 200:
                        errors.append(f"HTTP {status}: {body[:100].decode(errors='replace')}")
                    elif len(json.loads(body)["results"]) != 10:
                        errors.append(f"HTTP 200 without 10 results: {body[:100].decode(errors='replace')}")
                    else:
                        latencies.append(1000 * (time.perf_counter() - due))
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    if writer is not None:
                        writer.close()
                    reader = writer = None
        finally:                                  # also when cancelled at the deadline
            if writer is not None:
                writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(min(connections, n))]
    _, pending = await asyncio.wait(tasks, timeout=seconds + 0.5 + grace)
    for task in pending:
        task.cancel()
    elapsed = time.perf_counter() - t0
    unanswered = n - len(latencies) - len(errors)
    if unanswered:
        errors.append(f"{unanswered} requests unanswered {grace:g} s after the last one was due")
    ok = len(latencies)
    return {"sent": n, "ok": ok, "errors": n - ok, "first_errors": errors[:3],
            "seconds": elapsed, "throughput": ok / elapsed, "latencies": latencies or [float("nan")]}


def load_test(index: Path, queries: list[str], rate: float, seconds: float) -> dict:
    t = time.perf_counter()
    with serving(index, index.parent / "serve.log", "--quiet") as url:
        startup = time.perf_counter() - t
        result = asyncio.run(fire(url, queries, rate, seconds))
    return {**result, "startup_s": startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--methods", default="hnsw,ivf", help="approximate methods to build at each size")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50, help="load test requests per second")
    ap.add_argument("--seconds", type=float, default=30, help="load test duration")
    ap.add_argument("--work", help="keep the model, galleries and indexes here (default: a temp dir, removed)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fnemm-search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_features()}; torch threads {torch.get_num_threads()}; work dir {work}")
    run = train_model(work)
    queries = synthetic.captions(args.queries)
    rows = []
    served = None
    try:
        for n in sizes:
            npy, ids = write_gallery(work, n)
            exact_rows = None
            for method in methods:
                folder = work / f"index-{n}-{method}"
                t = time.perf_counter()
                manifest = build_index(run, npy, folder, ids=ids, method=method, quiet=True,
                                       tune_queries=synthetic.captions(1000, seed=99))   # not the timed ones
                built = time.perf_counter() - t
                gallery = Gallery.from_index(folder, encoder=False)
                approx = gallery.images
                if exact_rows is None:
                    exact = VectorIndex.build(approx.vectors, "exact")
                    times, exact_rows = time_queries(gallery, exact, queries)
                    rows.append((n, "exact", times, 1.0, "", None))
                    print(f"{n:>9,}  exact           {percentiles(times)}  recall@10 1.000", flush=True)
                times, found = time_queries(gallery, approx, queries)
                recall = recall_at(found, exact_rows, 10)
                params = ", ".join(f"{k} {v}" for k, v in manifest["images"]["params"].items())
                rows.append((n, method, times, recall, params, built))
                print(f"{n:>9,}  {method:<5} {params:<25} {percentiles(times)}  recall@10 {recall:.3f}  "
                      f"(build {built:.0f} s; tuned on sample queries: {manifest['images']['recall_at_10']})",
                      flush=True)
                served = folder if method == methods[0] else served
                del gallery, approx
        print("\n| gallery | search | params | p50 | p99 | recall@10 vs exact | build |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for n, method, times, recall, params, build in rows:
            print(f"| {n:,} | {method} | {params} | {np.percentile(times, 50):.2f} ms | "
                  f"{np.percentile(times, 99):.2f} ms | {recall:.3f} | "
                  f"{'-' if build is None else f'{build:.0f} s'} |")
        ref = {n: np.percentile(t, 50) for n, m, t, *_ in rows if m == "exact"}
        for n, method, times, *_ in rows:
            if method != "exact":
                print(f"{n:,} {method}: p50 {ref[n] / np.percentile(times, 50):.1f}x faster than exact")
        if served is not None and args.seconds > 0:
            print(f"\nload test: fnemm serve --index {served.name} on 127.0.0.1, "
                  f"{args.rate:g} text queries/s for {args.seconds:g} s (open loop)", flush=True)
            res = load_test(served, queries, args.rate, args.seconds)
            print(f"server start-up {res['startup_s']:.1f} s; sent {res['sent']}, ok {res['ok']}, "
                  f"errors {res['errors']} {res['first_errors'] or ''}")
            print(f"throughput {res['throughput']:.1f} req/s; latency (from scheduled send) "
                  f"{percentiles(res['latencies'])}  max {max(res['latencies']):.1f} ms")
            (work / "load.json").write_text(json.dumps({k: v for k, v in res.items() if k != "latencies"}))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
