"""fnemm from a notebook: train, kill, resume, open the model, search a gallery and
evaluate, all from Python; and a killed multi-seed run resumed by one command."""

import os
import signal
import subprocess
import sys

import numpy as np
import torch

import fnemm
from test_train import SMALL, assert_same_run

# Threads pinned to 1, as the resume in this test process runs (conftest): float sums
# split over another number of threads round differently, and the test asserts bit-equal
# weights.
KILLED_TRAINING = """
import sys, torch, fnemm
torch.set_num_threads(1)
from fnemm.joint.config import apply_overrides
ds, feats = fnemm.load_dataset(sys.argv[1]), fnemm.load_features(sys.argv[2], ids=sys.argv[3])
config = apply_overrides(fnemm.get_preset("flickr30k/FNE-MH"), sys.argv[5:])
fnemm.train(config, ds, feats, sys.argv[4], quiet=True, checkpoint_every=0,
            run_info={"args": {"dataset": [sys.argv[1]], "features": sys.argv[2], "ids": sys.argv[3]}})
"""


def test_a_notebook_session(synth, tmp_path):
    jsonl, npy, ids = synth
    overrides = [*SMALL, "stages.max_epochs=5", "stages.lr=2e-3"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # an unbroken run, and one killed (as kill -9) after epoch 2, both started from Python
    for out, env in ((ref, {}), (cut, {"FNEMM_DIE_AT": "epoch-2"})):
        done = subprocess.run([sys.executable, "-c", KILLED_TRAINING, str(jsonl), str(npy), str(ids), str(out),
                               *overrides], env={**os.environ, **env})
        assert done.returncode == (-signal.SIGKILL if env else 0)
    summary = fnemm.resume(cut, quiet=True)              # run.json says what to read
    assert summary["epochs"] == 5
    assert_same_run(ref, cut)

    # open the model against its features, then search and evaluate
    opened = fnemm.open_model(cut, npy, ids=ids)
    assert opened.features.dim == 48 and opened.similarity_kind == "cosine"
    dataset = fnemm.load_dataset(jsonl)
    gallery = fnemm.Gallery.from_store(cut, npy, dataset, "test", ids=ids)
    hits = gallery.text("a red dog is running .", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and all(isinstance(h, fnemm.Hit) for h in hits)
    assert all(h.image in gallery for h in hits) and len(gallery) == 90
    first = gallery.image_ids[0]
    captions = gallery.image(first, k=3)
    assert len(captions) == 3 and all(c.caption for c in captions)
    assert gallery.similar(first, k=1)[0].image == first
    scores = fnemm.evaluate(cut, dataset, npy, "test", ids=ids)
    assert scores["all"]["rsum"] > 100 and scores["all"]["images"] == 90
    assert gallery.rank_of("a red dog is running .", hits[0].image) == 1


def test_a_killed_multi_seed_run_resumes_in_one_command(synth, tmp_path):
    jsonl, npy, ids = synth
    common = ["--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids),
              "--epochs", "3", "--lr", "2e-3", "--quiet", "--threads", "1", "--checkpoint-every", "0",
              "--seeds", "3", *sum((["--set", s] for s in SMALL), [])]
    cli = [sys.executable, "-m", "fnemm.cli", "train"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run([*cli, "--out", str(ref), *common], check=True)
    # killed (as kill -9) in seed 1's second epoch: seed 0 done, 1 half, 2 not started
    killed = subprocess.run([*cli, "--out", str(cut), *common], env={**os.environ, "FNEMM_DIE_AT": "seed-1/epoch-2"})
    assert killed.returncode == -signal.SIGKILL
    assert not (cut / "seed-2").exists()
    # one command resumes every seed, whatever state each is in
    subprocess.run([*cli, "--out", str(cut), "--seeds", "3", "--resume", "--quiet", "--threads", "1"], check=True)
    for k in range(3):
        assert_same_run(ref / f"seed-{k}", cut / f"seed-{k}")
    a = torch.load(cut / "seed-2" / "best.pt", weights_only=True)
    assert a["config"]["seed"] == 2 and np.isfinite(a["val"]["rsum"])
