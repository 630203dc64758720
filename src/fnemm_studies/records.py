"""A study's records: what each finished run leaves that its numbers need (config, history,
test metrics and ranks; no weights, no features), exported beside the code (results/) and
carried from there into a study on another machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fnemm.io.errors import FnemmError
from fnemm.io.files import atomic_write_bytes, make_folder
from fnemm.training.folders import metrics_path

RECORDS = ("config.json", "run.json", "metrics.jsonl", "metrics-test.json", "ranks-test.jsonl")


def copy_records(source: Path, target: Path) -> Path:
    """The :data:`RECORDS` a run folder has, each written atomically into ``target``."""
    make_folder(target)
    for name in RECORDS:
        if (source / name).is_file():
            atomic_write_bytes(target / name, (source / name).read_bytes())
    return target


def copy_run(source: Path, target: Path) -> bool:
    """A finished run's records (:data:`RECORDS`) copied to ``target``, a run folder that must
    not exist yet: filled beside it, then renamed into place, so that a worker starting
    beside this one never finds it half there and trains it. False (nothing copied) where
    the folder appeared meanwhile."""
    filling = copy_records(source, target.parent / f".{target.name}.carrying-{os.getpid()}")
    try:
        os.rename(filling, target)                # fails where another process made the run meanwhile
        return True
    except OSError:
        shutil.rmtree(filling, ignore_errors=True)
        return False


def carry_records(study, source: str | Path) -> tuple[int, list[Path]]:
    """The grid's finished runs in an exported study (``source``: what --export wrote,
    e.g. results/flickr8k-224) copied into the ``study``'s --out where it has no folder for
    them (a run there, started or finished, is left as it is), so that a grid continued on
    a new machine trains only what is left. A record trained with another config than the
    grid gives its run is not carried. Returns (runs carried, records left there)."""
    source = Path(source)
    if not (source / "runs").is_dir():
        raise FnemmError(f"--carry {source}: no runs/ folder here; give the folder `--export` wrote")
    carried, other = 0, []
    for unit in study.units():
        record = source / unit.run.relative_to(study.out)
        if unit.run.exists() or not metrics_path(record, "test").is_file():
            continue
        try:
            saved = study.trained_with(record)
        except FnemmError:                         # no readable config.json: not a record to trust
            saved = None
        if saved != study.config(unit)[1]:
            other.append(record)
        elif copy_run(record, unit.run):
            carried += 1
    return carried, other


def export_records(out: str | Path, dest: str | Path) -> int:
    """Copy a study's records (no weights, no features) into ``dest``, in the same layout:
    study.json/.md/.png and each finished run's config, history, test metrics and test
    ranks (the paired statistics need them), about 0.5 MB a run at 1,000 test images (the
    splits are not copied: the study draws them again from the dataset and its seeds).
    ``fnemm study ... --out DEST --report-only`` redraws the report from them alone.
    Returns the number of runs copied."""
    out, dest = Path(out), Path(dest)
    if not (out / "study.json").is_file():
        raise FnemmError(f"{out}: no study.json; run the study into it first")
    copied = 0
    for name in ("study.json", "study.md", "study.png"):
        if (out / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest / name, (out / name).read_bytes())
    for done in sorted((out / "runs").glob("*/*/*/*/*/metrics-test.json")):
        run = done.parent
        if run.name.startswith("."):                  # a copy_run folder left by a killed process
            continue
        copy_records(run, dest / run.relative_to(out))
        copied += 1
    return copied
