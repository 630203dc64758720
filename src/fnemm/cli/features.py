"""fnemm extract | layers: images -> feature stores, and a CNN's layers."""

from __future__ import annotations

import argparse
from pathlib import Path

from fnemm.cli import add_common, read_lines
from fnemm.io.errors import FnemmError
from fnemm.features.recipe import POSTS, ExtractConfig

EPILOG_EXTRACT = """\
examples:
  fnemm extract --images ../shared/data/flickr8k/images --dataset ../shared/data/flickr8k \\
      --cnn mobilenet_v2 --out feats/flickr8k-mnv2
  fnemm extract --images Flicker8k_Dataset --dataset dataset_flickr8k.json \\
      --cnn vgg16 --weights vgg16-397923af.pth --out feats/flickr8k-vgg16
  fnemm extract --images new_photos/ --stats feats/flickr8k-vgg16 --cnn vgg16 \\
      --weights vgg16-397923af.pth --out feats/new      # standardised like the training set
  fnemm extract ... --layers late --post center-layer   # other layers / post-processing
  fnemm extract --from feats/mnv2 --dataset D --layers late --post center-layer --out feats/late
                                          # the same, beside the first store, no forward pass

Writes to --out: raw.npy (crop-averaged activations of every tapped layer, float16),
stats.npy (mean and std over the training images), fne.npy (the --layers and --post
features: by default the paper's int8 {-1,0,1} codes of every layer but the
classifier), fc7.npy (the baseline layer, L2-normalised) and manifest.json (image ids,
CNN, weights sha256, taps and their columns, the recipe, skipped images).
Interrupted? Run the same command again: it continues where it stopped. Run it
again with other --layers, --post, --thresholds or training images and only the
assembly from raw.npy is redone (seconds), never the forward pass.
--cnn also takes package.module:function, a builder returning a fnemm.features.cnn.TappedCNN.
"""


