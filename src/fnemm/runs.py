"""Run folders: what ``fnemm train`` writes, and everything done with them afterwards.

A run folder holds one training run::

    config.json        the resolved TrainConfig          run.json      what it was trained on
    best.pt, last.pt   checkpoints (fnemm.checkpoint)    metrics.jsonl one line per epoch
    metrics-SPLIT.json what `fnemm evaluate` measured on SPLIT

and a seeds folder holds ``seed-0/``, ``seed-1/``... of them. Training several seeds,
resuming any run (or every unfinished seed) from its folder alone, and evaluating
and saving metrics live here, for the CLI, the demo, the stability study, the FNE
study and Python alike (``fnemm.resume``, ``fnemm.train_seeds``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fnemm.config import TrainConfig
from fnemm.datasets import Dataset, load_dataset
from fnemm.errors import FnemmError
from fnemm.features import Features, load_features
from fnemm.fileio import atomic_write_json, atomic_write_text, read_json


def seed_dirs(path: str | Path) -> list[Path]:
    """The runs of a folder: its seed-N subfolders (sorted by N), or the folder itself."""
    path = Path(path)
    seeds = sorted((p for p in path.glob("seed-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    return seeds or [path]


def count_seeds(path: str | Path) -> int:
    """How many seed-N subfolders ``path`` holds (0 for a single run)."""
    return len([p for p in seed_dirs(path) if p != Path(path)])


def metrics_path(run: Path, split: str) -> Path:
    """Where ``fnemm evaluate`` keeps a run's metrics on ``split``."""
    return Path(run) / f"metrics-{split}.json"


def save_metrics(target: Path, split: str, checkpoint: str | Path, results: dict) -> None:
    atomic_write_json(target, {"split": split, "checkpoint": str(checkpoint), "results": results})


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
    return {"images": images, "i2t": i2t, "t2i": t2i, "caption_image": owner}


def load_metrics(run: Path, split: str) -> dict:
    """{protocol: metrics} that ``fnemm evaluate`` saved for ``split``."""
    path = metrics_path(run, split)
    fix = f"evaluate it again: fnemm evaluate --checkpoint {run} --split {split} ..."
    if not path.exists():
        raise FnemmError(f"{path}: not evaluated yet; run `fnemm evaluate --checkpoint {run} "
                         f"--split {split} ...` first")
    results = read_json(path, fix).get("results")
    if not isinstance(results, dict) or not results or \
            not all(isinstance(m, dict) and "rsum" in m for m in results.values()):
        raise FnemmError(f"{path}: no metrics in it; {fix}")
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
    epochs took (training and validation) and the epochs each stage ran."""
    history = epoch_history(run)
    best = max(history, key=lambda r: float(r["val"]["rsum"]), default=None)
    stages: dict[int, int] = {}
    for rec in history:
        stages[int(rec.get("stage", 1))] = stages.get(int(rec.get("stage", 1)), 0) + 1
    return {"epochs": len(history), "best_epoch": int(best["epoch"]) if best else 0,
            "best_val_rsum": float(best["val"]["rsum"]) if best else None,
            "seconds": float(sum(float(r.get("time_s", 0.0)) for r in history)),
            "stage_epochs": [stages[k] for k in sorted(stages)]}


def saved_config(run: Path) -> TrainConfig:
    """The config a run was started with (its config.json)."""
    d = read_json(Path(run) / "config.json", "the run folder is damaged; start a new --out")
    try:
        return TrainConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise FnemmError(f"{Path(run) / 'config.json'}: not a config of this fnemm ({e}); start a new --out") from None


def saved_info(run: Path) -> dict:
    """What a run was trained on (its run.json: preset, dataset and features arguments)."""
    return read_json(Path(run) / "run.json", "the run folder is damaged; start a new --out")


def _inputs(run: Path, config: TrainConfig, dataset, features, ids=None) -> tuple[Dataset, Features]:
    """The run's dataset and features: as given (loaded, or paths: e.g. moved since), else
    where its run.json says they were."""
    args = saved_info(run).get("args") or {}
    if isinstance(dataset, (str, Path, list)):
        dataset = load_dataset(dataset)
        if args.get("restval"):
            dataset = dataset.with_restval()
    if isinstance(features, (str, Path)):
        features = load_features(features, config.features, ids)
    if dataset is None:
        if not args.get("dataset"):
            raise FnemmError(f"{run / 'run.json'}: does not say which dataset it was trained on; pass --dataset")
        dataset = load_dataset(args["dataset"])
        if args.get("restval"):                 # MSCOCO trained with restval
            dataset = dataset.with_restval()
    if features is None:
        if not args.get("features"):
            raise FnemmError(f"{run / 'run.json'}: does not say which features it was trained on; pass --features")
        features = load_features(args["features"], config.features, args.get("ids"))
    return dataset, features


def resume(out: str | Path, *, dataset=None, features=None, ids=None, device: str = "cpu", quiet: bool = False,
           checkpoint_every: float = 120.0) -> dict:
    """Continue the run in ``out`` where it stopped, from its folder alone (config.json;
    the dataset and features named in run.json unless given: loaded, or paths)."""
    from fnemm.train import train
    out = Path(out)
    if not (out / "last.pt").exists():
        raise FnemmError(f"{out}: no run to resume here (no last.pt); start one with --preset")
    config = saved_config(out)
    if config.finetune is not None:             # the CNN fine-tuned on photos: no feature rows to load
        from fnemm.finetune import resume_finetune
        return resume_finetune(out, dataset, device, quiet, checkpoint_every)
    dataset, features = _inputs(out, config, dataset, features, ids)
    info = saved_info(out)
    keep = {k: v for k, v in info.items() if k not in ("dataset", "n_train", "n_val", "features",
                                                        "vocab_size", "feature_dim")}
    return train(config, dataset, features, out, resume=True, device=device, quiet=quiet, run_info=keep,
                 checkpoint_every=checkpoint_every)


def train_seeds(config: TrainConfig, dataset: Dataset, features: Features, out: str | Path, seeds: int, *,
                resume: bool = False, device: str = "cpu", quiet: bool = False, run_info: dict | None = None,
                checkpoint_every: float = 120.0, log=None) -> list[dict]:
    """Train ``seeds`` runs of ``config`` into ``out/seed-K`` with seeds config.seed + K.
    With ``resume``, every seed continues from wherever it is: finished, interrupted or
    not started (each must have been started with this config)."""
    from fnemm.train import train
    if seeds < 1:
        raise FnemmError(f"--seeds {seeds}: expected at least 1")
    out, summaries = Path(out), []
    for k in range(seeds):
        run = out / f"seed-{k}"
        if log:
            log(f"--- seed {config.seed + k} ({k + 1} of {seeds}) -> {run}")
        summaries.append(train(replace(config, seed=config.seed + k), dataset, features, run,
                               resume=resume and (run / "last.pt").exists(), device=device, quiet=quiet,
                               run_info=run_info, checkpoint_every=checkpoint_every))
    return summaries


def resume_seeds(out: str | Path, seeds: int | None = None, **kwargs) -> list[dict]:
    """Resume every seed of a seeds folder (``seeds``: how many there should be; default
    as many as have started), unstarted ones from seed-0's config and inputs."""
    out = Path(out)
    first = out / "seed-0"
    if not (first / "config.json").exists():
        raise FnemmError(f"{out}: no seed-0/ run to resume from; start the seeds with --preset")
    started = count_seeds(out)
    config = saved_config(first)
    if config.finetune is not None:
        return _resume_finetune_seeds(out, seeds, **kwargs)
    dataset, features = _inputs(first, config, kwargs.pop("dataset", None), kwargs.pop("features", None),
                                kwargs.pop("ids", None))
    info = {k: v for k, v in saved_info(first).items() if k in ("preset", "overrides", "args", "label")}
    return train_seeds(config, dataset, features, out, seeds or started, resume=True, run_info=info, **kwargs)


