"""fnemm extract: the feature store against brute-force references, train-only
statistics, skipped/converted images, re-runs, and byte-identical resume after a kill."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import tinycnn
from fnemm.cli import main
from fnemm.datasets import load_dataset
from fnemm.io.errors import FnemmError
from fnemm.features.extraction import ExtractConfig, extract
from fnemm.features.store import load_features
from fnemm.features.fne import crops, discretise, l2_normalise, standardise
from fnemm.features.recipe import Recipe

SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
TINY = ExtractConfig(cnn="tinycnn:build", batch_size=3, chunk_size=4, workers=0)
FILES = ["raw.npy", "stats.npy", "fne.npy", "fc7.npy", "manifest.json"]


def write_dataset(folder: Path, names, extra=("gone.jpg",)) -> Path:
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for k, name in enumerate(list(names) + list(extra)):
            split = SPLITS[k] if k < len(SPLITS) else "test"
            f.write(json.dumps({"image": name, "captions": [f"picture number {k}"], "split": split}) + "\n")
    return path


def readable(dataset):
    """The fixture's dataset without its unreadable and missing images."""
    return dataset.subset([k for k, i in enumerate(dataset.image_ids) if i not in ("img005.jpg", "gone.jpg")])


def tiny_model(dataset, store: Path, out: Path, kind: str = "fne", epochs: int = 1):
    """(summary, config) of a small joint model trained on ``store``'s ``kind`` features (at
    chance on these few images: the warning that says so is beside the point here)."""
    import warnings
    from fnemm.joint.config import apply_overrides
    from fnemm.joint.presets import get_preset
    from fnemm.training.trainer import train
    config = apply_overrides(get_preset("flickr8k/FNE-MH" if kind == "fne" else "flickr8k/FC7-MH"),
                             ["model.embed_dim=16", "model.word_dim=8", f"stages.max_epochs={epochs}"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the best validation rsum", UserWarning)
        return train(config, dataset, load_features(store, kind), out, quiet=True), config


@pytest.fixture
def images(tmp_path):
    """12 images (img003 grey, img005 truncated) + a dataset that also lists a missing file."""
    names = tinycnn.write_images(tmp_path / "images", 12, grey=(3,), corrupt=(5,))
    return tmp_path / "images", write_dataset(tmp_path, names)


def test_store_matches_a_brute_force_reference(images, tmp_path):
    folder, data = images
    dataset = load_dataset(data)
    result = extract(folder, tmp_path / "store", dataset, TINY, quiet=True)
    m = result.manifest
    assert {s["image"] for s in m["skipped"]} == {"img005.jpg", "gone.jpg"}
    reasons = {s["image"]: s["reason"] for s in m["skipped"]}
    assert reasons["gone.jpg"].startswith("missing") and reasons["img005.jpg"].startswith("unreadable")
    assert m["converted"] == [{"image": "img003.jpg", "mode": "L"}]
    kept = [i for i in dataset.image_ids if i not in reasons]
    assert m["image_ids"] == kept and result.images == 11 and result.skipped == 2
    assert m["crops"] == 10 and m["thresholds"] == [-0.25, 0.15] and m["stats"]["images"] == 7
    assert [t["name"] for t in m["taps"]] == ["conv1", "conv2", "fc"] and m["baseline"]["tap"] == "fc"

    # raw: each crop through the CNN on its own, averaged over the 10 crops
    cnn = tinycnn.build()
    raw = np.load(tmp_path / "store" / "raw.npy")
    assert raw.dtype == np.float16 and raw.shape == (11, 15)
    from PIL import Image
    for row, name in enumerate(kept):
        with Image.open(folder / name) as img:
            c = crops(img, 10)
        ref = np.mean([cnn(torch.from_numpy(c[k:k + 1].copy()))[0].numpy() for k in range(10)], 0)
        np.testing.assert_allclose(raw[row].astype(np.float32), ref, rtol=2e-3, atol=1e-4)

    # statistics over the training images only, then z-scores and thresholds
    train = [r for r, i in enumerate(kept) if dataset.splits[dataset.image_ids.index(i)] == "train"]
    ref_raw = raw.astype(np.float64)
    mean, std = ref_raw[train].mean(0), ref_raw[train].std(0)
    stats = np.load(tmp_path / "store" / "stats.npy")
    np.testing.assert_allclose(stats[0], mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats[1], std, rtol=1e-10, atol=1e-12)
    fne = load_features(tmp_path / "store", "fne")
    assert fne.array.dtype == np.int8 and fne.ids == kept
    np.testing.assert_array_equal(fne.array, discretise(standardise(raw, stats[0], stats[1])))
    for v in (-1, 0, 1):
        assert m["fne_fractions"][str(v)] == round(float(np.mean(fne.array == v)), 4)
    fc7 = load_features(tmp_path / "store", "fc7")
    np.testing.assert_allclose(fc7.array, l2_normalise(raw[:, 10:15].astype(np.float32)), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fc7.array, axis=1), 1, rtol=1e-5)

    # training reads the store; asking for a skipped image says why it is missing
    with pytest.raises(FnemmError, match="skipped at extraction"):
        fne.rows_for(["img005.jpg"])
    assert not (tmp_path / "store" / ".partial").exists()


def test_val_and_test_images_never_reach_the_statistics(images, tmp_path):
    folder, data = images
    a = extract(folder, tmp_path / "a", load_dataset(data), TINY, quiet=True)
    # the same training images, different validation and test images
    other = tmp_path / "other"
    other.mkdir()
    fresh = tinycnn.write_images(tmp_path / "fresh", 12, seed=9)
    for k, name in enumerate(sorted(p.name for p in folder.iterdir())):
        src = folder / name if SPLITS[k] == "train" else tmp_path / "fresh" / fresh[k]
        (other / name).write_bytes(src.read_bytes())
    b = extract(other, tmp_path / "b", load_dataset(data), TINY, quiet=True)
    assert (tmp_path / "a" / "stats.npy").read_bytes() == (tmp_path / "b" / "stats.npy").read_bytes()
    fa, fb = np.load(tmp_path / "a" / "fne.npy"), np.load(tmp_path / "b" / "fne.npy")
    ids = a.manifest["image_ids"]
    assert ids == b.manifest["image_ids"]
    train = [r for r, i in enumerate(ids) if SPLITS[int(i[3:6])] == "train"]
    np.testing.assert_array_equal(fa[train], fb[train])
    assert not np.array_equal(fa, fb)            # the replaced images do differ


def test_rerun_reuses_the_store_and_new_thresholds_redo_only_discretisation(images, tmp_path):
    folder, data = images
    dataset = load_dataset(data)
    out = tmp_path / "store"
    extract(folder, out, dataset, TINY, quiet=True)
    before = {f: (out / f).read_bytes() for f in FILES}
    again = extract(folder, out, dataset, TINY, quiet=True)
    assert again.reused and {f: (out / f).read_bytes() for f in FILES} == before
    wide = replace(TINY, recipe=Recipe(thresholds=(-1.0, 1.0)))
    redone = extract(folder, out, dataset, wide, quiet=True)
    assert not redone.reused and redone.manifest["thresholds"] == [-1.0, 1.0]
    assert (out / "raw.npy").read_bytes() == before["raw.npy"]
    z = standardise(np.load(out / "raw.npy"), *np.load(out / "stats.npy"))
    np.testing.assert_array_equal(np.load(out / "fne.npy"), discretise(z, -1.0, 1.0))
    other_cnn = ExtractConfig(**{**TINY.__dict__, "crops": 1})
    with pytest.raises(FnemmError, match="already holds a feature store"):
        extract(folder, out, dataset, other_cnn, quiet=True)


def test_new_images_standardised_with_a_stores_statistics(images, tmp_path):
    folder, data = images
    extract(folder, tmp_path / "train", load_dataset(data), TINY, quiet=True)
    new = tmp_path / "new"
    tinycnn.write_images(new, 3, seed=5)
    with pytest.raises(FnemmError, match="no training split"):
        extract(new, tmp_path / "gallery", None, TINY, quiet=True)
    result = extract(new, tmp_path / "gallery", None, TINY, stats_from=tmp_path / "train", quiet=True)
    stats = np.load(tmp_path / "train" / "stats.npy")
    raw = np.load(tmp_path / "gallery" / "raw.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "gallery" / "fne.npy"), discretise(standardise(raw, *stats)))
    assert result.manifest["image_ids"] == ["img000.jpg", "img001.jpg", "img002.jpg"]
    assert result.manifest["stats"]["from"] == str((tmp_path / "train").resolve())
    one_crop = ExtractConfig(**{**TINY.__dict__, "crops": 1})
    with pytest.raises(FnemmError, match="another CNN, weights or crops"):
        extract(new, tmp_path / "g1", None, one_crop, stats_from=tmp_path / "train", quiet=True)


def _cli(*args):
    return [sys.executable, "-m", "fnemm.cli", "extract", *args]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]), **extra}


