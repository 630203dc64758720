"""fnemm search | index build | serve: a trained model over a gallery."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fnemm.cli import add_common, at_least_one, read_lines
from fnemm.io.errors import FnemmError

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


def add_search(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="text -> images, image -> captions or image -> images with a trained model",
                       description="Rank the images of a feature store for a sentence (--text), the "
                                   "captions of a dataset for a photo (--image: a file, embedded through "
                                   "the store's CNN and statistics, or an image id of the store), or the "
                                   "store's images for a photo (--similar).")
    p.add_argument("--checkpoint", metavar="RUN", help="run folder or best.pt")
    p.add_argument("--features", metavar="STORE", help="the gallery's feature store (default: the one the "
                                                       "checkpoint was trained on, where it still is)")
    p.add_argument("--index", metavar="DIR", help="instead of --checkpoint/--features/--dataset: an index "
                                                  "folder from `fnemm index build` (faiss; scales to millions)")
    p.add_argument("--dataset", action="append", metavar="PATH",
                   help="captions (needed for --image) and splits (for --split); default, when those "
                        "need one: the one the checkpoint was trained on, where it still is")
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                   help="restrict the gallery to a split (default all)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a sentence, e.g. \"a dog runs on the beach\"")
    query.add_argument("--image", help="a photo file, or an image id of the store: the captions that fit it")
    query.add_argument("--similar", metavar="IMAGE", help="a photo file, or an image id of the store: "
                                                          "the gallery images most like it")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5, at most 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common(p)
    return p


def search(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.search.gallery import Gallery, format_hits
    if args.index:
        if args.checkpoint or args.features or args.dataset or args.split != "all":
            raise FnemmError("--index holds the checkpoint, gallery and captions: drop --checkpoint, "
                             "--features, --dataset and --split (choose them at `fnemm index build`)")
        gallery = Gallery.from_index(args.index, device=args.device, encoder=args.text is None)
    else:
        if not args.checkpoint:
            raise FnemmError("search needs --checkpoint RUN (and --features STORE, default the one it was trained "
                             "on), or --index DIR")
        features = args.features
        if features is None:
            from fnemm.joint.checkpoint import trained_store
            features = trained_store(args.checkpoint)
            print(f"features: {features} (the store the checkpoint was trained on)", file=sys.stderr)
        dataset = load_dataset(args.dataset) if args.dataset else None
        if dataset is None and (args.split != "all" or args.image is not None):     # splits or captions needed
            dataset = trained_dataset(args.checkpoint)
        gallery = Gallery.from_store(args.checkpoint, features, dataset, args.split, args.device,
                                     encoder=args.text is None)
    if args.text is not None:
        hits = gallery.text(args.text, args.k)
        unknown = gallery.unknown_words(args.text)
        if unknown:
            print(f"fnemm: warning: not in the model's vocabulary, so read as <unk>: {', '.join(unknown)}",
                  file=sys.stderr)
    elif args.image is not None:
        hits = gallery.image(args.image, args.k)
    else:
        hits = gallery.similar(args.similar, args.k)
    paths = {h.image: gallery.image_path(h.image) for h in hits}
    if args.text is not None:
        query = {"text": args.text}
    else:
        query = {"image": args.image} if args.image is not None else {"similar": args.similar}
    if args.json:
        print(json.dumps({"query": query,
                          "results": [{**h.to_dict(), "path": str(paths[h.image]) if paths[h.image] else None}
                                      for h in hits]}, indent=2))
    else:
        print(f"query: {args.text!r}" if args.text is not None else
              f"query: {args.image}" if args.image is not None else f"images like: {args.similar}")
        print(format_hits(hits, paths))
    return 0


def add_index(sub) -> argparse.ArgumentParser:
    from fnemm.search.vector_index import EXACT_UP_TO, METHODS
    p = sub.add_parser("index", help="build a search index of a gallery (for `fnemm serve`)",
                       description="Embed a gallery with a trained checkpoint into a faiss index folder.",
                       epilog=EPILOG_INDEX, formatter_class=argparse.RawDescriptionHelpFormatter)
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = isub.add_parser("build", help="checkpoint + feature store (+ captions) -> index folder",
                        description="Embed the gallery's images (and, with --dataset, their captions) "
                                    "with a trained checkpoint into an index folder: exact search "
                                    "up to --threshold vectors, HNSW or IVF above; approximate search "
                                    "parameters tuned to --target-recall and the recall reported.",
                        epilog=EPILOG_INDEX, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--checkpoint", required=True, metavar="RUN", help="run folder or best.pt")
    b.add_argument("--features", metavar="STORE", help="the gallery's feature store (or .npy + --ids)")
    b.add_argument("--images", metavar="DIR",
                   help="photos (a folder, or a file listing image files), extracted into OUT/features the way "
                        "the model's training store was made (its CNN and statistics; resumable); no captions "
                        "needed. With --features: the photos of the store's images folder that the store lacks "
                        "join its gallery")
    b.add_argument("--ids", metavar="FILE", help="image ids of a .npy feature matrix, one per row")
    b.add_argument("--dataset", action="append", metavar="PATH",
                   help="captions of the gallery (for image -> caption search) and splits (for --split)")
    b.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                   help="index only this split's images (default all): the splits of --dataset, else of the "
                        "dataset the checkpoint was trained on")
    b.add_argument("--out", required=True, metavar="DIR", help="the index folder to write")
    b.add_argument("--method", default="auto", choices=METHODS,
                   help="auto (default): exact up to --threshold vectors, HNSW above")
    b.add_argument("--threshold", type=int, default=EXACT_UP_TO,
                   help=f"auto's exact/approximate switch (default {EXACT_UP_TO})")
    b.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 vs exhaustive search that tuning reaches with 95%% confidence (default 0.95)")
    b.add_argument("--tune-queries", metavar="FILE",
                   help="sentences to tune the image side on, one per line (default: the dataset's "
                        "captions; without captions, the images themselves)")
    add_common(b)
    return p


def trained_dataset(checkpoint: str):
    """The dataset a checkpoint (its run folder or file) was trained on, said on stderr: the
    splits and captions of --split and --image when no --dataset is given."""
    from fnemm.training.folders import run_dataset
    run = Path(checkpoint)
    dataset = run_dataset(run if run.is_dir() else run.parent)
    print(f"dataset: {dataset.summary()} (the one the checkpoint was trained on)", file=sys.stderr)
    return dataset


def index(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.search.index_folder import build_index, describe_index
    at_least_one("--threshold", args.threshold)
    if not (args.features or args.images):
        raise FnemmError("index build needs the gallery: --features STORE (extracted already), --images DIR "
                         "(photos, extracted on the way), or both (the store and the photos it lacks)")
    if args.images and args.ids:
        raise FnemmError("--ids names the rows of a .npy given as --features; photos from --images join a store")
    dataset = load_dataset(args.dataset) if args.dataset else None
    if dataset is None and args.split != "all":              # the splits: the run's, as search and evaluate
        dataset = trained_dataset(args.checkpoint)
    tune = read_lines("--tune-queries", args.tune_queries, "sentences") if args.tune_queries else None
    features, extra = args.features, []
    if args.images and args.features:
        from fnemm.search.embed import extract_missing
        made = extract_missing(args.checkpoint, args.features, args.images, Path(args.out) / "features",
                               device=args.device, quiet=args.quiet)
        extra = [made] if made else []
    elif args.images:
        from fnemm.search.embed import extract_like
        features = Path(args.out) / "features"
        extract_like(args.checkpoint, args.images, features, device=args.device, quiet=args.quiet)
    manifest = build_index(args.checkpoint, features, args.out, dataset=dataset, split=args.split,
                           ids=args.ids, method=args.method, threshold=args.threshold,
                           target_recall=args.target_recall, device=args.device, quiet=args.quiet,
                           tune_queries=tune, extra=extra)
    print(describe_index(manifest))
    print(f"index: {args.out} (built in {manifest['build_seconds']} s); serve it with: fnemm serve --index {args.out}")
    return 0


def add_serve(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="HTTP search service and web page over an index folder",
                       description="Serve an index folder: POST /search/text, /search/image, /search/similar, "
                                   "GET /images/{id}, GET /healthz, the search page at /, API docs at /docs.",
                       epilog=EPILOG_INDEX, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, metavar="DIR", help="from `fnemm index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port (printed)")
    p.add_argument("--checkpoint", metavar="RUN", help="where the index's checkpoint is now, if it moved")
    p.add_argument("--features", metavar="STORE", help="where the index's feature store is now, if it moved")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest photo upload (default 10 MiB)")
    add_common(p)
    return p


def serve(args) -> int:
    if not 0 <= args.port < 65536:
        raise FnemmError(f"--port {args.port}: expected 0..65535 (0: any free port)")
    if args.max_upload_mb <= 0:
        raise FnemmError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    try:
        from fnemm.search.service import serve
    except ImportError:
        raise FnemmError("the service needs FastAPI and uvicorn: pip install 'fnemm[serve]'") from None
    serve(args.index, args.host, args.port, args.checkpoint, args.features, args.device,
          int(args.max_upload_mb * 1024 * 1024), args.quiet)
    return 0


EPILOG_EMBED = """\
examples:
  fnemm embed --checkpoint runs/demo/FNE-MH/seed-0 --images runs/demo/features --out emb/
  fnemm embed --checkpoint runs/demo/FNE-MH/seed-0 --images my_photos/ --out emb/ --parquet
  fnemm embed --checkpoint runs/demo/FNE-MH/seed-0 --texts queries.txt --out emb/

