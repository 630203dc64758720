"""Run folders: what ``fnemm train`` writes into one, and reading it back.

A run folder holds one training run::

    config.json        the resolved TrainConfig          run.json      what it was trained on
    best.pt, last.pt   checkpoints (fnemm.joint.checkpoint)    metrics.jsonl one line per epoch
    metrics-SPLIT.json what `fnemm evaluate` measured on SPLIT    ranks-SPLIT.jsonl  its per-query ranks

and a seeds folder holds ``seed-0/``, ``seed-1/``... of them. Everything that reads a
folder back (its seeds, config, inputs, epochs, metrics) is here; what trains or
evaluates runs is in fnemm.training.runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fnemm.datasets import Dataset, load_dataset
from fnemm.features.store import Features, load_features
from fnemm.io.errors import FnemmError
from fnemm.io.files import atomic_write_json, atomic_write_text, read_json
from fnemm.joint.config import TrainConfig, validate


def seed_dirs(path: str | Path) -> list[Path]:
    """The runs of a folder: its seed-N subfolders (sorted by N), or the folder itself."""
    path = Path(path)
    seeds = sorted((p for p in path.glob("seed-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    return seeds or [path]


def count_seeds(path: str | Path) -> int:
    """How many seed-N subfolders ``path`` holds (0 for a single run)."""
    return len([p for p in seed_dirs(path) if p != Path(path)])


METRIC_KEYS = tuple(f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")) + ("rsum",)


def metrics_path(run: Path, split: str) -> Path:
    """Where ``fnemm evaluate`` keeps a run's metrics on ``split``."""
    return Path(run) / f"metrics-{split}.json"


def save_metrics(target: Path, split: str, checkpoint: str | Path, results: dict, protocol: str = "auto") -> None:
    atomic_write_json(target, {"split": split, "checkpoint": str(checkpoint), "protocol": protocol,
                               "results": results})


def ranks_path(run: Path, split: str) -> Path:
    """Where ``fnemm evaluate`` keeps a run's per-query ranks on ``split`` (JSON lines)."""
    return Path(run) / f"ranks-{split}.jsonl"


def save_ranks(target: Path, ranks: dict) -> None:
    """One line per query: {"query": "image", "image", "rank"} (annotation: the rank of the
    image's best caption) and {"query": "caption", "image", "caption", "rank"} (retrieval)."""
    images = ranks["images"]
    lines = [json.dumps({"query": "image", "image": i, "rank": r}) for i, r in zip(images, ranks["i2t"])]
    seen: dict[int, int] = {}
    for owner, r in zip(ranks["caption_image"], ranks["t2i"]):
        seen[owner] = seen.get(owner, 0) + 1
        lines.append(json.dumps({"query": "caption", "image": images[owner], "caption": seen[owner], "rank": r}))
    atomic_write_text(target, "\n".join(lines) + "\n")


def load_ranks(run: Path, split: str) -> dict | None:
    """The per-query ranks saved for ``split`` (as :func:`save_ranks` writes them), or None."""
    path = ranks_path(run, split)
    if not path.exists():
        return None
    images, i2t, t2i, owner, row = [], [], [], [], {}
    for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        try:
            rec = json.loads(line)
            if rec["query"] == "image":
                row[rec["image"]] = len(images)
                images.append(rec["image"])
                i2t.append(int(rec["rank"]))
            else:
                owner.append(row[rec["image"]])
                t2i.append(int(rec["rank"]))
        except (ValueError, KeyError, TypeError):
            raise FnemmError(f"{path}:{n}: not a rank record; evaluate the run again") from None
    if not images or not t2i or any(r < 1 for r in i2t + t2i):
        raise FnemmError(f"{path}: damaged ({'no image queries' if not images else 'no caption queries' if not t2i else 'a rank below 1'}); "
                         f"evaluate the run again: fnemm evaluate --checkpoint {run} --split {split} ...")
    return {"images": images, "i2t": i2t, "t2i": t2i, "caption_image": owner}


def load_metrics(run: Path, split: str, path: Path | None = None, protocol: str | None = None) -> dict | None:
    """{protocol: metrics} that ``fnemm evaluate`` saved for ``split`` (in ``path``: default
    the run's metrics-SPLIT.json). With ``protocol``: None unless they were measured with it."""
    path = Path(path) if path is not None else metrics_path(run, split)
    fix = f"evaluate it again: fnemm evaluate --checkpoint {run} --split {split} ..."
    if not path.exists():
        raise FnemmError(f"{path}: not evaluated yet; run `fnemm evaluate --checkpoint {run} "
                         f"--split {split} ...` first")
    saved = read_json(path, fix)
    results = saved.get("results") if isinstance(saved, dict) else None
    if not isinstance(results, dict) or not results or not all(
            isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)
                                        for k in METRIC_KEYS) for m in results.values()):
        raise FnemmError(f"{path}: damaged (not every metric of {', '.join(METRIC_KEYS[:3])}... is there, as a "
                         f"number); {fix}")
    counts = [m[k] for m in results.values() for k in ("images", "captions") if k in m]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
        raise FnemmError(f"{path}: damaged (its image or caption counts are not positive whole numbers); {fix}")
    seen = [m[k] for m in results.values() for k in ("seen_in_training", "seen_in_validation") if k in m]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in seen):
        raise FnemmError(f"{path}: damaged (seen_in_training or seen_in_validation is not a whole number); {fix}")
    if protocol is not None and saved.get("protocol") != protocol:
        return None
    return results