def test_resume_after_kill_is_byte_identical(images, tmp_path):
    folder, data = images
    common = ["--images", str(folder), "--dataset", str(data), "--cnn", "tinycnn:build", "--batch-size", "1",
              "--chunk-size", "2", "--workers", "1", "--threads", "1", "--quiet"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli(*common, "--out", str(ref)), check=True, env=_env())
    # killed (SIGKILL, as kill -9) right after it commits chunk 2 of 7
    killed = subprocess.run(_cli(*common, "--out", str(cut)), env=_env(FNEMM_DIE_AT="chunk-2"))
    assert killed.returncode == -signal.SIGKILL
    assert not (cut / "manifest.json").exists()
    assert sorted(p.name for p in (cut / ".partial").glob("chunk-*.json")) == \
        ["chunk-00000.json", "chunk-00001.json", "chunk-00002.json"]
    out = subprocess.run(_cli(*common, "--out", str(cut)), env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for f in FILES:
        assert (ref / f).read_bytes() == (cut / f).read_bytes(), f
    assert not (cut / ".partial").exists()


def test_piped_extraction_prints_progress_lines_with_a_total(images, tmp_path):
    """A log (stdout not a terminal) gets whole progress lines, never a bar: done/total,
    percent and rate (FNEMM_PROGRESS_EVERY=0: a line every tenth, not every 30 s, so the
    test needs no clock)."""
    folder, data = images
    done = subprocess.run(_cli("--images", str(folder), "--dataset", str(data), "--cnn", "tinycnn:build",
                               "--batch-size", "1", "--workers", "0", "--threads", "1", "--out", str(tmp_path / "s")),
                          env=_env(FNEMM_PROGRESS_EVERY="0"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("extract: ")]
    assert len(lines) >= 3, done.stdout
    # 13: the 12 photos and the dataset's missing one
    assert all("/13 img (" in line and ("img/s" in line or "s/img" in line) for line in lines), lines
    assert lines[-1].startswith("extract: 13/13 img (100%)") and 3 <= len(lines) <= 11
    assert "\r" not in done.stdout and "\r" not in done.stderr          # no bar drawn into a pipe
    quiet = subprocess.run(_cli("--images", str(folder), "--dataset", str(data), "--cnn", "tinycnn:build",
                                "--workers", "0", "--quiet", "--out", str(tmp_path / "q")),
                           env=_env(FNEMM_PROGRESS_EVERY="0"), capture_output=True, text=True)
    assert quiet.returncode == 0 and "extract: " not in quiet.stdout


def test_quiet_holds_for_everything_a_call_runs(images, tmp_path, capsys, monkeypatch):
    """quiet=True at the entry (extract) silences what it calls (the forward pass's and the
    assembly's progress lines, its messages), and nothing after it returns."""
    from fnemm.io import progress
    monkeypatch.setenv("FNEMM_PROGRESS_EVERY", "0")          # a line every tenth: no clock needed
    monkeypatch.setattr(progress, "lines_on", lambda: True)  # as if stdout were a log
    folder, data = images
    extract(folder, tmp_path / "q", load_dataset(data), TINY, quiet=True)
    assert capsys.readouterr().out == "" and not progress.is_quiet()
    extract(folder, tmp_path / "loud", load_dataset(data), TINY)
    assert "extract: 13/13 img (100%)" in capsys.readouterr().out
    extract(folder, tmp_path / "q", load_dataset(data), TINY)            # complete: reused, and says so
    assert "reusing it" in capsys.readouterr().out
    with progress.quieted():
        with progress.quieted(False):            # an inner block does not undo an outer quiet
            progress.say("hidden")
    progress.say("shown")
    assert capsys.readouterr().out == "shown\n"


@pytest.mark.parametrize("point", ["assemble-stats", "assemble-arrays"])
def test_an_interrupted_reassembly_is_never_reused(images, tmp_path, point):
    """Killed while re-standardising with other thresholds, the store must not be taken
    for the old one: the original command re-assembles it, to the same bytes as before."""
    folder, data = images
    common = ["--images", str(folder), "--dataset", str(data), "--cnn", "tinycnn:build", "--workers", "0",
              "--threads", "1", "--out", str(tmp_path / "store")]
    subprocess.run(_cli(*common), check=True, env=_env(), capture_output=True)
    before = {f: (tmp_path / "store" / f).read_bytes() for f in FILES}
    killed = subprocess.run(_cli(*common, "--thresholds=-1,1"), env=_env(FNEMM_DIE_AT=point))
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "store" / "manifest.json").exists()      # nothing vouches for the arrays
    again = subprocess.run(_cli(*common), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0 and "reusing it" not in again.stdout, again.stdout
    assert {f: (tmp_path / "store" / f).read_bytes() for f in FILES} == before


def test_other_layers_or_post_processing_reassemble_to_a_fresh_extractions_bytes(images, tmp_path):
    folder, data = images
    dataset = load_dataset(data)
    extract(folder, tmp_path / "store", dataset, TINY, quiet=True)
    raw = (tmp_path / "store" / "raw.npy").read_bytes()
    for recipe in (Recipe(layers="conv2,fc"), Recipe(post="zscore", clip=2.0), Recipe(post="center-layer", pca=3),
                   Recipe(layers="!fc", baseline=True)):
        config = replace(TINY, recipe=recipe)
        redone = extract(folder, tmp_path / "store", dataset, config, quiet=True)
        fresh = extract(folder, tmp_path / f"fresh-{recipe.post}-{recipe.pca}", dataset, config, quiet=True)
        assert not redone.reused and (tmp_path / "store" / "raw.npy").read_bytes() == raw
        for f in ["stats.npy", "fne.npy", "fc7.npy"] + (["pca.npy"] if recipe.pca else []):
            assert (tmp_path / "store" / f).read_bytes() == (fresh.out / f).read_bytes(), (recipe, f)
        assert {k: v for k, v in redone.manifest.items() if k != "arrays"} == \
            {k: v for k, v in fresh.manifest.items() if k != "arrays"}
        assert redone.manifest["recipe"] == recipe.to_dict()
    m = extract(folder, tmp_path / "store", dataset, replace(TINY, recipe=Recipe(layers="conv2,fc")), quiet=True)
    assert m.manifest["layers"] == ["conv2", "fc"] and m.manifest["arrays"]["fne"]["shape"] == [11, 11]
    with pytest.raises(FnemmError, match="matches no layer"):
        extract(folder, tmp_path / "store", dataset, replace(TINY, recipe=Recipe(layers="conv9")), quiet=True)


def test_a_derived_store_equals_an_extraction_with_those_training_images(images, tmp_path):
    from fnemm.features.assembly import derive_store
    folder, data = images
    base = extract(folder, tmp_path / "base", load_dataset(data), TINY, quiet=True)
    train = {"img000.jpg", "img002.jpg", "img007.jpg", "img010.jpg"}
    recipe = Recipe(post="zscore-layer-l2")
    derived = derive_store(tmp_path / "base", tmp_path / "derived", train, recipe)
    direct = extract(folder, tmp_path / "direct", None, replace(TINY, recipe=recipe), train_list=sorted(train),
                     quiet=True)
    assert derived["image_ids"] == direct.manifest["image_ids"] != []
    assert derived["stats"]["images"] == 4 and "raw" not in derived["arrays"]
    # the direct store lists every image of the folder (with a row for the never-listed ones too)
    rows = [direct.manifest["image_ids"].index(i) for i in derived["image_ids"]]
    for f in ("fne.npy", "fc7.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "derived" / f), np.load(tmp_path / "direct" / f)[rows])
    np.testing.assert_array_equal(np.load(tmp_path / "derived" / "stats.npy"), np.load(tmp_path / "direct" / "stats.npy"))
    assert derive_store(tmp_path / "base", tmp_path / "derived", train, recipe) == derived     # reused
    assert base.manifest["image_ids"] == derived["image_ids"]


def test_cli_extract_from_another_store_keeps_it_and_matches_a_reassembly(images, tmp_path, capsys):
    """`fnemm extract --from STORE --out NEW --layers .. --post ..`: the new store's arrays
    are those of STORE re-assembled with that recipe (no forward pass), STORE unchanged."""
    folder, data = images
    base = ["extract", "--images", str(folder), "--dataset", str(data), "--cnn", "tinycnn:build",
            "--workers", "0", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "store")]) == 0
    before = {f: (tmp_path / "store" / f).read_bytes() for f in ("manifest.json", "fne.npy", "stats.npy")}
    recipe = ["--layers", "conv2,fc", "--post", "center-layer"]
    capsys.readouterr()
    assert main(["extract", "--from", str(tmp_path / "store"), "--dataset", str(data), *recipe,
                 "--out", str(tmp_path / "late"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 of" in printed and "center-layer" in printed
    assert {f: (tmp_path / "store" / f).read_bytes() for f in before} == before
    assert main([*base, *recipe, "--out", str(tmp_path / "store")]) == 0       # the same recipe, in place
    for f in ("fne.npy", "fc7.npy", "stats.npy"):
        assert (tmp_path / "late" / f).read_bytes() == (tmp_path / "store" / f).read_bytes(), f
    for argv, message in [
            (["--from", str(tmp_path / "store"), "--out", str(tmp_path / "x")], "pass --dataset or --train-list"),
            (["--from", str(tmp_path / "store"), "--dataset", str(data), "--images", str(folder),
              "--out", str(tmp_path / "x")], "--images does not go with --from"),
            (["--from", str(tmp_path / "store"), "--dataset", str(data), "--out", str(tmp_path / "store")],
             "is --out"),
            (["--dataset", str(data), "--out", str(tmp_path / "x")], "--images DIR is required"),
            (["--from", str(tmp_path / "nothing"), "--dataset", str(data), "--out", str(tmp_path / "x")],
             "nothing")]:
        code = main(["extract", *argv, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_cli_extract_reports_and_errors(images, tmp_path, capsys, monkeypatch):
    folder, data = images
    out = tmp_path / "store"
    args = ["extract", "--images", str(folder), "--dataset", str(data), "--cnn", "tinycnn:build",
            "--workers", "0", "--quiet", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "11 images, 3 of 3 layers of tinycnn:build (layers paper, fne -0.25/0.15): 15 features" in text
    assert "skipped img005.jpg: unreadable" in text and "skipped gone.jpg: missing" in text
    assert "1 non-RGB images converted" in text
    (tmp_path / "blank.txt").write_text("\n  \n")
    for bad, message in [(["--thresholds", "0.2"], "expected LOW,HIGH"),
                         (["--train-list", str(tmp_path / "none.txt")], "none.txt: no such file"),
                         (["--train-list", str(tmp_path / "blank.txt")], "no image file names in it"),
                         (["--thresholds", "0.2,-0.2"], "low threshold must be below"),
                         (["--images", str(tmp_path / "nope")], "no such image folder"),
                         (["--cnn", "resnet"], "unknown CNN")]:
        argv = args[:-1] + [str(tmp_path / "x")] + bad
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fnemm: error:") and message in err and "\n" not in err, err
    # an unfinished store with other settings is not silently mixed
    (tmp_path / "half" / ".partial").mkdir(parents=True)
    (tmp_path / "half" / ".partial" / "job.json").write_text(json.dumps({"crops": 1}))
    assert main(args[:-1] + [str(tmp_path / "half")]) == 2
    assert "unfinished extraction with other settings" in capsys.readouterr().err


def test_train_and_evaluate_read_the_store_and_refuse_another_cnns(images, tmp_path):
    from fnemm.eval.protocols import evaluate
    folder, data = images
    dataset = load_dataset(data)
    extract(folder, tmp_path / "store", dataset, TINY, quiet=True)
    usable = readable(dataset)
    tiny_model(usable, tmp_path / "store", tmp_path / "run", epochs=2)
    scores = evaluate(tmp_path / "run", usable, tmp_path / "store", split="test")
    assert "rsum" in next(iter(scores.values()))
    wide = replace(TINY, recipe=Recipe(thresholds=(-1.0, 1.0)))
    extract(folder, tmp_path / "other", dataset, wide, quiet=True)
    with pytest.raises(FnemmError, match="made with thresholds=.*trained on thresholds="):
        evaluate(tmp_path / "run", usable, tmp_path / "other", split="test")


def test_a_model_refuses_fne_standardised_on_other_training_images(images, tmp_path):
    """Same CNN, same recipe, same width, statistics from other images: features a little or
    a lot off, and nothing else would say so. A store extracted with --stats from the
    training store carries its statistics and is accepted; fc7 features have none to check."""
    from fnemm.eval.protocols import evaluate
    from fnemm.features.assembly import derive_store
    folder, data = images
    dataset = load_dataset(data)
    extract(folder, tmp_path / "store", dataset, TINY, quiet=True)
    usable = readable(dataset)
    tiny_model(usable, tmp_path / "store", tmp_path / "run")
    derive_store(tmp_path / "store", tmp_path / "fewer", {"img000.jpg", "img001.jpg", "img002.jpg"}, Recipe())
    assert load_features(tmp_path / "fewer", "fne").dim == load_features(tmp_path / "store", "fne").dim
    with pytest.raises(FnemmError, match=r"standardised with statistics fitted on other images.*--stats .*store"):
        evaluate(tmp_path / "run", usable, tmp_path / "fewer", split="test")
    # the test images again, standardised with the training store's statistics: the same features
    extract(folder, tmp_path / "again", None, TINY, stats_from=tmp_path / "store", quiet=True)
    assert evaluate(tmp_path / "run", usable, tmp_path / "again", split="test") == \
        evaluate(tmp_path / "run", usable, tmp_path / "store", split="test")
    # a checkpoint of a store made before the statistics' hash was recorded: its training images tell
    from fnemm.joint.checkpoint import check_features, read_checkpoint
    old = read_checkpoint(tmp_path / "run")
    del old["features"]["producer"]["stats"]["sha256"]
    with pytest.raises(FnemmError, match="standardised with statistics fitted on other images"):
        check_features(old, load_features(tmp_path / "fewer", "fne"), "old.pt")
    check_features(old, load_features(tmp_path / "store", "fne"), "old.pt")
    check_features(old, load_features(tmp_path / "again", "fne"), "old.pt")
    # another recipe: the error names the fields that differ, not two long recipes cut alike
    recipe = dict(old["features"]["producer"]["recipe"])
    old["features"]["producer"]["recipe"] = {**recipe, "baseline": not recipe.get("baseline", False)}
    with pytest.raises(FnemmError, match=r"made with recipe\.baseline=(True|False), old\.pt was trained on "
                                         r"recipe\.baseline=(True|False); extract them the same way"):
        check_features(old, load_features(tmp_path / "store", "fne"), "old.pt")
    tiny_model(usable, tmp_path / "store", tmp_path / "fc7", kind="fc7")
    assert "rsum" in evaluate(tmp_path / "fc7", usable, tmp_path / "fewer", split="test")["all"]


def test_other_training_images_redo_the_statistics_not_the_forward_pass(images, tmp_path):
    folder, data = images
    out = tmp_path / "store"
    first = extract(folder, out, None, TINY, train_list=["img000.jpg", "img001.jpg"], quiet=True)
    raw = (out / "raw.npy").read_bytes()
    again = extract(folder, out, None, TINY, train_list=["img000.jpg", "img001.jpg"], quiet=True)
    assert again.reused
    other = extract(folder, out, None, TINY, train_list=["img002.jpg", "img003.jpg", "img004.jpg"], quiet=True)
    assert not other.reused and other.manifest["stats"]["images"] == 3 and first.manifest["stats"]["images"] == 2
    assert (out / "raw.npy").read_bytes() == raw
    stats = np.load(out / "stats.npy")
    rows = np.load(out / "raw.npy")[[2, 3, 4]].astype(np.float64)
    np.testing.assert_allclose(stats[0], rows.mean(0), rtol=1e-12, atol=1e-12)


def test_crops_cut_on_the_device_are_the_crops_of_fne_crops(images):
    """Workers ship each image once (256 x 256); the ten crops and mirrors are cut next to
    the CNN: the same pixels, so the same activations as the crops cut in the workers."""
    from PIL import Image

    from fnemm.features.images import crop_tensor, forward_images, read_image
    folder, _ = images
    pixels = [read_image(folder / f"img{k:03d}.jpg")[0] for k in (0, 3, 7)]
    assert all(p.shape == (256, 256, 3) and p.dtype == np.uint8 for p in pixels)
    for n in (1, 10):
        reference = np.concatenate([crops(Image.open(folder / f"img{k:03d}.jpg"), n) for k in (0, 3, 7)])
        assert np.array_equal(crop_tensor(torch.from_numpy(np.stack(pixels)), n).numpy(), reference)
        cnn = tinycnn.build()
        with torch.no_grad():
            old = cnn(torch.from_numpy(reference)).view(-1, n, cnn.dim).mean(1).numpy()
        assert np.array_equal(forward_images(cnn, np.stack(pixels), n, "cpu"), old)


def test_bf16_precision_is_part_of_the_stores_identity(images, tmp_path):
    folder, data = images
    dataset = load_dataset(data)
    bf16 = replace(TINY, precision="bf16")
    m = extract(folder, tmp_path / "store", dataset, bf16, quiet=True).manifest
    assert m["precision"] == "bf16"
    ref = extract(folder, tmp_path / "ref", dataset, TINY, quiet=True).manifest
    assert "precision" not in ref                             # fp32, as every store before the choice
    raw16, raw32 = (np.load(tmp_path / s / "raw.npy").astype(np.float32) for s in ("store", "ref"))
    np.testing.assert_allclose(raw16, raw32, rtol=0.05, atol=0.02)
    with pytest.raises(FnemmError, match="precision differ"):
        extract(folder, tmp_path / "store", dataset, TINY, quiet=True)
    with pytest.raises(FnemmError, match="--precision fp16"):
        extract(folder, tmp_path / "x", dataset, replace(TINY, precision="fp16"), quiet=True)
    # a model trained on fp32 features refuses bf16 ones (and the other way round)
    from fnemm.joint.checkpoint import open_model
    tiny_model(readable(dataset), tmp_path / "ref", tmp_path / "run")
    open_model(tmp_path / "run", tmp_path / "ref")
    with pytest.raises(FnemmError, match="made with the CNN in bf16.*trained on fp32"):
        open_model(tmp_path / "run", tmp_path / "store")


def test_evaluate_reads_the_store_each_run_was_trained_on_unless_told(images, tmp_path, capsys):
    folder, _ = images
    (tmp_path / "usable").mkdir()
    data = write_dataset(tmp_path / "usable", [f"img{k:03d}.jpg" for k in range(12) if k != 5], extra=())
    dataset = load_dataset(data)
    proj = tmp_path / "proj"
    extract(folder, proj / "store", dataset, TINY, quiet=True)
    tiny_model(dataset, proj / "store", proj / "run")
    common = ["evaluate", "--dataset", str(data), "--json"]
    assert main([*common, "--checkpoint", str(proj / "run"), "--features", str(proj / "store")]) == 0
    told = json.loads(capsys.readouterr().out)
    assert main([*common, "--checkpoint", str(proj / "run")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == told and f"features: {proj / 'store'} (the store run was trained on)" in err
    # search reads the same store by default
    assert main(["search", "--checkpoint", str(proj / "run"), "--text", "picture number 3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["results"]) == 5 and f"features: {proj / 'store'} (the store" in err
    assert main(["search", "--text", "picture number 3"]) == 2
    assert "search needs --checkpoint RUN" in capsys.readouterr().err
    # the run and its store moved together: found beside it
    proj.rename(tmp_path / "elsewhere")
    assert main([*common, "--checkpoint", str(tmp_path / "elsewhere" / "run")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == told and f"features: {tmp_path / 'elsewhere' / 'store'} (the store" in err
    # the store moved alone: named, with the fix
    (tmp_path / "elsewhere" / "store").rename(tmp_path / "moved")
    assert main([*common, "--checkpoint", str(tmp_path / "elsewhere" / "run")]) == 2
    err = capsys.readouterr().err
    assert "the feature store it was trained on" in err and "pass --features STORE" in err
    assert main([*common, "--checkpoint", str(tmp_path / "elsewhere" / "run"), "--features",
                 str(tmp_path / "moved")]) == 0
    assert json.loads(capsys.readouterr().out) == told
    assert main([*common, "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such checkpoint" in capsys.readouterr().err
    assert main([*common, "--checkpoint", str(tmp_path / "elsewhere" / "run"), "--ids", "rows.txt"]) == 2
    assert "--ids names the rows of a .npy given with --features" in capsys.readouterr().err


def test_a_run_resumes_only_on_the_features_it_started_on(images, tmp_path):
    """A store that moved resumes the run; another one of the same width (here: statistics
    from other training images) is refused before anything runs or is written."""
    import shutil
    from fnemm.features.assembly import derive_store
    from fnemm.training.trainer import train
    folder, data = images
    dataset = load_dataset(data)
    extract(folder, tmp_path / "store", dataset, TINY, quiet=True)
    usable = readable(dataset)
    first, config = tiny_model(usable, tmp_path / "store", tmp_path / "run")
    derive_store(tmp_path / "store", tmp_path / "fewer", {"img000.jpg", "img001.jpg", "img002.jpg"}, Recipe())
    last = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(FnemmError, match="standardised with statistics fitted on other images"):
        train(config, usable, load_features(tmp_path / "fewer", "fne"), tmp_path / "run", resume=True, quiet=True)
    assert (tmp_path / "run" / "last.pt").read_bytes() == last
    shutil.copytree(tmp_path / "store", tmp_path / "moved")
    with pytest.warns(UserWarning):         # a finished run: resuming it returns its summary
        summary = train(config, usable, load_features(tmp_path / "moved", "fne"), tmp_path / "run", resume=True,
                        quiet=True)
    assert summary["epochs"] == first["epochs"] == 2          # a stage of 1 epoch, then the second


def test_a_run_moved_with_its_store_resumes_from_another_directory(images, tmp_path, monkeypatch, capsys):
    """run.json keeps the dataset and store where they were and relative to the run folder:
    moved together, the run resumes from anywhere without --dataset or --features."""
    folder, data = images
    proj = tmp_path / "proj"
    extract(folder, proj / "store", load_dataset(data), TINY, quiet=True)
    (proj / "data.jsonl").write_text("".join(line for line in data.read_text().splitlines(keepends=True)
                                             if "img005" not in line and "gone.jpg" not in line))
    monkeypatch.chdir(proj)
    train = ["train", "--preset", "flickr8k/FNE-MH", "--dataset", "data.jsonl", "--features", "store", "--out", "run",
             "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--epochs", "1", "--quiet"]
    assert main(train) == 0
    proj.rename(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    resume = ["train", "--out", str(tmp_path / "elsewhere" / "run"), "--resume", "--quiet"]
    assert main(resume) == 0, capsys.readouterr().err
    capsys.readouterr()
    # and evaluates on them, told nothing but the run
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "elsewhere" / "run"), "--json"]
    assert main([*evaluate, "--dataset", str(tmp_path / "elsewhere" / "data.jsonl"),
                 "--features", str(tmp_path / "elsewhere" / "store")]) == 0
    told = json.loads(capsys.readouterr().out)
    assert main(evaluate) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == told and "(the one run was trained on)" in err and "(the store run" in err
    (tmp_path / "elsewhere" / "store").rename(tmp_path / "alone")
    assert main(resume) == 2
    assert "are not there, nor beside the run; pass --features STORE" in capsys.readouterr().err
    (tmp_path / "alone").rename(tmp_path / "elsewhere" / "store")
    (tmp_path / "elsewhere" / "data.jsonl").rename(tmp_path / "data.jsonl")
    assert main(resume) == 2                # the dataset moved alone: named
    assert str(tmp_path / "proj" / "data.jsonl") in capsys.readouterr().err
    assert main([*resume, "--dataset", str(tmp_path / "data.jsonl")]) == 0


def test_a_run_records_its_inputs_as_absolute_paths(images, tmp_path, monkeypatch):
    folder, data = images
    extract(folder, tmp_path / "store", load_dataset(data), TINY, quiet=True)
    (tmp_path / "data.jsonl").write_text("".join(line for line in data.read_text().splitlines(keepends=True)
                                                 if "img005" not in line and "gone.jpg" not in line))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "flickr8k/FNE-MH", "--dataset", "data.jsonl", "--features", "store",
                 "--out", "run", "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--epochs", "1",
                 "--quiet"]) == 0
    args = json.loads((tmp_path / "run" / "run.json").read_text())["args"]
    assert args["dataset"] == [str(tmp_path / "data.jsonl")] and args["features"] == str(tmp_path / "store")
    assert args["dataset_relative"] == ["../data.jsonl"]
    assert main(["train", "--preset", "flickr8k/FNE-MH", "--dataset", "data.jsonl", "--features", "store",
                 "--out", "many", "--seeds", "1", "--set", "model.embed_dim=16", "--set", "model.word_dim=8",
                 "--epochs", "1", "--quiet"]) == 0
    seeds = json.loads((tmp_path / "many" / "seed-0" / "run.json").read_text())["args"]
    assert seeds["dataset_relative"] == ["../../data.jsonl"]          # from the folder holding its run.json
    monkeypatch.chdir(tmp_path / "run")
    assert main(["train", "--out", ".", "--resume", "--quiet"]) == 0
