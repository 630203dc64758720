"""fnemm demo | stability | study: programs built on runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from fnemm.cli import add_common, add_data, at_least_one
from fnemm.io.errors import FnemmError


def add_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="the whole method on the bundled Flickr8K photos (make demo)",
                       description="flickr8k-1k -> MobileNetV2 FNE (10 crops) -> FNE-MH, FC7-MH, FNE-POE "
                                   "(demo/ presets) -> test recall@K -> OUT/report.md with plots. "
                                   "Re-running reuses every finished stage.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="default runs/demo")
    p.add_argument("--dataset", "--data", dest="data", metavar="DIR",
                   help="the Flickr8K folder with its images/ (default ../shared/data/flickr8k)")
    p.add_argument("--seeds", type=int, default=1, help="runs per model (default 1)")
    p.add_argument("--workers", type=int, default=1, help="image-decoding processes (default 1)")
    add_common(p)
    return p


def demo(args) -> int:
    from fnemm_studies.demo import run_demo
    at_least_one("--seeds", args.seeds)
    run_demo(args.out, args.data, seeds=args.seeds, workers=args.workers, quiet=args.quiet)
    return 0


def add_stability(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("stability", help="the paper's MOE stability study (Table 5) on any dataset",
                       description="Train each Table 5 configuration (order similarity, max of hinges, "
                                   "word dim 300, joint dim 1,024, <= 200 epochs) with several seeds and "
                                   "count the runs whose validation rsum ever exceeds 10 (the paper's; "
                                   "on fewer than 1,000 validation images, 10 std above chance).")
    add_data(p, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="runs go to DIR/ROW/seed-K; table5.md too")
    p.add_argument("--seeds", type=int, default=5, help="runs per configuration (default 5, as the paper)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows, e.g. FNE-MOE-abs FC7-MOE-bl")
    p.add_argument("--epochs", type=int, help="max epochs (default 200)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change any other value, e.g. model.embed_dim=512")
    add_common(p)
    return p


def stability(args) -> int:
    from fnemm.joint.checkpoint import resolve_device
    from fnemm.datasets import load_dataset
    from fnemm.io.files import atomic_write_json, atomic_write_text
    from fnemm_studies.stability import format_study, run_study, select
    at_least_one("--seeds", args.seeds)
    if args.ids:
        raise FnemmError("stability needs a feature store (both fne and fc7 arrays); --ids is for a plain .npy")
    device = resolve_device(args.device)
    if args.epochs is not None:
        at_least_one("--epochs", args.epochs)            # 0 read as "not given" trained all 200 epochs
    overrides = list(args.overrides) + ([f"stages.max_epochs={args.epochs}"] if args.epochs is not None else [])
    results = run_study(load_dataset(args.dataset), args.features, args.out, args.seeds, select(args.rows),
                        overrides, device, args.quiet)
    table = format_study(results)
    out = Path(args.out)
    atomic_write_json(out / "table5.json", results)
    atomic_write_text(out / "table5.md", table + "\n")
    print(table)
    return 0


def add_study(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("study", help="when does the FNE pay off? variants x CNNs x re-splits x seeds, "
                                     "with paired statistics",
                       description="Train every image-feature variant (layers, post-processing, "
                                   "regularisation) with every CNN on several re-splits and seeds, and "
                                   "compare each with the baseline and with the paper's FNE on the same "
                                   "splits and seeds (95% intervals, paired t-test over splits). Writes "
                                   "OUT/study.md and OUT/study.png; re-running resumes; several processes "
                                   "on one OUT share the runs.")
    p.add_argument("--dataset", action="append", metavar="PATH",
                   help="captions and splits (default flickr8k-1k, the bundled photos)")
    p.add_argument("--images", metavar="DIR", help="the images (default: the bundled Flickr8K photos)")
    p.add_argument("--out", default="runs/study", metavar="DIR", help="default runs/study")
    p.add_argument("--quick", action="store_true",
                   help="a grid that runs in minutes on a CPU: MobileNetV2, 1 crop, 300 images, "
                        "baseline/fne/fne-late, 2 splits, 8 epochs")
    p.add_argument("--cnns", help="comma-separated (default mobilenet_v2,efficientnet_lite0)")
    p.add_argument("--variants", help="comma-separated (default: all; `fnemm study --list` shows them)")
    p.add_argument("--splits", type=int, help="re-splits, the first the dataset's own (default 5)")
    p.add_argument("--seeds", type=int, help="seeds per split (default 3)")
    p.add_argument("--train-sizes", metavar="N,N", help="learning curve: also train on N training images")
    p.add_argument("--curve-variants", metavar="A,B", help="variants of the learning curve (default baseline,fne)")
    p.add_argument("--curve-cnns", metavar="A,B", help="CNNs of the learning curve (default: every --cnns)")
    p.add_argument("--curve-seeds", type=int, help="seeds of the curve's smaller sizes (default: --seeds)")
    p.add_argument("--presets", metavar="FAMILY",
                   help="the pipeline every variant trains: FAMILY/FNE-MH, the baseline FAMILY/FC7-MH; demo "
                        "(default: Table 1 scaled to a few thousand images) or the paper's flickr8k, flickr30k, coco")
    p.add_argument("--patience", type=int, metavar="N",
                   help="end every training stage after N epochs without a better validation rsum, not counting "
                        "epochs on the loss plateau where max-of-hinges runs start (the paper's presets run their "
                        "full epochs otherwise: days on a CPU)")
    p.add_argument("--epochs", type=int, help="cap every run's epochs")
    p.add_argument("--max-images", type=int, help="use about this many images of the dataset")
    p.add_argument("--crops", type=int, choices=[1, 10], help="crops per image (default 10)")
    p.add_argument("--workers", type=int, default=1, help="image-decoding processes (default 1)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: summarise the runs finished so far (e.g. while workers run)")
    p.add_argument("--export", metavar="DIR",
                   help="with --report-only: also copy the study's records (report, each finished run's "
                        "config, history, test metrics and ranks; no weights or features) into DIR, with their "
                        "sha256 in DIR/records.json, from which --out DIR --report-only redraws the report")
    p.add_argument("--carry", metavar="DIR",
                   help="first copy into --out the grid's finished runs in an exported study (DIR: what --export "
                        "wrote, e.g. results/flickr8k-224) that --out has no folder for and that were trained with "
                        "the configs this grid gives them, each record checked against DIR/records.json first: a "
                        "grid continued on a new machine trains only what is left")
    add_common(p)
    return p


def study(args) -> int:
    from dataclasses import replace

    from fnemm.joint.checkpoint import resolve_device
    from fnemm.datasets import load_dataset
    from fnemm_studies.study import QUICK, VARIANTS, Grid, Study
    if args.export and not args.report_only:
        raise FnemmError("--export DIR copies a study's records: give it with --report-only (after, or while, "
                         "the runs train)")
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:<22} {v.about}")
        return 0
    for flag in ("splits", "seeds", "epochs", "crops", "max_images", "curve_seeds", "patience"):
        if getattr(args, flag) is not None:                  # 0 would read as "the default" further in
            at_least_one(f"--{flag.replace('_', '-')}", getattr(args, flag))
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset or "flickr8k-1k")
    images = Path(args.images) if args.images else dataset.images
    if images is None:
        raise FnemmError(f"--images DIR: where the images of {dataset.name} are (only the bundled "
                         f"flickr8k-1k and flickr8k-224 know theirs)")

    def names(text):
        return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None

    try:
        sizes = tuple(int(n) for n in names(args.train_sizes)) if args.train_sizes else None
    except ValueError:
        raise FnemmError(f"--train-sizes {args.train_sizes}: expected numbers, e.g. 250,500") from None
    changes = {"cnns": names(args.cnns), "variants": names(args.variants), "splits": args.splits,
               "seeds": args.seeds, "epochs": args.epochs, "crops": args.crops, "max_images": args.max_images,
               "train_sizes": sizes, "curve_variants": names(args.curve_variants),
               "curve_cnns": names(args.curve_cnns), "curve_seeds": args.curve_seeds, "presets": args.presets,
               "patience": args.patience}
    grid = replace(QUICK if args.quick else Grid(), **{k: v for k, v in changes.items() if v is not None})
    study = Study(dataset, images, Path(args.out), grid, device, args.workers, args.quiet)
    if args.carry:
        from fnemm_studies.records import carry_records
        carried, other = carry_records(study, args.carry)
        left = (f"; {len(other)} left there, trained with another config than this grid gives them "
                f"(e.g. {other[0]})" if other else "")
        print(f"{carried} finished runs' records carried from {args.carry} -> {args.out}{left}")
    summary = study.run(train=not args.report_only)
    finished, total = (sum(counts) for counts in zip(*summary["progress"].values()))
    started = study.started()
    going = "; started, not finished: " + ", ".join(f"{u.cnn} n{u.size} {u.variant.name} split {u.split} seed {u.seed} "
                                          f"(epoch {epochs})" for u, epochs in started) if started else ""
    print(f"{finished} of the grid's {total} runs finished{going}; {len(summary['results'])} table rows; "
          f"report: {Path(args.out) / 'study.md'}")
    if args.export:
        from fnemm_studies.records import export_records
        print(f"{export_records(args.out, args.export)} runs' records -> {args.export}")
    return 0


COMMANDS = [(add_demo, demo), (add_stability, stability), (add_study, study)]
