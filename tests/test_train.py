"""Training really learns, resumes exactly after a kill, and keeps the best epoch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fnemm import TrainConfig, apply_overrides, evaluate, get_preset, load_dataset, load_features, train
from fnemm.joint.config import ModelConfig, StageConfig
from fnemm.eval.metrics import evaluate_embeddings

SMALL = ["model.embed_dim=64", "model.word_dim=32", "batch_size=32"]


def small_config(**stage) -> TrainConfig:
    st = {"loss": "max", "lr": 2e-3, "margin": 0.2, "max_epochs": 12, **stage}
    return TrainConfig(model=ModelConfig(word_dim=32, embed_dim=64), stages=(StageConfig(**st),),
                       batch_size=32)


def chance_rsum(n_images: int, seed: int = 0) -> float:
    """rsum of random embeddings on a split of this size: the level to beat."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.arange(n_images).repeat_interleave(5)
    return evaluate_embeddings(torch.randn(n_images, 16, generator=g), torch.randn(5 * n_images, 16, generator=g),
                               owner, "cosine")["rsum"]


@pytest.mark.parametrize("similarity,use_abs", [("cosine", False), ("order", True)])
def test_learns_far_above_chance(synth, tmp_path, similarity, use_abs):
    jsonl, npy, ids = synth
    ds, feats = load_dataset(jsonl), load_features(npy, ids=ids)
    cfg = small_config()
    cfg = TrainConfig(model=ModelConfig(word_dim=32, embed_dim=64, similarity=similarity, use_abs=use_abs),
                      stages=cfg.stages, batch_size=32)
    summary = train(cfg, ds, feats, tmp_path / "run", quiet=True)
    chance = chance_rsum(90)
    assert chance < 120
    assert summary["val"]["rsum"] > 3 * chance, summary
    # Test split, through the public evaluate(): also far above chance.
    test = evaluate(tmp_path / "run", ds, feats, "test")
    assert test["all"]["rsum"] > 3 * chance
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12
    best = max(json.loads(x)["val"]["rsum"] for x in lines)
    assert best == summary["val"]["rsum"]
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["val"]["rsum"] == best


def test_curriculum_switches_loss_and_starts_from_best(synth, tmp_path):
    jsonl, npy, ids = synth
    cfg = TrainConfig(model=ModelConfig(word_dim=32, embed_dim=64),
                      stages=(StageConfig(loss="sum", lr=2e-3, max_epochs=6, patience=2),
                              StageConfig(loss="max", lr=1e-4, max_epochs=3)), batch_size=32)
    train(cfg, load_dataset(jsonl), load_features(npy, ids=ids), tmp_path / "run", quiet=True)
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage1 = [h for h in hist if h["stage"] == 1]
    stage2 = [h for h in hist if h["stage"] == 2]
    assert len(stage2) == 3 and all(h["lr"] == 1e-4 for h in stage2)
    assert 1 <= len(stage1) <= 6
    # patience: stage 1 stopped only after 2 epochs without a better rsum, or at max_epochs
    if len(stage1) < 6:
        best_at = max(range(len(stage1)), key=lambda k: stage1[k]["val"]["rsum"])
        assert len(stage1) - 1 - best_at == 2
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["state"]["done"] and last["state"]["stage"] == 2


def _cli(*args):
    return [sys.executable, "-m", "fnemm.cli", *args]


