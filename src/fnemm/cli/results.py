"""fnemm evaluate | report: what trained runs score, one run or many side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fnemm.cli import add_common, add_data
from fnemm.io.errors import FnemmError


def add_evaluate(sub) -> argparse.ArgumentParser:
    from fnemm.eval import PROTOCOLS
    p = sub.add_parser("evaluate", help="recall@K and ranks of a trained model",
                       description="Image annotation (i2t) and image retrieval (t2i): R@1/5/10, "
                                   "median and mean rank, rsum. Writes metrics-SPLIT.json to the run folder.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder (or seeds folder) or its best.pt")
    add_data(p, required=True, default="the one each run was trained on, where it still is")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default="auto", metavar="|".join(PROTOCOLS),
                   help="auto (default): the whole split, or on a 5,000-image split (MSCOCO) the paper's "
                        "first 1K; also 1k, 5fold, 5k, all, or several comma-separated, e.g. 1k,5fold,5k")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (keyed by protocol)")
    p.add_argument("--out", "--output", dest="output", metavar="FILE",
                   help="where to write the metrics (default: metrics-SPLIT.json next to the checkpoint)")
    add_common(p)
    return p


def evaluate(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.eval.metrics import format_metrics
    from fnemm.training.folders import metrics_path
    from fnemm.training.runs import evaluate_runs
    if args.output:                                     # said now, not after the evaluation
        from fnemm.io.files import make_folder
        if Path(args.output).is_dir():
            raise FnemmError(f"--output {args.output}: a folder; give the path of the JSON file to write")
        make_folder(Path(args.output).parent, writing=args.output)
    every = evaluate_runs(args.checkpoint, args.dataset and load_dataset(args.dataset), args.features, args.split,
                          args.protocol, args.device, ids=args.ids, output=args.output)
    if args.json:
        rounded = {run: {p: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                         for p, m in res.items()} for run, res in every.items()}
        print(json.dumps(rounded if len(rounded) > 1 else next(iter(rounded.values())), indent=2))
        return 0
    from fnemm.eval.metrics import chance_rsum
    chance = {}
    for run, results in every.items():
        for name, m in results.items():
            label = f"{name}: {m['images']} images" if "images" in m else name
            label += f", {m['captions']} captions" if "captions" in m else ""
            print(f"{args.split} [{label}] {format_metrics(m)}" + (f"  ({Path(run).name})" if len(every) > 1 else ""))
            if "images" in m and "captions" in m:
                shape = (int(m["images"]), max(1, round(m["captions"] / m["images"])))
                if shape not in chance:
                    chance[shape] = chance_rsum(*shape)
                    print(f"  chance on {shape[0]} images x {shape[1]} captions (random embeddings): rsum "
                          f"{chance[shape][0]:.1f} ± {chance[shape][1]:.1f}")
                level, spread = chance[shape]
                if m["rsum"] <= level + 2 * spread:
                    print(f"  this model is at chance: rsum {m['rsum']:.1f} is within 2 std of chance's {level:.1f}")
            if m.get("seen_in_training"):
                print(f"  not held-out: {m['seen_in_training']} of the {args.split} images it ranked are among those "
                      f"it was trained on")
            if m.get("seen_in_validation"):
                print(f"  optimistic: {m['seen_in_validation']} of the {args.split} images it ranked chose its best "
                      f"epoch (the validation images); the test split is the held-out one")
            if m.get("unfinished"):
                print("  unfinished: the run has not trained to its end; this is its best model so far")
        folder = Path(run) if Path(run).is_dir() else Path(run).parent
        print(f"written: {args.output or metrics_path(folder, args.split)}")
    return 0


def add_report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="paper-style table and plots from evaluated runs",
                       description="One row per run folder (mean ± std when it holds seed-N/ runs), "
                                   "optionally beside the paper's numbers; markdown, and a PNG of the "
                                   "validation rsum per epoch with --out.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders evaluated with `fnemm evaluate` "
                                                          "(NAME=RUN: shown as NAME)")
    p.add_argument("--split", default="test", help="which metrics-SPLIT.json to read (default test)")
    p.add_argument("--paper", choices=["flickr8k", "flickr30k", "coco"],
                   help="add the paper's rows for the pipelines reported")
    p.add_argument("--baseline", metavar="RUN", help="compare every run with this one (a RUN, or the NAME of a "
                                                     "NAME=RUN; paired over the test images; default: the FC7 run "
                                                     "among FNE ones)")
    p.add_argument("--out", metavar="DIR", help="write report.md and val_rsum.png there")
    return p


def report(args) -> int:
    from fnemm.io.files import atomic_write_text
    from fnemm_studies.report import default_baseline, load_run, markdown_table, plot_curves, verdict
    from dataclasses import replace

    def named(arg: str):
        """RUN, or NAME=RUN: the run under a name of the caller's."""
        name, sep, path = arg.partition("=")
        if sep and name and "/" not in name and not Path(arg).exists():
            return replace(load_run(path, args.split), label=name)
        return load_run(arg, args.split)

    if args.out:
        from fnemm.io.files import make_folder
        make_folder(args.out)               # a file in the way is said now, not after the table
    runs = [named(r) for r in args.runs]
    if args.baseline:
        a_path = Path(args.baseline).exists()
        base_path = args.baseline.partition("=")[2] if "=" in args.baseline and not a_path else args.baseline
        given = [r for r in runs if r.path.resolve() == Path(base_path).resolve()
                 or (r.label == args.baseline and not a_path)]       # a NAME given to a RUN
        if not given and not a_path and not Path(base_path).exists():
            raise FnemmError(f"--baseline {args.baseline}: neither the NAME of a run here "
                             f"({', '.join(r.label for r in runs)}) nor a run folder")
        baseline = given[0] if given else named(args.baseline)
        if not given:
            runs.append(baseline)
    else:
        baseline = default_baseline(runs)
    shown: dict[str, Path] = {}             # each row's label names one run: the table, verdict and plot by it
    for run in runs:
        if shown.setdefault(run.label, run.path) != run.path:
            raise FnemmError(f"{shown[run.label]} and {run.path} would both be shown as {run.label}: name them, "
                             f"as in `fnemm report A={shown[run.label]} B={run.path}`")
    table = markdown_table(runs, args.paper, baseline)
    said = verdict(runs, baseline)
    print(table + (f"\n\n{said}" if said else ""))
    if args.out:
        out = Path(args.out)
        plot = plot_curves(runs, out / "val_rsum.png")
        atomic_write_text(out / "report.md", f"# fnemm report ({args.split})\n\n{table}\n\n{said}\n\n"
                                             f"![validation rsum per epoch]({plot.name})\n")
        print(f"written: {out / 'report.md'}, {plot}")
    return 0


COMMANDS = [(add_evaluate, evaluate), (add_report, report)]