def add_extract(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("extract", help="Full-Network Embedding features of a folder of images",
                       description="Run every image through a pretrained CNN (10 crops), pool every "
                                   "tapped layer, standardise with training-split statistics and "
                                   "discretise: the Full-Network Embedding, plus the FC7 baseline.",
                       epilog=EPILOG_EXTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", metavar="DIR", help="folder holding the image files (default with a bundled "
                                                   "--dataset, flickr8k-1k or flickr8k-224: its photos)")
    p.add_argument("--from", dest="source", metavar="STORE",
                   help="instead of --images: another store's raw activations; writes the --layers/--post "
                        "features of its images to --out with no forward pass (statistics from --dataset's "
                        "training split or --train-list), keeping STORE as it is")
    p.add_argument("--dataset", action="append", metavar="PATH",
                   help="which images, and the training split for the statistics (as for train)")
    p.add_argument("--restval", action="store_true",
                   help="MSCOCO: statistics over restval too (as `fnemm train --restval`; the paper: train2014 only)")
    p.add_argument("--train-list", metavar="FILE",
                   help="without --dataset: every image under --images, statistics from the ones "
                        "named in FILE (one file name per line)")
    p.add_argument("--stats", metavar="STORE", help="standardise with this feature store's statistics "
                                                    "instead (e.g. a gallery of new images)")
    p.add_argument("--cnn", default="mobilenet_v2", help="vgg16, mobilenet_v2, mobilenet_v2_float, "
                                                          "efficientnet_lite0 or package.module:function "
                                                          "(default: mobilenet_v2)")
    p.add_argument("--weights", metavar="FILE", help="CNN weights (vgg16: a torchvision .pth or Keras .h5; "
                                                     "mobilenet_v2 and efficientnet_lite0 find theirs)")
    p.add_argument("--out", required=True, metavar="DIR", help="feature store folder")
    p.add_argument("--crops", type=int, default=10, choices=[1, 10], help="10 (default) or 1 (centre)")
    p.add_argument("--layers", default="paper", metavar="SPEC",
                   help="which layers: groups (all, paper, late, blocks, baseline, lastN%%), names, globs, "
                        "START:STOP ranges, !ITEM to leave out; comma-separated (default: paper = "
                        "every layer but the classifier's scores; `fnemm layers` lists them)")
    p.add_argument("--post", default="fne", choices=POSTS,
                   help="post-processing: fne (the paper: z-score, thresholds, {-1,0,1}), zscore, "
                        "zscore-layer-l2, center, center-layer, layer-l2, l2 (default fne)")
    p.add_argument("--thresholds", default="-0.25,0.15", metavar="LOW,HIGH",
                   help="discretisation thresholds on the z-scores (default: -0.25,0.15; write "
                        "--thresholds=-0.5,0.5: a value starting with - needs the =)")
    p.add_argument("--clip", type=float, default=3.0, help="--post zscore: clip at +-CLIP (default 3)")
    p.add_argument("--pca", type=int, default=0, metavar="N",
                   help="project on the top N principal components of the training images (default: off)")
    p.add_argument("--with-baseline", action="store_true", help="append the L2 baseline layer to the features")
    p.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size,
                   help=f"images per forward pass (default {ExtractConfig.batch_size})")
    p.add_argument("--chunk-size", type=int, default=ExtractConfig.chunk_size,
                   help=f"images per resumable chunk (default {ExtractConfig.chunk_size})")
    p.add_argument("--workers", type=int, default=ExtractConfig.workers,
                   help=f"image-decoding processes (default {ExtractConfig.workers}; 0: none)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the CNN in fp32 (default) or bfloat16 autocast (GPUs, CPUs with AMX; FNE codes "
                        "nearly all equal: bench/extract_speed.py measures it)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the forward pass on a Ray cluster (pip install 'fnemm[ray]'): ADDRESS (e.g. "
                        "ray://head:10001, or auto), or alone for $RAY_ADDRESS / a cluster on this machine; "
                        "--device cuda or auto: one CNN actor per GPU of the cluster")
    p.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="CNN actors on Ray (default: one per GPU, else half the cluster's CPUs)")
    p.add_argument("--verify", action="store_true",
                   help="before reusing a complete store, check its files' sha256, not only their sizes")
    add_common(p)
    return p


def extract(args) -> int:
    from fnemm.joint.checkpoint import resolve_device
    from fnemm.datasets import load_dataset
    from fnemm.features.extraction import extract
    from fnemm.features.recipe import Recipe
    try:
        low, high = (float(v) for v in args.thresholds.split(","))
    except ValueError:
        raise FnemmError(f"--thresholds {args.thresholds!r}: expected LOW,HIGH, e.g. -0.25,0.15") from None
    dataset = load_dataset(args.dataset) if args.dataset else None
    if dataset is not None and args.restval:
        dataset = dataset.with_restval()
    train_list = read_lines("--train-list", args.train_list, "image file names") if args.train_list else None
    recipe = Recipe(layers=args.layers, post=args.post, thresholds=(low, high), clip=args.clip, pca=args.pca,
                    baseline=args.with_baseline)
    if args.source:
        return _derive(args, dataset, train_list, recipe)
    images = args.images or (dataset.images if dataset is not None else None)
    if not images:
        raise FnemmError("--images DIR is required (the photos), or --from STORE (another store's activations)")
    config = ExtractConfig(cnn=args.cnn, weights=args.weights, crops=args.crops, recipe=recipe,
                           batch_size=args.batch_size, chunk_size=args.chunk_size, workers=args.workers,
                           # on Ray the actors find the GPUs; this machine may have none
                           device=args.device if args.ray is not None else resolve_device(args.device),
                           ray=args.ray, ray_actors=args.ray_actors, precision=args.precision)
    result = extract(images, args.out, dataset, config, stats_from=args.stats, train_list=train_list,
                     quiet=args.quiet, verify=args.verify)
    _summary(args.out, result.manifest, recipe, result.images, result.skipped)
    return 0