def test_warmup_puts_sum_of_hinges_epochs_before_a_max_of_hinges_pipeline(synth, tmp_path, capsys):
    from fnemm import FnemmError, with_warmup
    from fnemm.cli import main
    paper = get_preset("flickr8k/FNE-MH")                      # MH at 2e-4, then the authors' drop to 2e-5
    warm = with_warmup(paper, 3)
    assert warm.stages[1:] == paper.stages and warm.model == paper.model
    assert warm.stages[0] == StageConfig(loss="sum", lr=paper.stages[0].lr, margin=paper.stages[0].margin,
                                         max_epochs=3, patience=None)
    for config, epochs, message in [(paper, 0, "at least 1"), (get_preset("flickr8k/FNE-SH"), 2, "already"),
                                    (get_preset("flickr8k/FNE-PH"), 2, "already")]:
        with pytest.raises(FnemmError, match=message):
            with_warmup(config, epochs)

    jsonl, npy, ids = synth
    out = tmp_path / "run"
    assert main(["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--epochs", "3", "--lr", "2e-3", "--warmup", "2", "--quiet", "--out", str(out),
                 *sum((["--set", s] for s in SMALL), [])]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert [(st["loss"], st["max_epochs"], st["lr"]) for st in saved["stages"]] == [("sum", 2, 2e-3),
                                                                                   ("max", 3, 2e-3)]
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == [1, 1, 2, 2, 2]
    info = json.loads((out / "run.json").read_text())
    assert info["overrides"][-1] == "--warmup 2" and info["label"] == "FNE-MH-warmup2"   # not the paper's FNE-MH row
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--warmup", "2"]) == 2       # the saved config rules
    assert "drop --set" in capsys.readouterr().err


def test_authors_init_and_image_bias_train_save_and_load_from_the_cli(synth, tmp_path, capsys):
    """--init authors and --image-bias reach config.json and run.json, train, and load back
    from the weights_only checkpoint with the bias; the image map's bias is never decayed."""
    from fnemm import FnemmError
    from fnemm.cli import main
    from fnemm.joint.checkpoint import load_checkpoint
    from fnemm.joint.config import validate
    from fnemm.joint.model import JointEmbedding
    from fnemm.training.optim import new_optimizer
    jsonl, npy, ids = synth
    out = tmp_path / "run"
    assert main(["train", "--preset", "flickr8k/FC7-MH", "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--epochs", "2", "--lr", "2e-3", "--init", "authors", "--image-bias",
                 "--quiet", "--out", str(out), *sum((["--set", s] for s in SMALL), [])]) == 0
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["init"] == "authors" and saved["image_bias"] is True
    assert {"model.init=authors", "model.image_bias=true"} <= set(json.loads((out / "run.json").read_text())["overrides"])
    model, _, config, _ = load_checkpoint(out / "best.pt")
    assert config.model.image_bias and model.image.fc.bias is not None and model.image.fc.bias.abs().sum() > 0
    assert evaluate(out, load_dataset(jsonl), load_features(npy, ids=ids), "test")["all"]["rsum"] > 0

    model = JointEmbedding(ModelConfig(word_dim=4, embed_dim=6, image_bias=True), vocab_size=9, feature_dim=5)
    decay = {id(p): g["weight_decay"] for g in new_optimizer(model, 1e-3, 0.5, "standard").param_groups
             for p in g["params"]}
    assert decay[id(model.image.fc.weight)] == 0.5 and decay[id(model.image.fc.bias)] == 0.0
    with pytest.raises(FnemmError, match="model.init='xavier'"):
        validate(apply_overrides(small_config(), ["model.init=xavier"]))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--init", "torch"]) == 2       # the saved config rules
    assert "drop --set" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint_every,adam", [("0", "standard"), ("1e9", "standard"), ("0", "authors")])
def test_resume_after_kill_reaches_the_same_state(synth, tmp_path, checkpoint_every, adam):
    """Killed mid-run, resumed: the same weights, history and best as an unbroken run.
    With "1e9" last.pt is only written at the start, so the resume re-runs every
    epoch whose metrics were already written. The authors' Adam keeps its step count
    and moments in last.pt as torch's does."""
    jsonl, npy, ids = synth
    common = ["--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy),
              "--ids", str(ids), "--epochs", "8", "--lr", "2e-3", "--quiet", "--threads", "1",
              "--checkpoint-every", checkpoint_every, "--adam", adam,
              *sum((["--set", s] for s in SMALL), [])]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli("train", "--out", str(ref), *common), check=True)

    # killed (SIGKILL, as kill -9) right after epoch 3 of 8 wrote its metrics
    killed = subprocess.run(_cli("train", "--out", str(cut), *common), env={**os.environ, "FNEMM_DIE_AT": "epoch-3"})
    assert killed.returncode == -signal.SIGKILL
    metrics = cut / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 3
    saved = torch.load(cut / "last.pt", weights_only=True)["state"]["epoch"]
    assert saved == (3 if checkpoint_every == "0" else 0)    # "1e9": epochs past the start get re-run

    subprocess.run(_cli("train", "--out", str(cut), "--resume", "--quiet", "--threads", "1"), check=True)
    assert_same_run(ref, cut)
    # run.json says which code trained it, and that (and with what) it was resumed, at which epoch
    from fnemm.io.version import __version__
    info = json.loads((cut / "run.json").read_text())
    assert info["software"]["fnemm"] == __version__ and info["software"]["threads"] == 1
    assert info["software"]["device"] == "cpu" and info["software"]["torch"] == torch.__version__
    assert [r["epoch"] for r in info["resumed"]] == [saved] and info["resumed"][0]["fnemm"] == __version__
    assert "resumed" not in json.loads((ref / "run.json").read_text())
    subprocess.run(_cli("train", "--out", str(cut), "--resume", "--quiet"), check=True)     # finished: nothing to note
    assert json.loads((cut / "run.json").read_text())["resumed"] == info["resumed"]


