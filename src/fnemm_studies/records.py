"""A study's records: what each finished run leaves that its numbers need (config, history,
test metrics and ranks; no weights, no features), exported beside the code (results/) with a
manifest of their sha256 (records.json), and carried from there into a study on another
machine only where each file is the one the manifest names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fnemm.io.errors import FnemmError
from fnemm.io.files import atomic_write_bytes, atomic_write_json, make_folder, read_json, sha256_file, verifying
from fnemm.training.folders import metrics_path

RECORDS = ("config.json", "run.json", "metrics.jsonl", "metrics-test.json", "ranks-test.jsonl")
MANIFEST = "records.json"    # beside runs/: {"sha256": {"runs/<cnn>/<size>/<variant>/<split>/<seed>/<record>": hex}}


def write_manifest(dest: Path) -> dict[str, str]:
    """records.json in an export folder: the sha256 of every run record under ``dest/runs``
    (not study.json/.md/.png, which a --report-only there draws again)."""
    files = {p.relative_to(dest).as_posix(): sha256_file(p) for p in sorted((dest / "runs").rglob("*"))
             if p.name in RECORDS and p.is_file() and not any(x.startswith(".") for x in p.relative_to(dest).parts)}
    atomic_write_json(dest / MANIFEST, {"about": "sha256 of each run record here; fnemm study --carry refuses a "
                                                 "record that is not the file named", "sha256": files})
    return files


def read_manifest(source: Path) -> dict[str, str]:
    fix = f"export the records again (`fnemm study ... --out <the study> --report-only --export {source}`)"
    if not (source / MANIFEST).is_file():
        raise FnemmError(f"--carry {source}: no {MANIFEST} (the sha256 of each record, which --export writes); {fix}")
    files = read_json(source / MANIFEST, fix).get("sha256")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise FnemmError(f"{source / MANIFEST}: no \"sha256\" table of file -> hex digest; {fix}")
    return files


def check_record(source: Path, record: Path, manifest: dict[str, str]) -> None:
    """Refuse (one line, naming the file) a run's records that are not the files the export's
    manifest names: changed by hand or by a merge, cut short by a copy, or missing."""
    run = record.relative_to(source).as_posix() + "/"
    present = {run + name for name in RECORDS if (record / name).is_file()}
    listed = {name for name in manifest if name.startswith(run) and name[len(run):] in RECORDS}
    fix = "restore the records from where they were exported (e.g. `git checkout -- results`), or export them again"
    for name in sorted(listed ^ present):
        said = f"missing, though {source / MANIFEST} lists it" if name in listed else \
            f"not listed in {source / MANIFEST}"
        raise FnemmError(f"{source / name}: {said}; {fix}")
    for name in sorted(present):
        if verifying() and sha256_file(source / name) != manifest[name]:
            raise FnemmError(f"{source / name}: not the file {source / MANIFEST} names (its sha256 differs); {fix}")


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
    manifest = read_manifest(source)
    wanted, other = [], []
    for unit in study.units():
        record = source / unit.run.relative_to(study.out)
        if unit.run.exists() or not metrics_path(record, "test").is_file():
            continue
        check_record(source, record, manifest)     # every one before any is carried
        try:
            saved = study.trained_with(record)
        except FnemmError:                         # no readable config.json: not a record to trust
            saved = None
        (wanted if saved == study.config(unit)[1] else other).append((unit, record))
    carried = sum(copy_run(record, unit.run) for unit, record in wanted)
    return carried, [record for _, record in other]


def export_records(out: str | Path, dest: str | Path) -> int:
    """Copy a study's records (no weights, no features) into ``dest``, in the same layout:
    study.json/.md/.png and each finished run's config, history, test metrics and test
    ranks (the paired statistics need them), about 0.5 MB a run at 1,000 test images (the
    splits are not copied: the study draws them again from the dataset and its seeds).
    ``fnemm study ... --out DEST --report-only`` redraws the report from them alone; their
    manifest (:data:`MANIFEST`) names every record's sha256 for ``--carry``. Returns the number of runs copied."""
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
    write_manifest(dest)
    return copied