def _resume_finetune_seeds(out: Path, seeds: int | None, dataset=None, features=None, ids=None, log=None,
                           **kwargs) -> list[dict]:
    """Every seed of a fine-tuning seeds folder: started ones resumed, the others started
    from the same seed of the start folder (seed-0's run.json names it) as seed-0 was
    (its CNN and photos); ``seeds`` defaults to as many as were asked for at the start."""
    from fnemm.finetune import finetune, finetune_config, resume_finetune
    info = saved_info(out / "seed-0")
    start_dir = Path((info.get("finetune") or {}).get("from", "")).parent.parent
    seeds = seeds or info.get("seeds") or max(count_seeds(start_dir), 1)
    summaries = []
    for k in range(seeds):
        run = out / f"seed-{k}"
        if log:
            log(f"--- seed-{k} ({k + 1} of {seeds}) -> {run}")
        if (run / "last.pt").exists():
            summaries.append(resume_finetune(run, dataset, **kwargs))
            continue
        start = start_dir / f"seed-{k}"
        if not (start / "best.pt").exists():
            raise FnemmError(f"{run}: not started, and {start} (its start run) is not there")
        data = dataset if dataset is not None else (info.get("args") or {}).get("dataset")
        if data is None:
            raise FnemmError(f"{out / 'seed-0' / 'run.json'}: does not say which dataset; pass --dataset")
        if not isinstance(data, Dataset):
            data = load_dataset(data)
        ft = info.get("finetune") or {}          # seed-0's CNN and photos, as it was started
        summaries.append(finetune(start, data, run, config=finetune_config(start, info.get("overrides") or []),
                                  cnn=ft.get("cnn"), images=ft.get("images_dir"),
                                  run_info={k2: v for k2, v in info.items()
                                            if k2 in ("preset", "overrides", "args", "label", "seeds")},
                                  **kwargs))
    return summaries


def evaluate_runs(path: str | Path, dataset: Dataset, features, split: str = "test", protocol: str = "auto",
                  device: str = "cpu", ids: str | Path | None = None, output: str | Path | None = None,
                  fresh: bool = False) -> dict[str, dict]:
    """Evaluate a run (a folder or a .pt) or every seed of a seeds folder on ``split`` and
    save each one's metrics beside it (or to ``output``, for a single run): {run: results}.
    With ``fresh``, metrics saved after the run's best.pt are kept, not recomputed."""
    from fnemm.evaluation import evaluate
    path = Path(path)
    runs = seed_dirs(path) if path.is_dir() and not (path / "best.pt").exists() else [path]
    if len(runs) > 1 and output:
        raise FnemmError(f"{path}: holds {len(runs)} seeds; --output names one file, leave it out")
    every = {}
    for run in runs:
        folder = run if run.is_dir() else run.parent
        target = Path(output) if output else metrics_path(folder, split)
        best = folder / "best.pt"
        if fresh and target.exists() and best.exists() and target.stat().st_mtime >= best.stat().st_mtime \
                and (output or ranks_path(folder, split).exists()):
            every[str(run)] = load_metrics(folder, split)
            continue
        ranks: dict = {}
        results = evaluate(run, dataset, features, split, protocol, device, ids=ids, ranks=ranks)
        save_metrics(target, split, run, results)
        if ranks and not output:
            save_ranks(ranks_path(folder, split), ranks)
        every[str(run)] = results
    return every