def test_the_commit_a_run_records_is_the_checkout_s_and_says_when_src_differs(tmp_path):
    """source_commit: the checkout's HEAD, "modified" only for tracked files under src/
    (results and README edits are not the code); nothing outside a git checkout of fnemm."""
    from fnemm.io.version import source_commit
    root = tmp_path / "checkout"
    (root / "src" / "fnemm").mkdir(parents=True)
    assert source_commit(root) is None                                    # no .git
    code = root / "src" / "fnemm" / "a.py"
    code.write_text("x = 1\n")
    (root / "README.md").write_text("r\n")
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True, text=True).stdout  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", "--allow-empty")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    head = git("rev-parse", "HEAD").strip()
    assert source_commit(root) == {"commit": head, "modified": False}
    (root / "README.md").write_text("changed\n")
    (root / "src" / "fnemm" / "new.py").write_text("untracked\n")
    assert source_commit(root) == {"commit": head, "modified": False}
    code.write_text("x = 2\n")
    assert source_commit(root) == {"commit": head, "modified": True}
    assert source_commit(tmp_path) is None                                # not a checkout of fnemm


def test_run_code_reads_what_run_json_says_and_unknown_for_what_it_cannot(tmp_path):
    from fnemm.training.folders import run_code
    run = tmp_path / "run"
    run.mkdir()
    assert run_code(run) is None                                          # no run.json
    for info, code in [({"state": "finished"}, None),                    # made before runs recorded it
                       ({"software": {"commit": "a" * 40, "modified": False}}, ["aaaaaaa"]),
                       ({"software": {"commit": None, "fnemm": "0.1.0"},
                         "resumed": [{"epoch": 3, "commit": "b" * 40, "modified": True},
                                     {"epoch": 5, "commit": "b" * 40, "modified": True}]},
                        ["fnemm 0.1.0", "bbbbbbb+modified"]),
                       ({"software": {"commit": 7}}, ["fnemm None"]), ([1, 2], None)]:
        (run / "run.json").write_text(json.dumps(info))
        assert run_code(run) == code, info
    (run / "run.json").write_text("{damaged")
    assert run_code(run) is None


def assert_same_run(ref: Path, cut: Path):
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda h: {k: v for k, v in h.items() if k != "time_s"}  # noqa: E731
    assert [strip(h) for h in a["state"]["history"]] == [strip(h) for h in b["state"]["history"]]
    assert a["state"]["best_epoch"] == b["state"]["best_epoch"]
    ba = torch.load(ref / "best.pt", weights_only=True)
    bb = torch.load(cut / "best.pt", weights_only=True)
    assert all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])


def test_existing_run_needs_resume(synth, tmp_path):
    from fnemm import FnemmError
    jsonl, npy, ids = synth
    ds, feats = load_dataset(jsonl), load_features(npy, ids=ids)
    cfg = small_config(max_epochs=1)
    train(cfg, ds, feats, tmp_path / "run", quiet=True)
    with pytest.raises(FnemmError, match="--resume"):
        train(cfg, ds, feats, tmp_path / "run", quiet=True)
    # resuming a finished run is a no-op that returns the same best
    again = train(cfg, ds, feats, tmp_path / "run", quiet=True, resume=True)
    assert again["epochs"] == 1
    with pytest.raises(FnemmError, match=r"another config \(stages\.0\.max_epochs\); resume without"):
        train(small_config(max_epochs=2), ds, feats, tmp_path / "run", quiet=True, resume=True)


def test_layer_norm_gru_trains(synth, tmp_path):
    jsonl, npy, ids = synth
    cfg = apply_overrides(small_config(max_epochs=3), ["model.layer_norm=true"])
    summary = train(cfg, load_dataset(jsonl), load_features(npy, ids=ids), tmp_path / "run", quiet=True)
    assert summary["val"]["rsum"] > 1.5 * chance_rsum(90)