def _derive(args, dataset, train_list, recipe) -> int:
    """``--from STORE``: the recipe's features of STORE's images, from its raw.npy."""
    from fnemm.features.assembly import derive_store
    from fnemm.io.locks import folder_lock
    given = [f for f, v in (("--images", args.images), ("--stats", args.stats), ("--weights", args.weights),
                            ("--ray", args.ray is not None), ("--verify", args.verify)) if v]
    if given:
        raise FnemmError(f"{given[0]} does not go with --from STORE: the activations come from STORE as they are")
    if dataset is None and train_list is None:
        raise FnemmError(f"--from {args.source}: pass --dataset or --train-list, the training images whose "
                         f"statistics standardise the new features")
    if Path(args.source).resolve() == Path(args.out).resolve():
        raise FnemmError(f"--from {args.source} is --out: to change a store's features in place, run fnemm "
                         f"extract on it again with the new --layers/--post")
    train = {dataset.image_ids[k] for k in dataset.split_indices("train")} if dataset is not None else set(train_list)
    with folder_lock(args.out, "a feature store"):
        m = derive_store(args.source, args.out, train, recipe, quiet=args.quiet)
    _summary(args.out, m, recipe, len(m["image_ids"]), len(m.get("skipped", [])))
    return 0


def _summary(out, m: dict, recipe, images: int, skipped: int) -> None:
    fractions = ", ".join(f"{int(v):+d}: {f:.3f}" for v, f in m["fne_fractions"].items()) \
        if "fne_fractions" in m else m["arrays"]["fne"]["dtype"]
    print(f"{out}: {images} images, {len(m['layers'])} of {len(m['taps'])} layers of {m['cnn']} "
          f"({recipe.describe()}): {m['arrays']['fne']['shape'][1]} features ({fractions}), baseline "
          f"{m['baseline']['tap']} ({m['arrays']['fc7']['shape'][1]}-d); {skipped} skipped")
    for s in m["skipped"][:5]:
        print(f"  skipped {s['image']}: {s['reason']}")
    if len(m["skipped"]) > 5:
        print(f"  ... and {len(m['skipped']) - 5} more (listed in manifest.json)")
    if m.get("converted"):
        print(f"  {len(m['converted'])} non-RGB images converted to RGB (listed in manifest.json)")


def add_layers(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("layers", help="a CNN's layers, groups and what --layers selects",
                       description="List the tapped layers of a CNN (position, name, kind, width) and "
                                   "its layer groups; with --layers, mark the ones that spec selects.")
    p.add_argument("--cnn", default="mobilenet_v2", help="a registered CNN (default mobilenet_v2)")
    p.add_argument("--weights", metavar="FILE", help="weights (not needed to list VGG16's layers)")
    p.add_argument("--layers", metavar="SPEC", help="mark what this --layers spec selects")
    return p


def layers(args) -> int:
    from fnemm.features.cnn import build_cnn
    from fnemm.features.recipe import select_layers
    cnn = build_cnn(args.cnn, args.weights or ("random" if args.cnn == "vgg16" else None))
    names = [t.name for t in cnn.taps]
    picked = set(select_layers(args.layers, names, cnn.groups)) if args.layers else set()
    member = {n: [g for g, taps in cnn.groups.items() if n in taps and g != "all"] for n in names}
    print(f"{'':2}{'#':>3}  {'layer':<28} {'kind':<5} {'width':>6}  groups")
    for k, t in enumerate(cnn.taps):
        print(f"{'*' if k in picked else ' ':2}{k:>3}  {t.name:<28} {t.kind:<5} {t.channels:>6}  "
              f"{','.join(member[t.name])}")
    print(f"{len(names)} layers, {cnn.dim} features; baseline {cnn.baseline.name}")
    if args.layers:
        print(f"--layers {args.layers}: {len(picked)} layers, "
              f"{sum(cnn.taps[k].channels for k in picked)} features (marked *)")
    return 0


COMMANDS = [(add_extract, extract), (add_layers, layers)]
