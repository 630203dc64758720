"""The ``fnemm`` command: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fnemm.errors import FnemmError
from fnemm.extraction import ExtractConfig
from fnemm.recipe import POSTS

EPILOG_TRAIN = """\
examples:
  fnemm train --preset flickr8k/FNE-MH --dataset data/flickr8k --features feats/ --out runs/fne-mh
  fnemm train --preset flickr8k/FC7-MH --dataset data/flickr8k --features feats/ --out runs/fc7-mh
  fnemm train --preset flickr30k/FNE-POE --dataset dataset_flickr30k.json \\
      --features f30k.npy --ids f30k.ids.txt --out runs/poe --set model.embed_dim=512
  fnemm train --out runs/fne-mh --resume          # continue an interrupted run exactly

--dataset takes a Flickr folder (token file + split lists), Karpathy's dataset_*.json,
COCO captions_*.json files (repeat --dataset; prefix SPLIT= when the name does not
say it), or a .jsonl of {"image", "captions", "split"} lines.
--features takes a feature store folder (from `fnemm extract`) or a plain .npy
matrix (rows = images) with --ids FILE (one image id per row).
Any preset value can be changed with --set KEY=VALUE (see `fnemm presets --show NAME`
for the keys), e.g. --set stages.0.lr=1e-3, --set stages.max_epochs=50 (all stages).
"""


EPILOG_EXTRACT = """\
examples:
  fnemm extract --images ../shared/data/flickr8k/images --dataset ../shared/data/flickr8k \\
      --cnn mobilenet_v2 --out feats/flickr8k-mnv2
  fnemm extract --images Flicker8k_Dataset --dataset dataset_flickr8k.json \\
      --cnn vgg16 --weights vgg16-397923af.pth --out feats/flickr8k-vgg16
  fnemm extract --images new_photos/ --stats feats/flickr8k-vgg16 --cnn vgg16 \\
      --weights vgg16-397923af.pth --out feats/new      # standardised like the training set

Writes to --out: raw.npy (crop-averaged activations of every tapped layer, float16),
stats.npy (mean and std over the training images), fne.npy (int8 {-1,0,1}),
fc7.npy (the baseline layer, L2-normalised) and manifest.json (image ids, CNN,
weights sha256, taps and their columns, crops, thresholds, skipped images).
Interrupted? Run the same command again: it continues where it stopped. Run it
again with other --layers, --post, --thresholds or training images and only the
assembly from raw.npy is redone (seconds), never the forward pass.
--cnn also takes package.module:function, a builder returning a fnemm.cnn.TappedCNN.
"""


EPILOG_INDEX = """\
examples:
  fnemm index build --checkpoint runs/demo/FNE-MH/seed-0 --features runs/demo/features \\
      --dataset flickr8k-1k --out runs/demo/index
  fnemm serve --index runs/demo/index            # then open http://127.0.0.1:8000/
  fnemm search --index runs/demo/index --text "a dog runs on the beach"
  curl -s localhost:8000/search/text -H 'content-type: application/json' \\
      -d '{"query": "a dog runs on the beach", "k": 5}'
  curl -s localhost:8000/search/image -F file=@photo.jpg -F k=5

