"""Which trained run a make target serves, printed for the shell, or one line saying why none.

    python -m fnemm_studies.pick flickr8k F8K_OUT   # RUN STORE: the benchmark's best run
    python -m fnemm_studies.pick photos F8K_OUT     # RUN: the benchmark's best, else the demo's
"""

from __future__ import annotations

import sys
from pathlib import Path

from fnemm.io.errors import FnemmError
from fnemm.io.files import read_json
from fnemm.training.folders import load_metrics, metrics_path


def best_run(out: str | Path) -> tuple[Path, Path]:
    """(run folder, its feature store) of the best variant of a study at its full training
    size (highest mean test rsum; its first seed with weights on the dataset's own split),
    for serving the study's best model (`make serve-flickr8k`). Judged from the finished
    runs in ``out``, not from study.json's table: workers sharing an --out may each run part
    of the grid (``--cnns``, ``--variants``), and study.json is the last one's part."""
    out = Path(out)
    read_json(out / "study.json", f"run the study into {out} first")
    rows = _finished(out)
    if not rows:
        raise FnemmError(f"{out}: no run has finished at the full training size yet")
    best = max(rows, key=lambda e: e["rsum_mean"])
    full = best["train_images"]
    seeds = sorted((out / "runs" / best["cnn"] / f"n{full}" / best["variant"] / "split-0").glob("seed-*"))
    for run in seeds:
        if (run / "best.pt").is_file() and (run / "run.json").is_file():
            return run, Path(read_json(run / "run.json", "")["args"]["features"])
    records = [run for run in seeds if metrics_path(run, "test").exists()]
    if records:        # copied from results/ (README): the numbers, not the weights
        raise FnemmError(f"{out}: the best variant ({best['cnn']} {best['variant']}) has only the records of "
                         f"its runs, no weights (best.pt); delete {records[0]} and run the study again "
                         f"(`make flickr8k`) to train it here")
    raise FnemmError(f"{out}: the best variant ({best['cnn']} {best['variant']}) has no trained run on split 0")


def _finished(out: Path) -> list[dict]:
    """Mean test rsum per (CNN, variant) of the runs finished so far at the largest training
    size that has any, whichever worker ran them."""
    done: dict[tuple[str, int, str], list[float]] = {}
    for path in sorted((out / "runs").glob("*/n*/*/split-*/seed-*/metrics-test.json")):
        run = path.parent
        cnn, size, variant = run.parts[-5], int(run.parts[-4][1:]), run.parts[-3]
        done.setdefault((cnn, size, variant), []).append(next(iter(load_metrics(run, "test").values()))["rsum"])
    full = max((size for _, size, _ in done), default=None)
    return [{"cnn": cnn, "train_images": size, "variant": variant, "rsum_mean": sum(r) / len(r)}
            for (cnn, size, variant), r in done.items() if size == full]


def photo_model(benchmark: str | Path = "runs/flickr8k", demo: str | Path = "runs/demo") -> Path:
    """The run to search someone's own photos with (`make serve-photos`): the Flickr8K
    benchmark's best run when the benchmark has one (trained on 6,000 photos), else the
    demo's best model (753 photos), else a one-line error saying how to make either."""
    try:
        return best_run(benchmark)[0]
    except FnemmError:
        pass
    from fnemm_studies.demo import best_model
    run = Path(demo) / best_model(demo) / "seed-0"
    if (run / "best.pt").is_file():
        return run
    raise FnemmError(f"no trained model in {benchmark} or {demo}: run `make demo` (minutes) or "
                     f"`make flickr8k` (the benchmark, days on a CPU) first, or pass MODEL_RUN=RUN")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("flickr8k", "photos"):
        print("usage: python -m fnemm_studies.pick {flickr8k,photos} BENCHMARK_OUT", file=sys.stderr)
        return 2
    try:
        if argv[0] == "flickr8k":
            print(*best_run(argv[1]))
        else:
            print(photo_model(argv[1]))
    except FnemmError as e:
        print(f"fnemm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