def test_image_weight_decay_and_dropout(synth, tmp_path):
    """Decay shrinks the image map (and only it) against the same run without; dropout
    acts while training only."""
    from fnemm.joint.model import JointEmbedding
    jsonl, npy, ids = synth
    ds, feats = load_dataset(jsonl), load_features(npy, ids=ids)
    runs = {}
    for name, extra in (("plain", []), ("decay", ["image_weight_decay=5.0"])):
        cfg = apply_overrides(small_config(max_epochs=3), extra)
        train(cfg, ds, feats, tmp_path / name, quiet=True)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    norm = {k: float(v["image.fc.weight"].norm()) for k, v in runs.items()}
    assert norm["decay"] < 0.9 * norm["plain"], norm
    assert torch.equal(runs["decay"]["text.embed.weight"][:2], runs["plain"]["text.embed.weight"][:2])
    model = JointEmbedding(apply_overrides(small_config(), ["model.image_dropout=0.5"]).model, 10, 48)
    x = torch.ones(4, 48)
    model.eval()
    assert torch.equal(model.image(x), model.image(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.image(x), model.image(x))


def test_a_megabyte_caption_is_cut_with_a_warning_and_memory_stays_bounded(synth, tmp_path):
    """One 1 MB caption among the training captions: cut to max_caption_tokens (100), the
    warning names the image, and the training process peaks under 1 GiB (uncut, every
    batch holding it would pad to 250,000 steps)."""
    jsonl, npy, ids = synth
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    records[0]["captions"][0] = "a dog runs " * 90_000                  # ~1 MB, 270,000 tokens
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # VmHWM: this process's own peak (ru_maxrss would count the forking pytest's RSS too,
    # which Linux carries across exec)
    script = ("import sys, fnemm\n"
              "from fnemm.joint.config import apply_overrides\n"
              "ds, feats = fnemm.load_dataset(sys.argv[1]), fnemm.load_features(sys.argv[2], ids=sys.argv[3])\n"
              "cfg = apply_overrides(fnemm.get_preset('flickr30k/FNE-MH'), sys.argv[5:])\n"
              "fnemm.train(cfg, ds, feats, sys.argv[4], quiet=True)\n"
              "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.jsonl"), str(npy), str(ids),
                           str(tmp_path / "run"), *SMALL, "stages.max_epochs=1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert "1 caption(s) longer than 100 tokens cut to 100, e.g. caption 1 of img00000.jpg" in done.stderr


def test_gradient_clipping_per_tensor_and_global_by_hand():
    from fnemm.training.optim import clip_gradients
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))

    def grads():
        a.grad = torch.tensor([3.0, 4.0, 0.0])                  # norm 5
        b.grad = torch.tensor([[0.3, 0.0], [0.0, 0.4]])         # norm 0.5
    grads()
    clip_gradients([a, b], 2.0, "per-tensor")                   # each on its own: a to norm 2, b untouched
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * 2 / (5 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([[0.3, 0.0], [0.0, 0.4]]))
    grads()
    clip_gradients([a, b], 2.0, "global")                      # one norm: sqrt(25 + 0.25), both scaled
    scale = 2 / (np.sqrt(25.25) + 1e-6)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * scale)
    torch.testing.assert_close(b.grad, torch.tensor([[0.3, 0.0], [0.0, 0.4]]) * scale)


