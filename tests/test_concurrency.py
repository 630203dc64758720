"""One writer per folder: a second train / index build / extract into a folder in use is
refused with one line naming the first, whose result stays intact; a killed extraction
leaves no process behind; the next writer removes a killed one's temporary files.

Processes are paused at named points (FNEMM_PAUSE_AT) and let go through stdin: no
test here waits on the clock, except a deadline while the kernel reaps killed workers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tinycnn
from test_extract import write_dataset
from test_train import SMALL

CLI = [sys.executable, "-m", "fnemm.cli"]


def env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]), **extra}


def paused(args, point):
    """Start ``fnemm ARGS`` and return it once it is paused at ``point``."""
    proc = subprocess.Popen([*CLI, *args], env=env(FNEMM_PAUSE_AT=point), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if f"paused at {point}" in line:
            return proc
    raise AssertionError(f"never paused at {point}: {proc.wait()} {proc.stdout.read()}")


def go(proc) -> int:
    proc.stdin.write("go\n")
    proc.stdin.close()
    return proc.wait()


def refused(args, holder) -> str:
    second = subprocess.run([*CLI, *args], env=env(), capture_output=True, text=True)
    err = second.stderr.strip()
    assert second.returncode == 2 and err.startswith("fnemm: error:") and "\n" not in err, err
    assert f"is being written by pid {holder.pid}" in err, err
    return err


def train_args(synth, out, *extra):
    jsonl, npy, ids = synth
    return ["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids),
            "--out", str(out), "--epochs", "2", "--quiet", "--threads", "1", *sum((["--set", s] for s in SMALL), []),
            *extra]


def test_a_second_training_run_into_the_same_folder_is_refused(synth, tmp_path):
    first = paused(train_args(synth, tmp_path / "run", "--lr", "2e-3"), "epoch-1")
    err = refused(train_args(synth, tmp_path / "run", "--lr", "5e-3"), first)
    assert "a training run" in err and str(tmp_path / "run") in err
    assert go(first) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {s["lr"] for s in config["stages"]} == {2e-3}                  # the first run's, whole
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    from fnemm.joint.config import TrainConfig
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert TrainConfig.from_dict(best["config"]) == TrainConfig.from_dict(config)


def test_a_seeds_job_is_refused_while_a_run_writes_its_folder_and_the_other_way_round(synth, tmp_path):
    """train --seeds takes the whole folder: refused while a run trains in it (it wrote
    seed-0/ and seed-1/ beside that run before), and a second --seeds job is refused too."""
    first = paused(train_args(synth, tmp_path / "runC"), "epoch-1")
    err = refused(train_args(synth, tmp_path / "runC", "--seeds", "2"), first)
    assert str(tmp_path / "runC") in err
    assert go(first) == 0
    assert not (tmp_path / "runC" / "seed-0").exists() and not (tmp_path / "runC" / "seed-1").exists()
    seeds = paused(train_args(synth, tmp_path / "many", "--seeds", "2"), "epoch-1")
    err = refused(train_args(synth, tmp_path / "many", "--seeds", "2", "--resume"), seeds)
    assert "a seeds folder" in err
    assert go(seeds) == 0 and (tmp_path / "many" / "seed-1" / "best.pt").exists()


def test_a_second_index_build_into_the_same_folder_is_refused(synth, tmp_path):
    from fnemm import get_preset, load_dataset, load_features, train
    from fnemm.joint.config import apply_overrides
    jsonl, npy, ids = synth
    config = apply_overrides(get_preset("flickr30k/FNE-MH"), [*SMALL, "stages.max_epochs=1"])
    for name in ("a", "b"):
        train(apply_overrides(config, [f"seed={ord(name)}"]), load_dataset(jsonl), load_features(npy, ids=ids),
              tmp_path / name, quiet=True)
    common = ["index", "build", "--features", str(npy), "--ids", str(ids), "--out", str(tmp_path / "index"),
              "--dataset", str(jsonl), "--quiet"]
    first = paused([*common, "--checkpoint", str(tmp_path / "a")], "index-sides")
    refused([*common, "--checkpoint", str(tmp_path / "b")], first)
    assert go(first) == 0
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["request"]["checkpoint"]["path"] == str((tmp_path / "a" / "best.pt").resolve())
    from fnemm import Gallery
    assert len(Gallery.from_index(tmp_path / "index").text("a red dog", 3)) == 3      # intact, loadable


def test_a_second_extraction_into_the_same_store_is_refused_and_the_first_completes(tmp_path):
    names = tinycnn.write_images(tmp_path / "images", 12)
    data = write_dataset(tmp_path, names, extra=())
    common = ["extract", "--images", str(tmp_path / "images"), "--dataset", str(data), "--cnn", "tinycnn:build",
              "--batch-size", "1", "--chunk-size", "2", "--workers", "0", "--threads", "1", "--quiet"]
    subprocess.run([*CLI, *common, "--out", str(tmp_path / "ref")], env=env(), check=True, capture_output=True)
    first = paused([*common, "--out", str(tmp_path / "store")], "chunk-1")
    refused([*common, "--out", str(tmp_path / "store"), "--crops", "1"], first)
    assert go(first) == 0
    for f in ("raw.npy", "stats.npy", "fne.npy", "fc7.npy"):
        assert (tmp_path / "store" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":            # pgrp, not a zombie
                members.append(int(entry.name))
    return members


def test_a_killed_extraction_leaves_no_process_behind(tmp_path):
    names = tinycnn.write_images(tmp_path / "images", 16)
    data = write_dataset(tmp_path, names, extra=())
    proc = subprocess.Popen([*CLI, "extract", "--images", str(tmp_path / "images"), "--dataset", str(data),
                             "--cnn", "tinycnn:build", "--batch-size", "1", "--chunk-size", "2", "--workers", "2",
                             "--threads", "1", "--quiet", "--out", str(tmp_path / "store")],
                            env=env(FNEMM_DIE_AT="chunk-1"), start_new_session=True)
    assert proc.wait() == -signal.SIGKILL
    # its DataLoader workers die with it (PR_SET_PDEATHSIG): wait for the kernel to reap them
    deadline = time.monotonic() + 30
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(proc.pid) == []
    again = subprocess.run([*CLI, "extract", "--images", str(tmp_path / "images"), "--dataset", str(data),
                            "--cnn", "tinycnn:build", "--batch-size", "1", "--chunk-size", "2", "--workers", "2",
                            "--threads", "1", "--quiet", "--out", str(tmp_path / "store")], env=env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


def test_the_next_writer_removes_a_killed_writers_temporary_files(synth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.pt.k3j2h1.tmp", run / ".metrics.jsonl.x.tmp"]
    for p in stale:
        p.write_bytes(np.zeros(1000, np.uint8).tobytes())
    keep = run / "notes.tmp"                                              # not ours: kept
    keep.write_text("mine")
    subprocess.run([*CLI, *train_args(synth, run, "--epochs", "1")], env=env(), check=True)
    assert not any(p.exists() for p in stale) and keep.exists()