The index folder records the sha256 of the checkpoint and of the feature store's
manifest; loading it refuses either if it changed (rebuild with the same command).
Re-running the build with the same inputs and options keeps the index as is.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _add_data(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--dataset", action="append", required=required, metavar="PATH",
                   help="captions and splits (see below); repeat for several COCO captions files")
    p.add_argument("--features", required=required, metavar="PATH",
                   help="feature store folder, or a .npy matrix (with --ids)")
    p.add_argument("--ids", metavar="FILE", help="image ids of a .npy feature matrix, one per row")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnemm",
        description="Image-caption retrieval with the Full-Network Embedding "
                    "(Vilalta et al. 2019): extract image features, train, evaluate, report and search.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("extract", help="Full-Network Embedding features of a folder of images",
                       description="Run every image through a pretrained CNN (10 crops), pool every "
                                   "tapped layer, standardise with training-split statistics and "
                                   "discretise: the Full-Network Embedding, plus the FC7 baseline.",
                       epilog=EPILOG_EXTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, metavar="DIR", help="folder holding the image files")
    p.add_argument("--dataset", action="append", metavar="PATH",
                   help="which images, and the training split for the statistics (as for train)")
    p.add_argument("--train-list", metavar="FILE",
                   help="without --dataset: every image under --images, statistics from the ones "
                        "named in FILE (one file name per line)")
    p.add_argument("--stats", metavar="STORE", help="standardise with this feature store's statistics "
                                                    "instead (e.g. a gallery of new images)")
    p.add_argument("--cnn", default="mobilenet_v2", help="vgg16, mobilenet_v2, mobilenet_v2_float or "
                                                          "package.module:function (default: mobilenet_v2)")
    p.add_argument("--weights", metavar="FILE", help="CNN weights (vgg16: a torchvision .pth or Keras .h5; "
                                                     "mobilenet_v2: the bundled .tflite by default)")
    p.add_argument("--out", required=True, metavar="DIR", help="feature store folder")
    p.add_argument("--crops", type=int, default=10, choices=[1, 10], help="10 (default) or 1 (centre)")
    p.add_argument("--layers", default="paper", metavar="SPEC",
                   help="which layers: groups (all, paper, late, blocks, lastN%%), names, globs, "
                        "START:STOP ranges, !ITEM to leave out; comma-separated (default: paper = "
                        "every layer but the classifier's scores; `fnemm layers` lists them)")
    p.add_argument("--post", default="fne", choices=POSTS,
                   help="post-processing: fne (the paper: z-score, thresholds, {-1,0,1}), zscore, "
                        "zscore-layer-l2, center, center-layer, layer-l2, l2 (default fne)")
    p.add_argument("--thresholds", default="-0.25,0.15", metavar="LOW,HIGH",
                   help="discretisation thresholds on the z-scores (default: -0.25,0.15)")
    p.add_argument("--clip", type=float, default=3.0, help="--post zscore: clip at +-CLIP (default 3)")
    p.add_argument("--pca", type=int, default=0, metavar="N",
                   help="project on the top N principal components of the training images (default: off)")
    p.add_argument("--with-baseline", action="store_true",
                   help="append the L2 baseline layer to the features")
    p.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size,
                   help=f"images per forward pass (default {ExtractConfig.batch_size})")
    p.add_argument("--chunk-size", type=int, default=256, help="images per resumable chunk (default 256)")
    p.add_argument("--workers", type=int, default=1, help="image-decoding processes (default 1; 0: none)")
    _add_common(p)

    p = sub.add_parser("search", help="text -> images or image -> captions with a trained model",
                       description="Rank the images of a feature store for a sentence (--text), or the "
                                   "captions of a dataset for a photo (--image: a file, embedded through "
                                   "the store's CNN and statistics, or an image id of the store).")
    p.add_argument("--checkpoint", metavar="RUN", help="run folder or best.pt")
    p.add_argument("--features", metavar="STORE", help="the gallery's feature store")
    p.add_argument("--index", metavar="DIR", help="instead of --checkpoint/--features/--dataset: an index "
                                                  "folder from `fnemm index build` (faiss; scales to millions)")
    p.add_argument("--dataset", action="append", metavar="PATH",
                   help="captions (needed for --image) and splits (for --split)")
    p.add_argument("--split", default="all", help="restrict the gallery to a split: train, val, test "
                                                  "or all (default)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a sentence, e.g. \"a dog runs on the beach\"")
    query.add_argument("--image", help="a photo file, or an image id of the store")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(p)

    p = sub.add_parser("train", help="train a joint embedding from a preset",
                       description="Train one of the paper's pipelines on image features + captions. "
                                   "Writes config.json, best.pt, last.pt and metrics.jsonl to --out.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="e.g. flickr8k/FNE-MH (list: fnemm presets)")
    _add_data(p, required=False)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train N runs with seeds seed..seed+N-1 into OUT/seed-K/ (report aggregates them)")
    p.add_argument("--checkpoint-every", type=float, default=120.0, metavar="SECONDS",
                   help="write last.pt (for --resume) at most this often; 0 = every epoch (default 120)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config value (repeatable)")
    p.add_argument("--epochs", type=int, help="max epochs of every stage")
    p.add_argument("--lr", type=float, help="learning rate of every stage")
    p.add_argument("--margin", type=float, help="hinge margin of every stage")
    p.add_argument("--patience", type=int, help="early stop: epochs without a better val rsum")
    p.add_argument("--embed-dim", type=int, help="joint embedding size")
    p.add_argument("--word-dim", type=int, help="word embedding size")
    p.add_argument("--batch-size", type=int, help="pairs per batch (default 128)")
    p.add_argument("--layer-norm", action="store_true", help="layer-normalised GRU")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    _add_common(p)

    p = sub.add_parser("evaluate", help="recall@K and ranks of a trained model",
                       description="Image annotation (i2t) and image retrieval (t2i): R@1/5/10, "
                                   "median and mean rank, rsum. Writes metrics-SPLIT.json to the run folder.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder or its best.pt")
    _add_data(p, required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default="auto", choices=["auto", "all", "1k", "5fold", "5k"],
                   help="auto: the whole split, plus MSCOCO's 1K and 5-fold 1K when it has 5,000 images")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--output", metavar="FILE", help="where to write the metrics (default: next to the checkpoint)")
    _add_common(p)

    p = sub.add_parser("report", help="paper-style table and plots from evaluated runs",
                       description="One row per run folder (mean ± std when it holds seed-N/ runs), "
                                   "optionally beside the paper's numbers; markdown, and a PNG of the "
                                   "validation rsum per epoch with --out.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders evaluated with `fnemm evaluate`")
    p.add_argument("--split", default="test", help="which metrics-SPLIT.json to read (default test)")
    p.add_argument("--paper", choices=["flickr8k", "flickr30k", "coco"], help="add the paper's rows")
    p.add_argument("--out", metavar="DIR", help="write report.md and val_rsum.png there")

    p = sub.add_parser("stability", help="the paper's MOE stability study (Table 5) on any dataset",
                       description="Train each Table 5 configuration (order similarity, max of hinges, "
                                   "word dim 300, joint dim 1,024, <= 200 epochs) with several seeds and "
                                   "count the runs whose validation rsum ever exceeds 10.")
    _add_data(p, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="runs go to DIR/ROW/seed-K; table5.md too")
    p.add_argument("--seeds", type=int, default=5, help="runs per configuration (default 5, as the paper)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows, e.g. FNE-MOE-abs FC7-MOE-bl")
    p.add_argument("--epochs", type=int, help="max epochs (default 200)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change any other value, e.g. model.embed_dim=512")
    _add_common(p)

    p = sub.add_parser("index", help="build a search index of a gallery (for `fnemm serve`)",
                       description="Embed a gallery with a trained checkpoint into a faiss index folder.",
                       epilog=EPILOG_INDEX, formatter_class=argparse.RawDescriptionHelpFormatter)
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = isub.add_parser("build", help="checkpoint + feature store (+ captions) -> index folder",
                        description="Embed the gallery's images (and, with --dataset, their captions) "
                                    "with a trained checkpoint into an index folder: exact inner product "
                                    "up to --threshold vectors, HNSW or IVF above; approximate search "
                                    "parameters tuned to --target-recall and the recall reported.",
                        epilog=EPILOG_INDEX, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--checkpoint", required=True, metavar="RUN", help="run folder or best.pt")
    b.add_argument("--features", required=True, metavar="STORE", help="the gallery's feature store (or .npy + --ids)")
    b.add_argument("--ids", metavar="FILE", help="image ids of a .npy feature matrix, one per row")
    b.add_argument("--dataset", action="append", metavar="PATH",
                   help="captions of the gallery (for image -> caption search) and splits (for --split)")
    b.add_argument("--split", default="all", help="index only this split's images (default all)")
    b.add_argument("--out", required=True, metavar="DIR", help="the index folder to write")
    b.add_argument("--method", default="auto", choices=["auto", "exact", "hnsw", "ivf"],
                   help="auto (default): exact up to --threshold vectors, HNSW above")
    b.add_argument("--threshold", type=int, default=100_000, help="auto's exact/approximate switch (default 100000)")
    b.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 vs exhaustive search that tuning reaches with 95%% confidence "
                        "(default 0.95)")
    b.add_argument("--tune-queries", metavar="FILE",
                   help="sentences to tune the image side on, one per line (default: the dataset's "
                        "captions; without captions, the images themselves)")
    _add_common(b)

    p = sub.add_parser("serve", help="HTTP search service and web page over an index folder",
                       description="Serve an index folder: POST /search/text, POST /search/image, "
                                   "GET /images/{id}, GET /healthz, the search page at /, API docs at /docs.",
                       epilog=EPILOG_INDEX, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, metavar="DIR", help="from `fnemm index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--checkpoint", metavar="RUN", help="where the index's checkpoint is now, if it moved")
    p.add_argument("--features", metavar="STORE", help="where the index's feature store is now, if it moved")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest photo upload (default 10 MiB)")
    _add_common(p)

    p = sub.add_parser("demo", help="the whole method on the bundled Flickr8K photos (make demo)",
                       description="flickr8k-1k -> MobileNetV2 FNE (10 crops) -> FNE-MH, FC7-MH, FNE-POE "
                                   "(demo/ presets) -> test recall@K -> OUT/report.md with plots. "
                                   "Re-running reuses every finished stage.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="default runs/demo")
    p.add_argument("--data", metavar="DIR", help="the Flickr8K folder (default ../shared/data/flickr8k)")
    p.add_argument("--seeds", type=int, default=1, help="runs per model (default 1)")
    p.add_argument("--workers", type=int, default=1, help="image-decoding processes (default 1)")
    _add_common(p)

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
    p.add_argument("--epochs", type=int, help="cap every run's epochs")
    p.add_argument("--max-images", type=int, help="use about this many images of the dataset")
    p.add_argument("--crops", type=int, choices=[1, 10], help="crops per image (default 10)")
    p.add_argument("--workers", type=int, default=1, help="image-decoding processes (default 1)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    _add_common(p)

    p = sub.add_parser("layers", help="a CNN's layers, groups and what --layers selects",
                       description="List the tapped layers of a CNN (position, name, kind, width) and "
                                   "its layer groups; with --layers, mark the ones that spec selects.")
    p.add_argument("--cnn", default="mobilenet_v2", help="a registered CNN (default mobilenet_v2)")
    p.add_argument("--weights", metavar="FILE", help="weights (not needed to list VGG16's layers)")
    p.add_argument("--layers", metavar="SPEC", help="mark what this --layers spec selects")

    p = sub.add_parser("presets", help="list the paper's pipelines as presets",
                       description="Every Table-1 variant for flickr8k / flickr30k / coco, FNE and FC7; demo/ = the flickr8k ones scaled to flickr8k-1k on a CPU.")
    p.add_argument("--family", choices=["flickr8k", "flickr30k", "coco", "demo"], help="only this dataset family")
    p.add_argument("--show", metavar="NAME", help="print one preset's full config as JSON")
    return parser


# --- commands -------------------------------------------------------------------

def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise FnemmError(f"{flag} {value}: expected at least 1")


def _read_lines(flag: str, path: str, what: str) -> list[str]:
    """The non-blank lines of a list file given to ``flag``, stripped; a missing or
    empty file is a one-line error naming it."""
    file = Path(path)
    if not file.is_file():
        raise FnemmError(f"{flag} {file}: no such file; give a text file of {what}, one per line")
    lines = [line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()]
    if not any(lines):
        raise FnemmError(f"{flag} {file}: no {what} in it; one per line")
    return [line for line in lines if line]


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    for flag, key in (("epochs", "stages.max_epochs"), ("lr", "stages.lr"), ("margin", "stages.margin"),
                      ("patience", "stages.patience"), ("embed_dim", "model.embed_dim"),
                      ("word_dim", "model.word_dim"), ("batch_size", "batch_size"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.layer_norm:
        out.append("model.layer_norm=true")
    return out


def _train_one(args, out: Path, seed_override: str | None) -> dict:
    from fnemm import config as cfg
    from fnemm.datasets import load_dataset
    from fnemm.features import load_features
    from fnemm.train import train

    overrides = _overrides(args) + ([seed_override] if seed_override else [])
    run_json = out / "run.json"
    if args.resume and (out / "last.pt").exists():
        if args.preset or _overrides(args):
            raise FnemmError(f"{out}: --resume continues the saved config ({out / 'config.json'}); "
                             f"drop --preset/--set, or start a new --out")
        config = cfg.TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
        saved = json.loads(run_json.read_text()) if run_json.exists() else {}
        args.dataset = args.dataset or saved.get("args", {}).get("dataset")
        args.features = args.features or saved.get("args", {}).get("features")
        args.ids = args.ids or saved.get("args", {}).get("ids")
        preset = saved.get("preset")
    else:
        if not args.preset:
            raise FnemmError("--preset is required for a new run (e.g. flickr8k/FNE-MH; see `fnemm presets`)")
        config = cfg.apply_overrides(cfg.get_preset(args.preset), overrides)
        preset = args.preset
    if not args.dataset or not args.features:
        raise FnemmError("--dataset and --features are required")
    dataset = load_dataset(args.dataset)
    features = load_features(args.features, config.features, args.ids)
    if not args.quiet:
        print(dataset.summary(), file=sys.stderr)
        print(f"features: {features.source} [{features.kind}] {features.array.shape[0]} x {features.dim}",
              file=sys.stderr)
    info = {"preset": preset, "overrides": overrides,
            "args": {"dataset": [str(d) for d in args.dataset], "features": str(args.features),
                     "ids": args.ids}}
    summary = train(config, dataset, features, out, resume=args.resume, device=args.device,
                    quiet=args.quiet, run_info=info, checkpoint_every=args.checkpoint_every)
    from fnemm.metrics import format_metrics
    val = summary["val"]
    print(f"best epoch {summary['best_epoch']} of {summary['epochs']}: val "
          f"{format_metrics(val) if val else '(none)'}\ncheckpoint: {out / 'best.pt'}")
    return summary


def cmd_train(args) -> int:
    from fnemm.train import resolve_device
    resolve_device(args.device)          # fail before any slow loading
    out = Path(args.out)
    if args.seeds is None:
        _train_one(args, out, None)
        return 0
    _at_least_one("--seeds", args.seeds)
    first = args.seed if args.seed is not None else 0
    rsums = []
    for k in range(args.seeds):
        if not args.quiet:
            print(f"--- seed {first + k} ({k + 1} of {args.seeds}) -> {out / f'seed-{k}'}", file=sys.stderr)
        summary = _train_one(args, out / f"seed-{k}", f"seed={first + k}")
        rsums.append(summary["val"]["rsum"] if summary["val"] else float("nan"))
    import numpy as np
    print(f"{args.seeds} seeds: best val rsum {np.mean(rsums):.1f} ± {np.std(rsums, ddof=1) if len(rsums) > 1 else 0:.1f} "
          f"({', '.join(f'{r:.1f}' for r in rsums)})")
    return 0


def cmd_evaluate(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.metrics import format_metrics
    from fnemm.train import evaluate

    from fnemm.report import metrics_path, save_metrics, seed_dirs
    dataset = load_dataset(args.dataset)
    ckpt = Path(args.checkpoint)
    runs = seed_dirs(ckpt) if ckpt.is_dir() and not (ckpt / "best.pt").exists() else [ckpt]
    if len(runs) > 1 and args.output:
        raise FnemmError(f"{ckpt}: holds {len(runs)} seeds; --output names one file, leave it out")
    every = {}
    for run in runs:
        results = evaluate(run, dataset, args.features, args.split, args.protocol, args.device, ids=args.ids)
        target = Path(args.output) if args.output else metrics_path(run if run.is_dir() else run.parent, args.split)
        save_metrics(target, args.split, run, results)
        every[str(run)] = results
        if not args.json:
            for name, m in results.items():
                label = f"{name} images" if name.isdigit() else name
                print(f"{args.split} [{label}] {format_metrics(m)}" + (f"  ({run.name})" if len(runs) > 1 else ""))
            print(f"written: {target}")
    if args.json:
        print(json.dumps(every if len(runs) > 1 else results, indent=2))
    return 0


def cmd_report(args) -> int:
    from fnemm.fileio import atomic_write_text
    from fnemm.report import load_run, markdown_table, plot_curves
    runs = [load_run(r, args.split) for r in args.runs]
    table = markdown_table(runs, args.paper)
    print(table)
    if args.out:
        out = Path(args.out)
        plot = plot_curves(runs, out / "val_rsum.png")
        atomic_write_text(out / "report.md", f"# fnemm report ({args.split})\n\n{table}\n\n"
                                             f"![validation rsum per epoch]({plot.name})\n")
        print(f"written: {out / 'report.md'}, {plot}")
    return 0


def cmd_stability(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.fileio import atomic_write_json, atomic_write_text
    from fnemm.stability import format_study, run_study, select
    from fnemm.train import resolve_device
    _at_least_one("--seeds", args.seeds)
    if args.ids:
        raise FnemmError("stability needs a feature store (both fne and fc7 arrays); --ids is for a plain .npy")
    device = resolve_device(args.device)
    overrides = list(args.overrides) + ([f"stages.max_epochs={args.epochs}"] if args.epochs else [])
    results = run_study(load_dataset(args.dataset), args.features, args.out, args.seeds, select(args.rows),
                        overrides, device, args.quiet)
    table = format_study(results)
    out = Path(args.out)
    atomic_write_json(out / "table5.json", results)
    atomic_write_text(out / "table5.md", table + "\n")
    print(table)
    return 0


def cmd_demo(args) -> int:
    from fnemm.demo import run_demo
    _at_least_one("--seeds", args.seeds)
    run_demo(args.out, args.data, seeds=args.seeds, workers=args.workers, quiet=args.quiet)
    return 0


def cmd_presets(args) -> int:
    from fnemm.config import PRESETS, get_preset
    if args.show:
        print(get_preset(args.show).to_json())
        return 0
    head = f"{'preset':<22} {'loss':<8} {'sim':<6} {'embed':>5} {'word':>5} {'lr':<15} {'margin':>6} {'abs':<4} {'epochs':>6}"
    print(head)
    print("-" * len(head))
    for name, c in PRESETS.items():
        if args.family and not name.startswith(args.family + "/"):
            continue
        loss = "->".join(s.loss for s in c.stages)
        lr = "->".join(f"{s.lr:g}" for s in c.stages)
        print(f"{name:<22} {loss:<8} {c.model.similarity:<6} {c.model.embed_dim:>5} {c.model.word_dim:>5} "
              f"{lr:<15} {c.stages[0].margin:>6g} {'yes' if c.model.use_abs else 'no':<4} "
              f"{c.stages[0].max_epochs:>6}")
    return 0


def cmd_extract(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.extraction import extract
    from fnemm.recipe import Recipe
    from fnemm.train import resolve_device
    try:
        low, high = (float(v) for v in args.thresholds.split(","))
    except ValueError:
        raise FnemmError(f"--thresholds {args.thresholds!r}: expected LOW,HIGH, e.g. -0.25,0.15") from None
    dataset = load_dataset(args.dataset) if args.dataset else None
    train_list = _read_lines("--train-list", args.train_list, "image file names") if args.train_list else None
    recipe = Recipe(layers=args.layers, post=args.post, thresholds=(low, high), clip=args.clip, pca=args.pca,
                    baseline=args.with_baseline)
    config = ExtractConfig(cnn=args.cnn, weights=args.weights, crops=args.crops, recipe=recipe,
                           batch_size=args.batch_size, chunk_size=args.chunk_size, workers=args.workers,
                           device=str(resolve_device(args.device)))
    result = extract(args.images, args.out, dataset, config, stats_from=args.stats, train_list=train_list,
                     quiet=args.quiet)
    m = result.manifest
    fractions = ", ".join(f"{int(v):+d}: {f:.3f}" for v, f in m["fne_fractions"].items()) \
        if "fne_fractions" in m else m["arrays"]["fne"]["dtype"]
    print(f"{args.out}: {result.images} images, {len(m['layers'])} of {len(m['taps'])} layers of {m['cnn']} "
          f"({recipe.describe()}): {m['arrays']['fne']['shape'][1]} features ({fractions}), baseline "
          f"{m['baseline']['tap']} ({m['arrays']['fc7']['shape'][1]}-d); {result.skipped} skipped")
    for s in m["skipped"][:5]:
        print(f"  skipped {s['image']}: {s['reason']}")
    if len(m["skipped"]) > 5:
        print(f"  ... and {len(m['skipped']) - 5} more (listed in manifest.json)")
    if m.get("converted"):
        print(f"  {len(m['converted'])} non-RGB images converted to RGB (listed in manifest.json)")
    return 0


def cmd_search(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.search import Hit, Searcher, format_hits
    _at_least_one("-k", args.k)
    if args.index:
        if args.checkpoint or args.features or args.dataset or args.split != "all":
            raise FnemmError("--index holds the checkpoint, gallery and captions: drop --checkpoint, "
                             "--features, --dataset and --split (choose them at `fnemm index build`)")
        from fnemm.index import Gallery
        gallery = Gallery(args.index, device=args.device, encoder=args.image is not None)
        found = gallery.text(args.text, args.k) if args.text is not None else gallery.image(args.image, args.k)
        hits = [Hit(h["rank"], h["score"], h["image"], h.get("caption")) for h in found]
    else:
        if not (args.checkpoint and args.features):
            raise FnemmError("search needs --checkpoint RUN and --features STORE (or --index DIR)")
        dataset = load_dataset(args.dataset) if args.dataset else None
        searcher = Searcher(args.checkpoint, args.features, dataset, args.split, args.device)
        hits = searcher.text(args.text, args.k) if args.text is not None else searcher.image(args.image, args.k)
    if args.json:
        print(json.dumps({"query": {"text": args.text} if args.text is not None else {"image": args.image},
                          "results": [h.to_dict() for h in hits]}, indent=2))
    else:
        print(f"query: {args.text!r}" if args.text is not None else f"query: {args.image}")
        print(format_hits(hits))
    return 0


def cmd_index(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.index import build_index, describe_index
    _at_least_one("--threshold", args.threshold)
    dataset = load_dataset(args.dataset) if args.dataset else None
    tune = _read_lines("--tune-queries", args.tune_queries, "sentences") if args.tune_queries else None
    manifest = build_index(args.checkpoint, args.features, args.out, dataset, args.split, args.ids,
                           args.method, args.threshold, args.target_recall, args.device, args.quiet, tune)
    print(describe_index(manifest))
    print(f"index: {args.out} (built in {manifest['build_seconds']} s); serve it with: fnemm serve --index {args.out}")
    return 0


def cmd_serve(args) -> int:
    from fnemm.serve import serve
    if not 0 < args.port < 65536:
        raise FnemmError(f"--port {args.port}: expected 1..65535")
    if args.max_upload_mb <= 0:
        raise FnemmError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    serve(args.index, args.host, args.port, args.checkpoint, args.features, args.device,
          int(args.max_upload_mb * 1024 * 1024), args.quiet)
    return 0


def cmd_study(args) -> int:
    from dataclasses import replace

    from fnemm.datasets import load_dataset
    from fnemm.paths import find_data
    from fnemm.study import QUICK, VARIANTS, Grid, Study
    from fnemm.train import resolve_device
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:<22} {v.about}")
        return 0
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset or "flickr8k-1k")
    images = Path(args.images) if args.images else find_data("flickr8k/images")
    if images is None:
        raise FnemmError("--images DIR: where the dataset's images are (the bundled ones were not found)")
    grid = QUICK if args.quick else Grid()
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    changes = {"cnns": split(args.cnns) if args.cnns else None,
               "variants": split(args.variants) if args.variants else None,
               "splits": args.splits, "seeds": args.seeds, "epochs": args.epochs, "crops": args.crops,
               "max_images": args.max_images,
               "train_sizes": tuple(int(n) for n in split(args.train_sizes)) if args.train_sizes else None,
               "curve_variants": split(args.curve_variants) if args.curve_variants else None}
    grid = replace(grid, **{k: v for k, v in changes.items() if v is not None})
    summary = Study(dataset, images, Path(args.out), grid, device, args.workers, args.quiet).run()
    print(f"{len(summary['results'])} results; report: {Path(args.out) / 'study.md'}")
    return 0


def cmd_layers(args) -> int:
    from fnemm.cnn import build_cnn
    from fnemm.recipe import select_layers
    weights = args.weights or ("random" if args.cnn == "vgg16" else None)
    cnn = build_cnn(args.cnn, weights)
    names = [t.name for t in cnn.taps]
    picked = set(select_layers(args.layers, names, cnn.groups)) if args.layers else set()
    member = {n: [g for g, taps in cnn.groups.items() if n in taps and g not in ("all",)] for n in names}
    print(f"{'':2}{'#':>3}  {'layer':<28} {'kind':<5} {'width':>6}  groups")
    for k, t in enumerate(cnn.taps):
        mark = "*" if k in picked else " "
        print(f"{mark:2}{k:>3}  {t.name:<28} {t.kind:<5} {t.channels:>6}  {','.join(member[t.name])}")
    print(f"{len(names)} layers, {cnn.dim} features; baseline {cnn.baseline.name}")
    if args.layers:
        width = sum(cnn.taps[k].channels for k in picked)
        print(f"--layers {args.layers}: {len(picked)} layers, {width} features (marked *)")
    return 0


COMMANDS = {"extract": cmd_extract, "search": cmd_search, "train": cmd_train, "evaluate": cmd_evaluate,
            "report": cmd_report, "demo": cmd_demo, "index": cmd_index, "serve": cmd_serve,
            "stability": cmd_stability, "presets": cmd_presets, "study": cmd_study, "layers": cmd_layers}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except FnemmError as e:
        print(f"fnemm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fnemm: interrupted; a training run continues with `fnemm train --out DIR --resume`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