def epoch_history(run: Path) -> list[dict]:
    """A run's metrics.jsonl records, one per epoch ([] when it has none yet)."""
    history = Path(run) / "metrics.jsonl"
    if not history.exists():
        return []
    out = []
    for n, line in enumerate(history.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            float(rec["val"]["rsum"])
            out.append(rec)
        except (ValueError, KeyError, TypeError):
            raise FnemmError(f"{history}:{n}: not an epoch record; the run folder is damaged "
                             f"(resume it with `fnemm train --out {run} --resume`)") from None
    return out


def val_curve(run: Path) -> list[float]:
    """Validation rsum per epoch from a run's metrics.jsonl ([] when it has none yet)."""
    return [float(rec["val"]["rsum"]) for rec in epoch_history(run)]


def training_summary(run: Path) -> dict:
    """How a run trained: epochs, the best epoch (by validation rsum), the seconds its
    epochs took (training and validation; in all and the median epoch), the epochs each
    stage ran, how many of them were on the loss plateau and whether its last one still
    was (None without its config.json)."""
    history = epoch_history(run)
    best = max(history, key=lambda r: float(r["val"]["rsum"]), default=None)
    stages: dict[int, int] = {}
    for rec in history:
        stages[int(rec.get("stage", 1))] = stages.get(int(rec.get("stage", 1)), 0) + 1
    flags = plateau_flags(run, history)
    return {"epochs": len(history), "best_epoch": int(best["epoch"]) if best else 0,
            "best_val_rsum": float(best["val"]["rsum"]) if best else None,
            "seconds": float(sum(float(r.get("time_s", 0.0)) for r in history)),
            "median_epoch_s": float(statistics.median(times)) if (times := [float(r["time_s"]) for r in history
                                                                             if "time_s" in r]) else None,
            "stage_epochs": [stages[k] for k in sorted(stages)],
            "plateau_epochs": None if flags is None else sum(flags),
            "ended_on_plateau": bool(flags[-1]) if flags else None,
            "code": run_code(run)}


def run_software(device: str) -> dict:
    """run.json's "software": fnemm.io.version.software() and where it runs (the device,
    torch's CPU threads)."""
    import torch
    from fnemm.io.version import software
    return {**software(), "device": device, "threads": torch.get_num_threads()}


def note_resumed(run: Path, epoch: int, device: str) -> None:
    """Add to run.json's "resumed" this resumption's epoch and software: a run may be
    continued by other code, on another machine, and its record says so."""
    path = Path(run) / "run.json"
    try:
        info = read_json(path, "")
    except FnemmError:
        return                         # a damaged run.json: the run goes on; saved_info says so where it is read
    if isinstance(info, dict):
        atomic_write_json(path, {**info, "resumed": [*(info.get("resumed") or []),
                                                      {"epoch": epoch, **run_software(device)}]})


def run_code(run: Path) -> list[str] | None:
    """The code that trained a run, as its run.json records it (the start, then each
    resumption that ran other code): a commit's first 7 digits, with "+modified" when its
    src/ had uncommitted changes, or "fnemm VERSION" outside a git checkout. None for a run
    made before run.json recorded it."""
    try:
        info = read_json(Path(run) / "run.json", "") if (Path(run) / "run.json").is_file() else {}
    except FnemmError:
        return None                    # damaged: the record cannot say; the run's numbers are its metrics
    if not isinstance(info, dict) or not isinstance(info.get("software"), dict):
        return None
    code: list[str] = []
    for made in [info["software"], *(r for r in info.get("resumed") or [] if isinstance(r, dict))]:
        commit = made.get("commit")
        name = (f"{commit[:7]}{'+modified' if made.get('modified') else ''}" if isinstance(commit, str) and commit
                else f"fnemm {made.get('fnemm')}")
        if name not in code:
            code.append(name)
    return code


def plateau_flags(run: Path, history: list[dict]) -> list[bool] | None:
    """For each epoch: was its loss on the plateau of equal scores (``losses.PLATEAU_SHARE``)?"""
    from fnemm.joint.losses import on_plateau
    if not (run / "config.json").is_file():
        return None
    config = saved_config(run)
    flags = []
    for rec in history:
        stage = config.stages[min(int(rec.get("stage", 1)), len(config.stages)) - 1]
        flags.append(bool(on_plateau(float(rec["loss"]), stage.loss, stage.margin, config.batch_size)))
    return flags


def saved_config(run: Path) -> TrainConfig:
    """The config a run was started with (its config.json)."""
    d = read_json(Path(run) / "config.json", "the run folder is damaged; start a new --out")
    try:
        config = TrainConfig.from_dict(d)
        validate(config)
        return config
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, FnemmError) as e:
        raise FnemmError(f"{Path(run) / 'config.json'}: not a config of this fnemm ({type(e).__name__}: "
                         f"{str(e)[:100]}); start a new --out") from None


