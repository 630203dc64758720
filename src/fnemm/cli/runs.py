"""fnemm train | presets: making run folders (fnemm.cli.results reads them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fnemm.cli import add_common, add_data, recorded_inputs
from fnemm.io.errors import FnemmError

EPILOG_TRAIN = """\
examples:
  fnemm train --preset flickr8k/FNE-MH --dataset data/flickr8k --features feats/ --out runs/fne-mh
  fnemm train --preset flickr8k/FC7-MH --dataset data/flickr8k --features feats/ --out runs/fc7-mh
  fnemm train --preset flickr30k/FNE-POE --dataset dataset_flickr30k.json \\
      --features f30k.npy --ids f30k.ids.txt --out runs/poe --set model.embed_dim=512
  fnemm train --out runs/fne-mh --resume          # continue an interrupted run exactly
  fnemm train --out runs/seeds --seeds 3 --resume # every unfinished seed of a --seeds run

--dataset takes a Flickr folder (token file + split lists), Karpathy's dataset_*.json,
COCO captions_*.json files (repeat --dataset; prefix SPLIT= when the name does not
say it), a .jsonl of {"image", "captions", "split"} lines, a .csv of
image,caption[,split] rows (one row per caption; without splits they are drawn
80/10/10), or a bundled benchmark: flickr8k-1k, flickr8k-224 (the paper's Flickr8K),
flickr8k-224-all (and the release's 91 photos in no official list, as restval).
--features takes a feature store folder (from `fnemm extract`) or a plain .npy
matrix (rows = images) with --ids FILE (one image id per row).
Any preset value can be changed with --set KEY=VALUE (see `fnemm presets --show NAME`
for the keys), e.g. --set stages.0.lr=1e-3, --set stages.max_epochs=50 (all stages).
"""

SHORTCUTS = (("epochs", "stages.max_epochs"), ("lr", "stages.lr"), ("margin", "stages.margin"),
             ("patience", "stages.patience"), ("embed_dim", "model.embed_dim"), ("word_dim", "model.word_dim"),
             ("batch_size", "batch_size"), ("seed", "seed"))


def add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a joint embedding from a preset",
                       description="Train one of the paper's pipelines on image features + captions. "
                                   "Writes config.json, best.pt, last.pt and metrics.jsonl to --out.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="e.g. flickr8k/FNE-MH (list: fnemm presets)")
    p.add_argument("--config", metavar="FILE",
                   help="instead of --preset: a config file, the JSON `fnemm presets --show NAME` prints "
                        "(or YAML with PyYAML installed), edited as you like")
    add_data(p, required=False)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run (or every seed) in --out where it stopped")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train N runs with seeds seed..seed+N-1 into OUT/seed-K/ (report aggregates them)")
    p.add_argument("--checkpoint-every", type=float, default=120.0, metavar="SECONDS",
                   help="write last.pt (for --resume) and the best model so far (best.pt) at most this often, "
                        "and when a stage ends; 0 = every epoch (default 120)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config value (repeatable)")
    p.add_argument("--epochs", type=int, help="max epochs of every stage")
    p.add_argument("--lr", type=float, help="learning rate of every stage")
    p.add_argument("--margin", type=float, help="hinge margin of every stage")
    p.add_argument("--patience", type=int, help="early stop: epochs without a better val rsum (epochs whose loss "
                                                "is still on the plateau of equal scores do not count)")
    p.add_argument("--embed-dim", type=int, help="joint embedding size")
    p.add_argument("--word-dim", type=int, help="word embedding size")
    p.add_argument("--batch-size", type=int, help="pairs per batch (default 128)")
    p.add_argument("--layer-norm", action="store_true", help="layer-normalised GRU")
    from fnemm.joint.config import INITS           # no torch: config is plain dataclasses
    p.add_argument("--init", choices=INITS,
                   help="the caption GRU's initialisation: PyTorch's (default) or the paper's Theano code's "
                        "(orthogonal recurrent weights, input weights in +-0.1, zero biases)")
    p.add_argument("--image-bias", action="store_true",
                   help="a bias on the image map, as the authors' code has (the paper's equation has none)")
    p.add_argument("--clip", choices=["per-tensor", "global"],
                   help="gradient clipping: each parameter tensor to norm 2 (the authors', paper presets) "
                        "or one global norm (VSE++)")
    p.add_argument("--adam", choices=["standard", "authors"],
                   help="the optimiser: Adam as Kingma & Ba define it (torch's; default) or as the paper's Theano "
                        "code ran it (almost no bias correction: its first few thousand steps are up to 6.6x larger)")
    p.add_argument("--warmup", type=int, metavar="EPOCHS",
                   help="max-of-hinges pipelines: EPOCHS of sum-of-hinges training first, at the first stage's lr "
                        "and margin: off MH's starting plateau in a few epochs, but to a lower model (README: -7 and "
                        "-17 test rsum measured); not the paper's")
    p.add_argument("--curriculum", choices=["full", "patience"],
                   help="a curriculum's first stage: full (its max epochs, best kept: the authors') or "
                        "patience (ends after 20 epochs without a better val rsum)")
    p.add_argument("--restval", action="store_true",
                   help="MSCOCO: train on restval too (113,287 images; the paper uses train2014's 82,783)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    ft = p.add_argument_group("fine-tuning the CNN (VSE++)", "start from a converged FC7 run and train the CNN's "
                              "last blocks on the photos; then `fnemm extract --weights OUT/cnn.pt` for its "
                              "features (FNE included)")
    ft.add_argument("--finetune", metavar="RUN", help="the FC7 run (or seeds folder: every seed) to start from; "
                                                      "its config is the starting point (--set and shortcuts apply)")
    ft.add_argument("--finetune-cnn", metavar="CNN", help="the network to fine-tune (default: the start store's; "
                                                          "mobilenet_v2 must be named mobilenet_v2_float)")
    ft.add_argument("--finetune-blocks", type=int, metavar="N", help="the last N blocks train (default 2)")
    ft.add_argument("--cnn-lr-scale", type=float, metavar="X",
                    help="the CNN's learning rate = the stage's x X (default 0.1)")
    ft.add_argument("--train-bn", action="store_true", help="update the trained blocks' batch-norm statistics")
    ft.add_argument("--images", metavar="DIR", help="the photos (default: the folder the start store came from)")
    add_common(p)
    return p


def read_config(path: str):
    """A TrainConfig from a JSON (or YAML) file, every field checked."""
    from fnemm.joint.config import TrainConfig, validate
    from fnemm.io.files import read_json, text_of
    file = Path(path)
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise FnemmError(f"{file}: reading YAML needs PyYAML (pip install pyyaml); or give the JSON "
                             f"`fnemm presets --show NAME` prints") from None
        try:
            data = yaml.safe_load(text_of(file))
        except (OSError, yaml.YAMLError) as e:
            raise FnemmError(f"{file}: not readable YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise FnemmError(f"{file}: expected a mapping of config fields")
    else:
        data = read_json(file, "give the JSON `fnemm presets --show NAME` prints")
    import re
    try:
        config = TrainConfig.from_dict(data)
        validate(config)
    except (TypeError, AttributeError, FnemmError) as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        why = (f"unknown field {unknown.group(1)!r}" if unknown else str(e) if isinstance(e, FnemmError)
               else "a field of the wrong type")
        raise FnemmError(f"{file}: not a config ({why}); start from `fnemm presets --show NAME`") from None
    return config


def _overrides(args) -> list[str]:
    from fnemm.joint.presets import CURRICULUM_PATIENCE
    out = list(args.overrides)
    out += [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS if getattr(args, flag) is not None]
    if args.clip:
        out.append(f"grad_clip_mode={args.clip}")
    if args.adam:
        out.append(f"adam={args.adam}")
    if args.init:
        out.append(f"model.init={args.init}")
    if args.image_bias:
        out.append("model.image_bias=true")
    if args.curriculum:
        out.append(f"stages.0.patience={'none' if args.curriculum == 'full' else CURRICULUM_PATIENCE}")
    return out + (["model.layer_norm=true"] if args.layer_norm else [])


def train(args) -> int:
    from fnemm.joint.checkpoint import resolve_device
    from fnemm.joint.config import apply_overrides, with_warmup
    from fnemm.joint.presets import get_preset
    from fnemm.datasets import load_dataset
    from fnemm.features.store import load_features
    from fnemm.training.runs import fit
    device = resolve_device(args.device)          # fail before any slow loading
    out, overrides = Path(args.out), _overrides(args)
    common = {"device": device, "quiet": args.quiet, "checkpoint_every": args.checkpoint_every,
              "log": None if args.quiet else (lambda text: print(text, file=sys.stderr))}
    if args.preset and args.config:
        raise FnemmError("--preset or --config, not both")
    finetuning = [f for f, v in (("--finetune-cnn", args.finetune_cnn), ("--finetune-blocks", args.finetune_blocks),
                                 ("--cnn-lr-scale", args.cnn_lr_scale), ("--train-bn", args.train_bn),
                                 ("--images", args.images and not args.resume)) if v is not None and v is not False]
    if args.finetune:
        return _finetune(args, out, overrides, common)
    if finetuning:
        raise FnemmError(f"{finetuning[0]} is for fine-tuning: add --finetune RUN (an FC7 run to start from)")
    if args.resume and not args.preset and not args.config:
        if overrides or args.warmup is not None:
            raise FnemmError(f"{out}: --resume continues the saved config ({out / 'config.json'}); drop --set, "
                             f"--warmup and the shortcuts (--lr, --epochs...), or start a new --out")
        # the run folder says what it was trained on; --dataset/--features/--images: moved since
        summaries = fit(out, dataset=args.dataset, features=args.features, ids=args.ids, images=args.images,
                        seeds=args.seeds, resume=True, **common)
    else:
        if not args.preset and not args.config:
            raise FnemmError("--preset (or --config FILE) is required for a new run (e.g. flickr8k/FNE-MH; "
                             "see `fnemm presets`)")
        if not args.dataset or not args.features:
            raise FnemmError("--dataset and --features are required")
        config = apply_overrides(read_config(args.config) if args.config else get_preset(args.preset), overrides)
        if args.warmup is not None:
            config = with_warmup(config, args.warmup)
        dataset = load_dataset(args.dataset)
        if args.restval:
            dataset = dataset.with_restval()
        features = load_features(args.features, config.features, args.ids)
        if common["log"]:
            common["log"](dataset.summary())
            common["log"](f"features: {features.source} [{features.kind}] {features.array.shape[0]} x {features.dim}")
        info = {"preset": args.preset or f"config:{Path(args.config).name}",
                "overrides": overrides + ([f"--warmup {args.warmup}"] if args.warmup is not None else []),
                "args": recorded_inputs(args, out)}
        if args.warmup is not None and args.preset:     # not the paper's pipeline: a name of its own in reports
            info["label"] = f"{args.preset.split('/')[-1]}-warmup{args.warmup}"
        summaries = fit(out, config, dataset, features, seeds=args.seeds, resume=args.resume, run_info=info,
                        **common)
    _print_summaries(summaries)
    return 0


def _print_summaries(summaries: list[dict], finetuned: bool = False) -> None:
    from fnemm.eval.metrics import format_metrics
    for s in summaries:
        val = s["val"]
        print(f"best epoch {s['best_epoch']} of {s['epochs']}: val {format_metrics(val) if val else '(none)'}\n"
              f"checkpoint: {Path(s['out']) / 'best.pt'}"
              + (f"  fine-tuned CNN: {Path(s['out']) / 'cnn.pt'}" if finetuned else ""))
    if len(summaries) > 1:
        import numpy as np
        rsums = [s["val"]["rsum"] if s["val"] else float("nan") for s in summaries]
        print(f"{len(rsums)} seeds: best val rsum {np.mean(rsums):.1f} ± {np.std(rsums, ddof=1):.1f} "
              f"({', '.join(f'{r:.1f}' for r in rsums)})")


def _finetune(args, out: Path, overrides: list[str], common: dict) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.training.folders import saved_info, seed_dirs
    from fnemm.training.runs import fit
    if args.preset or args.config or args.resume:
        raise FnemmError("--finetune starts from the run's own config: drop --preset/--config (use --set), and "
                         "continue a fine-tuning run with --out DIR --resume alone")
    if args.warmup is not None:
        raise FnemmError("--warmup is for training from scratch: --finetune starts from a converged run")
    if args.features or args.ids:
        raise FnemmError("--finetune reads the photos, not feature rows: drop --features (the start run's store "
                         "names the CNN and the photos; --images DIR if they moved)")
    overrides = overrides + [f"finetune.{k}={v}" for k, v in (("blocks", args.finetune_blocks),
                                                               ("cnn_lr_scale", args.cnn_lr_scale))
                             if v is not None] + (["finetune.train_bn=true"] if args.train_bn else [])
    start = Path(args.finetune)
    first = seed_dirs(start)[0] if start.is_dir() else start.parent
    saved = (saved_info(first).get("args") or {}) if (first / "run.json").exists() else {}
    data = args.dataset or saved.get("dataset")
    if not data:
        raise FnemmError(f"{first}: its run.json does not say which dataset it was trained on; pass --dataset")
    restval = bool(saved.get("restval") or args.restval)
    dataset = load_dataset(data)
    info = {"preset": f"finetune:{start}", "overrides": overrides,
            "args": {"dataset": [str(d) for d in data], "restval": restval}}
    summaries = fit(out, start=start, dataset=dataset.with_restval() if restval else dataset, overrides=overrides,
                    seeds=args.seeds,
                    images=args.images, cnn=args.finetune_cnn, run_info=info, **common)
    _print_summaries(summaries, finetuned=True)
    run = Path(summaries[0]["out"])
    saved = saved_info(run)
    ft = saved["finetune"]
    datasets = " ".join(f"--dataset {d}" for d in (saved.get("args") or {}).get("dataset") or [])
    print(f"next, its features (fc7 and FNE) and test metrics:\n"
          f"  fnemm extract --cnn {ft['cnn']} --weights {run / 'cnn.pt'} --images {ft['images_dir']} "
          f"{datasets} --out {run / 'features'}\n"
          f"  fnemm evaluate --checkpoint {run} --features {run / 'features'} {datasets}")
    return 0


def add_presets(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("presets", help="list the paper's pipelines as presets",
                       description="Every Table-1 variant for flickr8k / flickr30k / coco, FNE and FC7; "
                                   "demo/ = the flickr8k ones scaled to flickr8k-1k on a CPU.")
    p.add_argument("--family", choices=["flickr8k", "flickr30k", "coco", "demo"], help="only this dataset family")
    p.add_argument("--show", metavar="NAME", help="print one preset's full config as JSON, and where each "
                                                 "value that is not Table 1's comes from")
    p.add_argument("--paper-table", action="store_true",
                   help="every paper preset beside the paper's Table 1, differences marked")
    return p


def presets(args) -> int:
    from fnemm.joint.presets import PRESETS, describe_sources, get_preset, paper_table
    if args.show:
        print(get_preset(args.show).to_json())           # stdout: the config JSON alone
        print("\n".join(f"# {line}" for line in describe_sources(args.show)), file=sys.stderr)
        return 0
    if args.paper_table:
        print(paper_table(args.family if args.family != "demo" else None))
        return 0
    head = (f"{'preset':<22} {'loss':<8} {'sim':<6} {'embed':>5} {'word':>5} {'lr':<15} {'margin':>6} "
            f"{'abs':<4} {'epochs':>6}")
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


COMMANDS = [(add_train, train), (add_presets, presets)]