def test_authors_adam_is_the_theano_update_by_hand_and_resumes_from_its_state(tmp_path):
    """AuthorsAdam against the paper's Theano code (code/optim.py) written out in float64
    numpy, over two parameter groups; its state survives a weights_only save and load."""
    from fnemm.training.optim import AuthorsAdam
    rng = np.random.default_rng(0)
    shapes, lrs = [(3, 4), (5,)], [2e-4, 1e-3]
    start = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * 10 ** rng.uniform(-3, 1) for s in shapes] for _ in range(40)]

    # the Theano code: b1 = 0.1, b2 = 0.001, e = 1e-8, one step counter i for all parameters
    ref, m, v = [p.copy() for p in start], [np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes]
    for i, gs in enumerate(grads, start=1):
        for k, g in enumerate(gs):
            lr_t = lrs[k] * (np.sqrt(1 - 0.001 ** i) / (1 - 0.1 ** i))
            m[k] = 0.1 * g + 0.9 * m[k]
            v[k] = 0.001 * g ** 2 + 0.999 * v[k]
            ref[k] = ref[k] - lr_t * (m[k] / (np.sqrt(v[k]) + 1e-8))

    def make(params):
        return AuthorsAdam([{"params": [params[0]], "lr": lrs[0]}, {"params": [params[1]]}], lr=lrs[1])
    params = [torch.nn.Parameter(torch.tensor(p)) for p in start]
    opt = make(params)
    for gs in grads[:25]:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, tmp_path / "o.pt")
    saved = torch.load(tmp_path / "o.pt", weights_only=True)             # a checkpoint is data only
    params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt = make(params)
    opt.load_state_dict(saved["opt"])
    for gs in grads[25:]:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12, atol=1e-14)

    # what the docstring says: for a steady gradient its first step is 3.5x Adam's (lr)
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    w.grad = torch.ones(1, dtype=torch.float64)
    AuthorsAdam([w], lr=1.0).step()
    assert -w.item() == pytest.approx(np.sqrt(0.999) / 0.9 * 0.1 / np.sqrt(0.001), rel=1e-6)
    assert -w.item() == pytest.approx(3.512, abs=1e-3)
    # decoupled decay (AdamW's) before the step: with a zero gradient only the decay acts
    w = torch.nn.Parameter(torch.full((2,), 4.0, dtype=torch.float64))
    w.grad = torch.zeros(2, dtype=torch.float64)
    AuthorsAdam([w], lr=0.01, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), torch.full((2,), 4.0 * (1 - 0.01 * 0.5), dtype=torch.float64))


def test_curriculum_full_policy_runs_stage_one_to_its_end_and_continues_from_its_best(synth, tmp_path):
    jsonl, npy, ids = synth
    cfg = TrainConfig(model=ModelConfig(word_dim=32, embed_dim=64),
                      stages=(StageConfig(loss="sum", lr=5e-3, max_epochs=6, patience=None),
                              StageConfig(loss="max", lr=1e-4, max_epochs=2)), batch_size=32)
    train(cfg, load_dataset(jsonl), load_features(npy, ids=ids), tmp_path / "run", quiet=True)
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == [1] * 6 + [2] * 2           # no early end of stage 1
    best1 = max(h["val"]["rsum"] for h in hist[:6])
    # stage 2 starts from stage 1's best weights: its first epoch is near that best, not the last epoch
    assert hist[6]["val"]["rsum"] >= best1 - 30


@pytest.mark.parametrize("losses,rsums,epochs,best", [
    # on the plateau (12.8 for max of hinges, margin 0.2, batch 32; >= 0.9 of it) for 6
    # epochs, rsum creeping, then learning: patience 2 counts from the first epoch off it
    ([12.7, 12.6, 12.5, 12.4, 12.3, 12.2, 5, 4, 3, 3, 3, 3], [10, 9, 9, 9, 9, 9, 30, 29, 29, 29, 29, 29], 9, 7),
    # off the plateau from the start: the same patience stops after epoch 3
    ([11, 10, 9, 8, 7, 6, 5, 4, 3, 3, 3, 3], [10, 9, 9, 9, 9, 9, 30, 29, 29, 29, 29, 29], 3, 1),
    # never leaves it: max_epochs ends the stage
    ([12.7] * 12, [10] + [9] * 11, 12, 1),
])
def test_patience_does_not_count_epochs_on_the_plateau(synth, tmp_path, monkeypatch, capsys, losses, rsums, epochs,
                                                      best):
    """A max-of-hinges run can sit near the loss of equal scores for tens of epochs before
    it learns; stopping it there keeps a model that never started (the benchmark's runs
    sat there 25-75 epochs). The trainer's own epochs and validations run; only the loss
    and rsum they report are scripted."""
    from fnemm.joint.losses import PLATEAU_SHARE, plateau_loss
    from fnemm.training.trainer import Trainer
    assert plateau_loss("max", 0.2, 32) == pytest.approx(12.8) and PLATEAU_SHARE * 12.8 < 12.2
    assert plateau_loss("sum", 0.2, 32) == pytest.approx(12.8 * 31)
    scripted_loss, scripted_rsum = iter(losses), iter(rsums)
    real_epoch, real_validate = Trainer._epoch, Trainer._validate
    monkeypatch.setattr(Trainer, "_epoch", lambda self: (real_epoch(self), next(scripted_loss))[1])
    monkeypatch.setattr(Trainer, "_validate", lambda self: {**real_validate(self), "rsum": next(scripted_rsum)})
    jsonl, npy, ids = synth
    cfg = small_config(patience=2, max_epochs=12)
    summary = train(cfg, load_dataset(jsonl), load_features(npy, ids=ids), tmp_path / "run")
    assert (summary["epochs"], summary["best_epoch"]) == (epochs, best)
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if x.startswith("epoch ")]
    assert len(lines) == epochs                                  # the log says which epochs patience skipped
    for line, loss in zip(lines, losses):
        assert ("on the loss plateau: patience waits" in line) is (loss >= 11.52), line
        assert ("/2 without a better rsum" in line) is (loss < 11.52), line
    from fnemm.training.folders import training_summary        # what the study's report counts
    counted = training_summary(tmp_path / "run")
    assert counted["plateau_epochs"] == sum(x >= 11.52 for x in losses[:epochs])
    assert counted["ended_on_plateau"] is (losses[epochs - 1] >= 11.52) is (epochs == 12)   # only the run that never left