def saved_info(run: Path) -> dict:
    """What a run was trained on (its run.json: preset, dataset and features arguments)."""
    return read_json(Path(run) / "run.json", "the run folder is damaged; start a new --out")


def mark_finished(run: Path) -> None:
    """Say in run.json that the run trained to its end (it says "training" from its start:
    evaluating it before then scores its best model so far, not the run's)."""
    info = saved_info(run) if (Path(run) / "run.json").is_file() else None
    if info is not None and info.get("state") != "finished":
        atomic_write_json(Path(run) / "run.json", {**info, "state": "finished"})


def run_preset(run: Path) -> str | None:
    """The preset a run was trained from: its run.json says, else its best.pt."""
    if (run / "run.json").exists():
        return saved_info(run).get("preset")
    if (run / "best.pt").exists():
        from fnemm.joint.checkpoint import read_checkpoint
        return read_checkpoint(run / "best.pt").get("preset")
    return None


def label_of(preset: str | None, path: Path) -> str:
    """A run's name in a table: its preset's pipeline (FNE-MH), else its folder's name."""
    return preset.split("/")[-1] if preset else path.name


def run_dataset(run: Path, dataset=None) -> Dataset:
    """The dataset a run was trained on: ``dataset`` as given (loaded, or its path(s): e.g.
    moved since), else the one its run.json names, with MSCOCO's restval as it was trained.
    The one place a run's dataset is read back."""
    args = saved_info(run).get("args") or {} if (Path(run) / "run.json").exists() else {}
    if isinstance(dataset, Dataset):
        return dataset
    if dataset is None:
        dataset = args.get("dataset")
        if not dataset:
            raise FnemmError(f"{Path(run) / 'run.json'}: does not say which dataset it was trained on; "
                             f"pass --dataset")
        dataset = [dataset] if isinstance(dataset, str) else dataset
        dataset = [_found(run, d, r) for d, r in zip(dataset, args.get("dataset_relative") or [None] * len(dataset))]
    dataset = load_dataset(dataset)
    return dataset.with_restval() if args.get("restval") else dataset


def _found(run: Path, path: str, relative: str | None) -> str:
    """A dataset file run.json names, found as a store's manifest finds its photos (beside
    the run if the two moved together, else where it was); a bundled name as it is."""
    from fnemm.io.files import locate
    found = locate(run, relative, path)
    return str(found) if found is not None else path


def run_inputs(run: Path, config: TrainConfig, dataset, features, ids=None) -> tuple[Dataset, Features]:
    """The run's dataset and features: as given (loaded, or paths: e.g. moved since), else
    where its run.json says they were."""
    args = saved_info(run).get("args") or {}
    dataset = run_dataset(run, dataset)
    if isinstance(features, (str, Path)):
        features = load_features(features, config.features, ids)
    if features is None:
        if not args.get("features"):
            raise FnemmError(f"{run / 'run.json'}: does not say which features it was trained on; pass --features")
        from fnemm.joint.checkpoint import recorded_store
        # a store: beside the run if the two moved together, else where it was
        given = recorded_store(saved_info(run).get("features") or {}, run) or args["features"]
        if not Path(given).exists():
            raise FnemmError(f"{run}: the features it was trained on ({args['features']}) are not there, nor "
                             f"beside the run; pass --features STORE (where that store is now)")
        features = load_features(given, config.features, args.get("ids"))
    return dataset, features


def check_resumed_features(out: Path, features: Features) -> None:
    """A run resumes on the features it started on (a store that moved, not another one):
    the rest of its epochs on other features would make a model of neither, with exit 0."""
    from fnemm.joint.checkpoint import check_features
    if not (out / "last.pt").exists() or not (out / "run.json").is_file():
        return
    record = read_json(out / "run.json", "start the run again in a new --out").get("features") or {}
    check_features({"feature_dim": record.get("dim", features.dim), "features": record}, features, out)
