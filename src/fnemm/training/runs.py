"""Working with run folders (fnemm.training.folders says what is in one): ``fit``, the one
way into training (one run or a seeds folder, trained or resumed, fine-tuning the CNN
included), and evaluating runs and saving their metrics, for the CLI, the demo, the
studies and Python alike. ``resume`` and ``train_seeds`` are ``fit``'s two common uses
under their own names (``fnemm.resume``, ``fnemm.train_seeds``)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from fnemm.datasets import Dataset
from fnemm.features.store import Features
from fnemm.io.errors import FnemmError
from fnemm.io.locks import folder_lock
from fnemm.io.progress import say
from fnemm.joint.config import TrainConfig
from fnemm.training.folders import (count_seeds, load_metrics, metrics_path, ranks_path, run_dataset, run_inputs,
                                    save_metrics, save_ranks, saved_config, saved_info, seed_dirs)

# what a resumed seed (or one started late) keeps of how seed-0 was started
KEPT_INFO = ("preset", "overrides", "args", "label", "seeds")


def fit(out: str | Path, config: TrainConfig | None = None, dataset=None, features=None, *,
        seeds: int | None = None, start: str | Path | None = None, overrides: list[str] | tuple = (),
        resume: bool = False, ids=None,
        images: str | Path | None = None, cnn: str | None = None, device: str = "cpu", quiet: bool = False,
        checkpoint_every: float = 120.0, run_info: dict | None = None, log=None) -> list[dict]:
    """Train, or resume, one run or a seeds folder in ``out``; each run's best summary.

    A new run: ``config`` on ``dataset`` and ``features`` (feature rows: a store or .npy,
    loaded or paths); or, fine-tuning the CNN, the FC7 run (or seeds folder) ``start`` on
    ``dataset``'s photos (default: the one it was trained on), each with its start run's
    config and ``overrides`` (see finetune_config).
    ``seeds``: out/seed-K for K < seeds, each with seed config.seed + K (None: one run in
    ``out``). With ``resume``, a run already in ``out`` continues where it stopped and a
    missing one starts; without a config or start, everything comes back from the folder
    (a run, a seeds folder or a fine-tuning run; seeds not yet started start as seed-0
    did), and ``dataset``, ``features``, ``ids``, ``images`` name inputs that moved."""
    out = Path(out)
    common = {"device": device, "quiet": quiet, "checkpoint_every": checkpoint_every}
    if start is not None:
        from fnemm.training.finetune import finetune_seeds
        if config is not None:
            raise FnemmError("fine-tuning starts from the start run's own config: give overrides, not a config")
        if features is not None or ids is not None:
            raise FnemmError("fine-tuning reads the photos, not feature rows: drop --features (the start run's "
                             "store names the CNN and the photos; --images DIR if they moved)")
        first = seed_dirs(start)[0] if Path(start).is_dir() else Path(start).parent
        start_args = (saved_info(first).get("args") or {}) if (first / "run.json").exists() else {}
        spec = start_args.get("dataset") if dataset is None else dataset
        run_info = dict(run_info or {})
        if isinstance(spec, (str, Path, list)) and "args" not in run_info:   # so that a resume finds it again
            run_info["args"] = {"dataset": [str(d) for d in (spec if isinstance(spec, list) else [spec])],
                                "restval": bool(start_args.get("restval"))}
        return finetune_seeds(start, run_dataset(first, dataset), out, seeds, overrides, log=log, images=images,
                              cnn=cnn, run_info=run_info, resume=resume, **common)
    if config is None:
        if not resume:
            raise FnemmError(f"{out}: a new run needs a config (a preset) or a run to fine-tune from")
        return _resume(out, seeds, dataset, features, ids, images, log, common)
    if dataset is None or features is None:
        raise FnemmError("--dataset and --features are required for a new run")
    from fnemm.training.trainer import train
    if seeds is None:
        return [train(config, dataset, features, out, resume=resume and (out / "last.pt").exists(),
                      run_info=run_info, **common)]
    if seeds < 1:
        raise FnemmError(f"--seeds {seeds}: expected at least 1")
    summaries = []
    # the whole seeds folder is this job's: refused while anyone writes it (a run in it, or
    # another --seeds job), and no seed of it is resumed under a running job
    with folder_lock(out, "a seeds folder"):
        for k in range(seeds):
            run = out / f"seed-{k}"
            if log:
                log(f"--- seed {config.seed + k} ({k + 1} of {seeds}) -> {run}")
            summaries.append(train(replace(config, seed=config.seed + k), dataset, features, run,
                                   resume=resume and (run / "last.pt").exists(), run_info=run_info, **common))
    return summaries


def _resume(out: Path, seeds: int | None, dataset, features, ids, images, log, common: dict) -> list[dict]:
    """Everything ``out`` holds, continued from the folder alone (see ``fit``)."""
    from fnemm.training.trainer import train
    several = seeds is not None or (out / "seed-0").is_dir()
    first = out / "seed-0" if several else out
    if not (first / "config.json").exists() or not several and not (out / "last.pt").exists():
        raise FnemmError(f"{out}: no run to resume here (no {'seed-0/' if several else ''}last.pt); start one "
                         f"with --preset")
    config = saved_config(first)
    if config.finetune is not None:             # the CNN fine-tuned on photos: no feature rows to load
        if ids is not None:
            raise FnemmError(f"{out}: a fine-tuning run reads a feature store's photos, not a .npy matrix; drop "
                             f"--ids (--features STORE names a moved store)")
        return _resume_finetuning(out, several, seeds, dataset, features, images, log, common)
    if images is not None:
        raise FnemmError(f"{out}: --images is for fine-tuning runs; this one trains on feature rows (--features)")
    dataset, features = run_inputs(first, config, dataset, features, ids)
    info = saved_info(first)
    if not several:
        keep = {k: v for k, v in info.items() if k not in ("dataset", "n_train", "n_val", "features",
                                                            "vocab_size", "feature_dim")}
        return [train(config, dataset, features, out, resume=True, run_info=keep, **common)]
    return fit(out, config, dataset, features, seeds=seeds or count_seeds(out), resume=True,
               run_info={k: v for k, v in info.items() if k in KEPT_INFO}, log=log, **common)


def _resume_finetuning(out: Path, several: bool, seeds: int | None, dataset, features, images, log,
                       common: dict) -> list[dict]:
    """A fine-tuning run, or every seed of a folder of them: started ones resumed, the others
    started from the same seed of the start folder (seed-0's run.json names it) as seed-0
    was (its CNN and photos); ``seeds`` defaults to as many as were asked for at the start."""
    from fnemm.training.finetune import (finetune, finetune_config, recorded_images, recorded_start,
                                         resume_finetune)
    if not several:
        return [resume_finetune(out, run_dataset(out, dataset), features=features, images=images, **common)]
    info = saved_info(out / "seed-0")
    dataset = run_dataset(out / "seed-0", dataset)
    start_dir = recorded_start(out / "seed-0", info.get("finetune") or {}).parent.parent
    seeds = seeds or info.get("seeds") or max(count_seeds(start_dir), 1)
    summaries = []
    for k in range(seeds):
        run = out / f"seed-{k}"
        if log:
            log(f"--- seed-{k} ({k + 1} of {seeds}) -> {run}")
        if (run / "last.pt").exists():
            summaries.append(resume_finetune(run, dataset, features=features, images=images, **common))
            continue
        start = start_dir / f"seed-{k}"
        if not (start / "best.pt").exists():
            raise FnemmError(f"{run}: not started, and {start} (its start run) is not there")
        ft = info.get("finetune") or {}          # seed-0's CNN and photos, as it was started
        summaries.append(finetune(start, dataset, run, config=finetune_config(start, info.get("overrides") or []),
                                  cnn=ft.get("cnn"), images=images or recorded_images(out / "seed-0", ft),
                                  features=features,
                                  run_info={k2: v for k2, v in info.items() if k2 in KEPT_INFO}, **common))
    return summaries


def resume(out: str | Path, *, dataset=None, features=None, ids=None, images=None, device: str = "cpu",
           quiet: bool = False, checkpoint_every: float = 120.0) -> dict:
    """Continue the run in ``out`` where it stopped, from its folder alone (``fit`` with
    resume=True, for one run): its best summary."""
    if (Path(out) / "seed-0").is_dir():
        raise FnemmError(f"{out}: a seeds folder; resume every seed with fit(out, resume=True) "
                         f"(fnemm train --out {out} --resume)")
    return fit(out, dataset=dataset, features=features, ids=ids, images=images, resume=True, device=device,
               quiet=quiet, checkpoint_every=checkpoint_every)[0]


def train_seeds(config: TrainConfig, dataset: Dataset, features: Features, out: str | Path, seeds: int, *,
                resume: bool = False, device: str = "cpu", quiet: bool = False, run_info: dict | None = None,
                checkpoint_every: float = 120.0, log=None) -> list[dict]:
    """``seeds`` runs of ``config`` in ``out/seed-K`` with seeds config.seed + K (``fit`` with
    seeds); with ``resume``, each continues from wherever it is."""
    return fit(out, config, dataset, features, seeds=seeds, resume=resume, device=device, quiet=quiet,
               run_info=run_info, checkpoint_every=checkpoint_every, log=log)


def evaluate_runs(path: str | Path, dataset: Dataset | None, features, split: str = "test", protocol: str = "auto",
                  device: str = "cpu", ids: str | Path | None = None, output: str | Path | None = None,
                  fresh: bool = False) -> dict[str, dict]:
    """Evaluate a run (a folder or a .pt) or every seed of a seeds folder on ``split`` and
    save each one's metrics beside it (or to ``output``, for a single run): {run: results}.
    ``dataset`` / ``features`` None: each run's own (its run.json's; ``trained_store``).
    With ``fresh``, metrics saved after the run's best.pt with the same protocol are kept,
    not recomputed."""
    from fnemm.eval.protocols import evaluate
    from fnemm.joint.checkpoint import checkpoint_file, read_checkpoint, trained_store, unfinished
    path = Path(path)
    runs = seed_dirs(path) if path.is_dir() and not (path / "best.pt").exists() else [path]
    if features is None and ids is not None:
        raise FnemmError("--ids names the rows of a .npy given with --features; pass that .npy too")
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
            if saved is not None and not (any(m.get("unfinished") for m in saved.values()) and not unfinished(folder)):
                every[str(run)] = saved
                continue
        ranks: dict = {}
        data, store = dataset, features
        if not checkpoint_file(run).exists():
            read_checkpoint(run)              # its one-line error, before the defaults read run.json
        if data is None:
            data = run_dataset(folder)
            say(f"dataset: {data.summary()} (the one {folder.name} was trained on)", sys.stderr)  # stdout: --json
        if store is None:
            store = trained_store(run)
            say(f"features: {store} (the store {folder.name} was trained on)", sys.stderr)
        results = evaluate(run, data, store, split, protocol, device, ids=ids, ranks=ranks)
        save_metrics(target, split, run, results, protocol)
        if ranks and not output:
            save_ranks(ranks_path(folder, split), ranks)
        every[str(run)] = results
    return every
