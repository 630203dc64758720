"""Working with run folders (fnemm.training.folders says what is in one): training
several seeds, resuming any run (or every unfinished seed) from its folder alone, and
evaluating and saving metrics, for the CLI, the demo, the studies and Python alike
(``fnemm.resume``, ``fnemm.train_seeds``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fnemm.joint.config import TrainConfig
from fnemm.datasets import Dataset, load_dataset
from fnemm.io.errors import FnemmError
from fnemm.features.store import Features
from fnemm.training.folders import count_seeds, load_metrics, metrics_path, ranks_path, run_inputs, save_metrics, save_ranks, saved_config, saved_info, seed_dirs


def resume(out: str | Path, *, dataset=None, features=None, ids=None, images=None, device: str = "cpu",
           quiet: bool = False, checkpoint_every: float = 120.0) -> dict:
    """Continue the run in ``out`` where it stopped, from its folder alone (config.json;
    the dataset and features named in run.json unless given: loaded, or paths, e.g. moved
    since; a fine-tuning run's photos from ``images`` when they moved)."""
    from fnemm.training.trainer import train
    out = Path(out)
    if not (out / "last.pt").exists():
        raise FnemmError(f"{out}: no run to resume here (no last.pt); start one with --preset")
    config = saved_config(out)
    if config.finetune is not None:             # the CNN fine-tuned on photos: no feature rows to load
        from fnemm.training.finetune import resume_finetune
        if ids is not None:
            raise FnemmError(f"{out}: a fine-tuning run reads a feature store's photos, not a .npy matrix; "
                             f"drop --ids (--features STORE names a moved store)")
        return resume_finetune(out, dataset, features=features, images=images, device=device, quiet=quiet,
                               checkpoint_every=checkpoint_every)
    if images is not None:
        raise FnemmError(f"{out}: --images is for fine-tuning runs; this one trains on feature rows (--features)")
    dataset, features = run_inputs(out, config, dataset, features, ids)
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
    from fnemm.training.trainer import train
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
    if kwargs.pop("images", None) is not None:
        raise FnemmError(f"{out}: --images is for fine-tuning runs; these train on feature rows (--features)")
    dataset, features = run_inputs(first, config, kwargs.pop("dataset", None), kwargs.pop("features", None),
                                   kwargs.pop("ids", None))
    info = {k: v for k, v in saved_info(first).items() if k in ("preset", "overrides", "args", "label")}
    return train_seeds(config, dataset, features, out, seeds or started, resume=True, run_info=info, **kwargs)


def _resume_finetune_seeds(out: Path, seeds: int | None, dataset=None, features=None, ids=None, images=None,
                           log=None, **kwargs) -> list[dict]:
    """Every seed of a fine-tuning seeds folder: started ones resumed, the others started
    from the same seed of the start folder (seed-0's run.json names it) as seed-0 was
    (its CNN and photos); ``seeds`` defaults to as many as were asked for at the start."""
    from fnemm.training.finetune import finetune, finetune_config, resume_finetune
    info = saved_info(out / "seed-0")
    start_dir = Path((info.get("finetune") or {}).get("from", "")).parent.parent
    seeds = seeds or info.get("seeds") or max(count_seeds(start_dir), 1)
    summaries = []
    for k in range(seeds):
        run = out / f"seed-{k}"
        if log:
            log(f"--- seed-{k} ({k + 1} of {seeds}) -> {run}")
        if (run / "last.pt").exists():
            summaries.append(resume_finetune(run, dataset, features=features, images=images, **kwargs))
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
                                  cnn=ft.get("cnn"), images=images or ft.get("images_dir"), features=features,
                                  run_info={k2: v for k2, v in info.items()
                                            if k2 in ("preset", "overrides", "args", "label", "seeds")},
                                  **kwargs))
    return summaries


def evaluate_runs(path: str | Path, dataset: Dataset, features, split: str = "test", protocol: str = "auto",
                  device: str = "cpu", ids: str | Path | None = None, output: str | Path | None = None,
                  fresh: bool = False) -> dict[str, dict]:
    """Evaluate a run (a folder or a .pt) or every seed of a seeds folder on ``split`` and
    save each one's metrics beside it (or to ``output``, for a single run): {run: results}.
    With ``fresh``, metrics saved after the run's best.pt with the same protocol are kept,
    not recomputed."""
    from fnemm.eval.protocols import evaluate
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
            saved = load_metrics(folder, split, target, protocol)
            if saved is not None:
                every[str(run)] = saved
                continue
        ranks: dict = {}
        results = evaluate(run, dataset, features, split, protocol, device, ids=ids, ranks=ranks)
        save_metrics(target, split, run, results, protocol)
        if ranks and not output:
            save_ranks(ranks_path(folder, split), ranks)
        every[str(run)] = results
    return every
