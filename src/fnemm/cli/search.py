"""fnemm search | index build | serve: a trained model over a gallery."""

from __future__ import annotations

import argparse
import json
import sys

from fnemm.cli import add_common, at_least_one, read_lines
from fnemm.errors import FnemmError

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
    p.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                   help="restrict the gallery to a split (default all)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a sentence, e.g. \"a dog runs on the beach\"")
    query.add_argument("--image", help="a photo file, or an image id of the store")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5, at most 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common(p)
    return p


def search(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.gallery import Gallery, format_hits
    if args.index:
        if args.checkpoint or args.features or args.dataset or args.split != "all":
            raise FnemmError("--index holds the checkpoint, gallery and captions: drop --checkpoint, "
                             "--features, --dataset and --split (choose them at `fnemm index build`)")
        gallery = Gallery.from_index(args.index, device=args.device, encoder=args.image is not None)
    else:
        if not (args.checkpoint and args.features):
            raise FnemmError("search needs --checkpoint RUN and --features STORE (or --index DIR)")
        dataset = load_dataset(args.dataset) if args.dataset else None
        gallery = Gallery.from_store(args.checkpoint, args.features, dataset, args.split, args.device,
                                     encoder=args.image is not None)
    if args.text is not None:
        hits = gallery.text(args.text, args.k)
        unknown = gallery.unknown_words(args.text)
        if unknown:
            print(f"fnemm: warning: not in the model's vocabulary, so read as <unk>: {', '.join(unknown)}",
                  file=sys.stderr)
    else:
        hits = gallery.image(args.image, args.k)
    paths = {h.image: gallery.image_path(h.image) for h in hits}
    if args.json:
        print(json.dumps({"query": {"text": args.text} if args.text is not None else {"image": args.image},
                          "results": [{**h.to_dict(), "path": str(paths[h.image]) if paths[h.image] else None}
                                      for h in hits]}, indent=2))
    else:
        print(f"query: {args.text!r}" if args.text is not None else f"query: {args.image}")
        print(format_hits(hits, paths))
    return 0


def add_index(sub) -> argparse.ArgumentParser:
    from fnemm.index import EXACT_UP_TO, METHODS
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
    b.add_argument("--features", required=True, metavar="STORE", help="the gallery's feature store (or .npy + --ids)")
    b.add_argument("--ids", metavar="FILE", help="image ids of a .npy feature matrix, one per row")
    b.add_argument("--dataset", action="append", metavar="PATH",
                   help="captions of the gallery (for image -> caption search) and splits (for --split)")
    b.add_argument("--split", default="all", choices=["train", "val", "test", "all"],
                   help="index only this split's images (default all)")
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


def index(args) -> int:
    from fnemm.datasets import load_dataset
    from fnemm.index_folder import build_index, describe_index
    at_least_one("--threshold", args.threshold)
    dataset = load_dataset(args.dataset) if args.dataset else None
    tune = read_lines("--tune-queries", args.tune_queries, "sentences") if args.tune_queries else None
    manifest = build_index(args.checkpoint, args.features, args.out, dataset=dataset, split=args.split,
                           ids=args.ids, method=args.method, threshold=args.threshold,
                           target_recall=args.target_recall, device=args.device, quiet=args.quiet,
                           tune_queries=tune)
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
        from fnemm.serve import serve
    except ImportError:
        raise FnemmError("the service needs FastAPI and uvicorn: pip install 'fnemm[serve]'") from None
    serve(args.index, args.host, args.port, args.checkpoint, args.features, args.device,
          int(args.max_upload_mb * 1024 * 1024), args.quiet)
    return 0


COMMANDS = [(add_search, search), (add_index, index), (add_serve, serve)]