def test_replay_epochs_tool_reproduces_a_run_and_names_a_difference(synth, tmp_path, capsys):
    """tools/replay_epochs.py (how the benchmark's last runs were checked against the lost
    code's records): the same code replays a run's first epochs to the last digit; a record
    that differs is named, and exits 1."""
    import importlib.util
    from fnemm.cli import main
    jsonl, npy, ids = synth
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy),
                     "--ids", str(ids), "--epochs", "3", "--threads", "1", "--quiet", "--out", str(run),
                     *sum((["--set", s] for s in SMALL), [])]) == 0
        spec = importlib.util.spec_from_file_location("replay_epochs", Path(__file__).resolve().parents[1] / "tools"
                                                      / "replay_epochs.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        common = [str(run), "--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids)]
        capsys.readouterr()
        assert tool.main([*common, "--epochs", "2"]) == 0
        assert "identical: 2 epochs of" in capsys.readouterr().out
        history = (run / "metrics.jsonl").read_text().splitlines()
        second = json.loads(history[1])
        second["val"]["rsum"] += 0.01                                  # a record the code no longer makes
        (run / "metrics.jsonl").write_text("\n".join([history[0], json.dumps(second), *history[2:]]) + "\n")
        assert tool.main([*common, "--epochs", "2"]) == 1
        assert "differs: epoch 2: rsum recorded" in capsys.readouterr().out
        assert tool.main([*common, "--epochs", "9"]) == 2
        assert "3 recorded epochs, fewer than --epochs 9" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_a_run_records_its_features_bytes_and_a_replay_says_whether_it_has_them(synth, tmp_path, capsys):
    """run.json names the sha256 of the array a run trained on; tools/replay_epochs.py says
    whether the store it replays on holds those bytes (a store extracted again may not: the
    benchmark's continuous recipes then agree to a few digits, not all)."""
    import importlib.util
    from fnemm.cli import main
    from fnemm.features.store import write_manifest
    jsonl, npy, ids = synth
    store = tmp_path / "store"
    store.mkdir()
    np.save(store / "fne.npy", np.load(npy))
    write_manifest(store, ids.read_text().split(), {"fne": "fne.npy"})
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(store),
                     "--epochs", "1", "--threads", "1", "--quiet", "--out", str(run),
                     *sum((["--set", s] for s in SMALL), [])]) == 0
        recorded = json.loads((run / "run.json").read_text())["features"]["sha256"]
        assert recorded == json.loads((store / "manifest.json").read_text())["arrays"]["fne"]["sha256"]
        spec = importlib.util.spec_from_file_location("replay_epochs", Path(__file__).resolve().parents[1] / "tools"
                                                      / "replay_epochs.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        capsys.readouterr()
        assert tool.main([str(run), "--dataset", str(jsonl), "--features", str(store)]) == 0
        assert f"fne of {store}: the array {run} trained on" in capsys.readouterr().out
        again = np.load(npy)
        again[0, 0] = np.nextafter(again[0, 0], np.float32(np.inf))    # the last bit of one activation
        np.save(store / "fne.npy", again)
        write_manifest(store, ids.read_text().split(), {"fne": "fne.npy"})
        tool.main([str(run), "--dataset", str(jsonl), "--features", str(store)])
        assert f"not the array {run} trained on (sha256 {recorded[:12]} recorded" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
