"""Does this code train as the code that made a run did? Replays a finished (or started)
run's first epochs from its recorded config, on the same data and features, and compares
each epoch's loss and validation recalls with the run's metrics.jsonl, digit for digit.

    .venv/bin/python tools/replay_epochs.py RUN --dataset DATA --features STORE [--ids FILE]
        [--epochs 1] [--threads 1] [--out DIR]

Use it before continuing a grid of runs with other code (a new commit, another machine):
the Flickr8K benchmark's records came from a branch since lost, and its last runs were
trained at another commit once epoch 1 of two recorded runs came out identical (README).
Bit-for-bit needs what the run had: its torch, its CPU thread count (``--threads``, one
for the benchmark), a CPU with the same vector unit, and its features' bytes (the first
line printed says whether STORE's array is the one run.json names); on a GPU, with other
threads, or on a store extracted again with a continuous recipe, expect agreement to a
few digits, not all. Exit 0 when every replayed epoch matches, 1
when one differs (the first difference printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

COMPARED = ("loss", "rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def first_stage_only(config, epochs: int):
    """``config`` cut to its first stage's first ``epochs`` epochs (what the replay trains;
    the recorded epochs must all be of that stage)."""
    first = dataclasses.replace(config.stages[0], max_epochs=epochs, patience=None)
    return dataclasses.replace(config, stages=(first,))


def compare(recorded: list[dict], replayed: list[dict]) -> list[str]:
    """One line per difference between the recorded and the replayed epochs ([] if none)."""
    out = []
    for old, new in zip(recorded, replayed):
        for key in COMPARED:
            a = old["loss"] if key == "loss" else old["val"].get(key)
            b = new["loss"] if key == "loss" else new["val"].get(key)
            if a != b:
                out.append(f"epoch {old['epoch']}: {key} recorded {a!r}, replayed {b!r}")
    return out


def features_line(run: Path, record: dict, features) -> str:
    """Whether ``features`` are the bytes ``run`` trained on, from its run.json record: a
    replay on other bytes (the store extracted or derived again) can agree digit for digit
    for a discretised recipe (the FNE's {-1,0,1} absorbs last-bit differences in the
    activations) and not for a continuous one."""
    recorded, here = record.get("sha256"), features.sha256
    where = f"features: {features.kind} of {features.source}"
    if recorded and here:
        return f"{where}: the array {run} trained on" if recorded == here else \
            f"{where}: not the array {run} trained on (sha256 {recorded[:12]} recorded, {here[:12]} here: " \
            f"extracted or derived again?)"
    return f"{where}: {run}'s run.json names no sha256 of the array it trained on (made before runs " \
           f"recorded it), so whether these are its bytes cannot be told"


def main(argv=None) -> int:
    import torch
    from fnemm.datasets import load_dataset
    from fnemm.features.store import load_features
    from fnemm.io.errors import FnemmError
    from fnemm.training.folders import epoch_history, saved_config, saved_info
    from fnemm.training.trainer import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run folder whose epochs to replay (its config.json and metrics.jsonl)")
    p.add_argument("--dataset", action="append", required=True, help="the dataset (split file) it was trained on")
    p.add_argument("--features", required=True, help="the feature store it was trained on")
    p.add_argument("--ids", help="image ids of a .npy --features")
    p.add_argument("--epochs", type=int, default=1, help="how many of its first epochs (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the benchmark's runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="where the replay trains (default: a temporary folder, removed after)")
    args = p.parse_args(argv)
    try:
        if args.epochs < 1 or args.threads < 1:
            raise FnemmError("--epochs and --threads: at least 1")
        run = Path(args.run)
        config = saved_config(run)
        recorded = epoch_history(run)[:args.epochs]
        if len(recorded) < args.epochs:
            raise FnemmError(f"{run}: {len(recorded)} recorded epochs, fewer than --epochs {args.epochs}")
        if any(int(r.get("stage", 1)) != 1 for r in recorded):
            raise FnemmError(f"{run}: the first {args.epochs} epochs run past its first stage; replay fewer")
        torch.set_num_threads(args.threads)
        dataset = load_dataset(args.dataset)
        features = load_features(args.features, config.features, ids=args.ids)
        print(features_line(run, saved_info(run).get("features") or {}, features))
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(args.out) if args.out else Path(scratch) / "replay"
            train(first_stage_only(config, args.epochs), dataset, features, out, device=args.device, quiet=True)
            replayed = epoch_history(out)
    except FnemmError as e:
        print(f"replay_epochs: error: {e}", file=sys.stderr)
        return 2
    differences = compare(recorded, replayed)
    for old, new in zip(recorded, replayed):
        print(f"epoch {old['epoch']}: loss {old['loss']!r} -> {new['loss']!r}, "
              f"val rsum {old['val']['rsum']!r} -> {new['val']['rsum']!r}")
    if differences:
        print(f"differs: {differences[0]} ({len(differences)} differences)")
        return 1
    print(f"identical: {len(recorded)} epochs of {run} replayed to the last digit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
