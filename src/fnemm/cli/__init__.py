"""The ``fnemm`` command: argument parsing only; the work is in the library.

Each command lives in a module of this package as a pair side by side: ``add_NAME(sub)``
builds its parser and ``NAME(args)`` calls the library with what it parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fnemm.io.errors import FnemmError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--no-verify", action="store_true",
                   help="check the files read by size only, not by content: their sha256 against their records "
                        "(remembered beside them while unchanged, so a file is hashed once)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bars: auto (default) draws them only on a terminal; piped to a file, "
                        "whole lines only (TQDM_DISABLE=1 also turns them off)")


def add_data(p: argparse.ArgumentParser, required: bool, default: str | None = None) -> None:
    """--dataset, --features, --ids; ``default`` says where they come from when left out
    (then neither is required)."""
    p.add_argument("--dataset", action="append", required=required and not default, metavar="PATH",
                   help="captions and splits: a Flickr folder, dataset_*.json, COCO captions_*.json (repeat it), "
                        ".jsonl, .csv, or flickr8k-1k / flickr8k-224 / flickr8k-224-all (see below)"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--features", required=required and not default, metavar="PATH",
                   help="feature store folder, or a .npy matrix (with --ids)"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--ids", metavar="FILE", help="image ids of a .npy feature matrix, one per row")


def recorded_inputs(args: argparse.Namespace, out: Path) -> dict:
    """A new run's --dataset, --features and --ids as its run.json keeps them, to be found
    again from any directory: absolute paths (a bundled dataset's name as typed), and the
    dataset files relative to the run folder too (``out``, or its seed-K folders, siblings),
    for a run moved together with them."""
    from fnemm.io.files import relative_to
    home = out / "seed-0" if getattr(args, "seeds", None) else out

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else str(path)
    return {"dataset": [absolute(d) for d in args.dataset], "features": absolute(args.features),
            "ids": args.ids and absolute(args.ids), "restval": args.restval,
            "dataset_relative": [relative_to(d, home) if Path(d).exists() else None for d in args.dataset]}


def at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise FnemmError(f"{flag} {value}: expected at least 1")


def read_lines(flag: str, path: str, what: str) -> list[str]:
    """The non-blank lines of a list file given to ``flag``, stripped; a missing or
    empty file is a one-line error naming it."""
    file = Path(path)
    from fnemm.io.files import lines_of, text_of
    if path == "-":                   # standard input, its bytes decoded as a file's are
        raw = getattr(sys.stdin, "buffer", None)
        text = text_of("<stdin>", raw.read()) if raw is not None else sys.stdin.read()
    elif not file.exists() or file.is_dir():
        raise FnemmError(f"{flag} {file}: no such file; give a text file of {what}, one per line")
    else:                             # a file, or a pipe such as <(...)
        text = text_of(file)
    lines = [line.strip() for line in lines_of(text)]
    if not any(lines):
        raise FnemmError(f"{flag} {file}: no {what} in it; one per line")
    return [line for line in lines if line]


def build_parser() -> argparse.ArgumentParser:
    from fnemm.io.version import __version__
    from fnemm.cli import features, results, runs, search, studies
    parser = argparse.ArgumentParser(
        prog="fnemm",
        description="Image-caption retrieval with the Full-Network Embedding "
                    "(Vilalta et al. 2019): extract image features, train, evaluate, report and search.")
    parser.add_argument("--version", action="version", version=f"fnemm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (features, runs, results, search, studies):
        for add, handler in module.COMMANDS:
            add(sub).set_defaults(handler=handler)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fnemm: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.showwarning = _one_line_warning          # the library warns; the CLI says it in one line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:                              # torch raises on 0 or fewer
            print(f"fnemm: error: --threads {args.threads}: expected at least 1", file=sys.stderr)
            return 2
        import torch
        torch.set_num_threads(args.threads)
    if getattr(args, "no_verify", False):
        from fnemm.io.files import VERIFY_ENV
        os.environ[VERIFY_ENV] = "0"
    if getattr(args, "progress", "auto") != "auto":
        from fnemm.io.progress import ENV
        os.environ[ENV] = args.progress
    import logging
    messages = logging.getLogger("fnemm")          # the library's one channel (fnemm.io.progress.say)
    level = messages.level
    if getattr(args, "quiet", False):
        messages.setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except FnemmError as e:
        print(f"fnemm: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        hint = {"train": "; continue it with `fnemm train --out DIR --resume`",
                "extract": "; run the same command again to continue",
                "study": "; run the same command again to continue"}.get(args.command, "")
        print(f"fnemm: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:              # `fnemm presets | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        messages.setLevel(level)