Writes images.npy / texts.npy (float32, one L2-normalised row per item) and beside each a
.json with the ids (image ids, or line numbers from 0), image paths or texts, and the
model that made them; --parquet adds images.parquet / texts.parquet (id, path or text,
embedding). Image files (a folder, or a list file) are first extracted into OUT/features
exactly as the model's training store was made, with its statistics (resumable, like
`fnemm extract`).

  import numpy as np, json
  v = np.load("emb/images.npy"); ids = json.load(open("emb/images.json"))["ids"]
"""


def add_embed(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("embed", help="images or texts -> joint embeddings (.npy, parquet) with a trained model",
                       description="Export joint embeddings of images (a feature store, a folder of image "
                                   "files, or a list file of them) or of texts (a file, one per line).",
                       epilog=EPILOG_EMBED, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run folder or best.pt")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", metavar="SOURCE", help="a feature store, a folder of images, or a text "
                                                         "file listing image files (one per line)")
    what.add_argument("--texts", metavar="FILE", help="sentences, one per line (blank lines are skipped; - reads stdin)")
    p.add_argument("--features", metavar="STORE", help="for image files: the store whose CNN and statistics "
                                                       "the model was trained on (default: the one its "
                                                       "checkpoint records)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the .npy, .json (and .parquet)")
    p.add_argument("--parquet", action="store_true", help="also write parquet (pip install 'fnemm[parquet]')")
    p.add_argument("--batch-size", type=int, default=8, help="images per CNN forward pass (default 8)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding images (default 1)")
    add_common(p)
    return p


def embed(args) -> int:
    from fnemm.search.embed import embed_images, embed_texts
    if args.parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise FnemmError("--parquet needs pyarrow: pip install 'fnemm[parquet]' (the .npy needs nothing)") from None
    if args.texts is not None:
        if args.features:
            raise FnemmError("--features is for --images; texts need only the checkpoint")
        done = embed_texts(args.checkpoint, read_lines("--texts", args.texts, "sentences"), args.out,
                           args.parquet, args.device)
    else:
        at_least_one("--batch-size", args.batch_size)
        done = embed_images(args.checkpoint, args.images, args.out, args.features, args.parquet, args.device,
                            args.batch_size, args.workers, args.quiet)
    n, d = done.vectors.shape
    print(f"{done.kind}: {n} x {d} dimensions -> " + ", ".join(str(f) for f in done.files))
    return 0


COMMANDS = [(add_search, search), (add_index, index), (add_serve, serve), (add_embed, embed)]
