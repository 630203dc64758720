"""Bringing one's own data: CSV, automatic splits, warnings on tiny splits, a config
file, folders that keep working when moved, a readable Dataset repr."""

import json
import shutil

import pytest

import fnemm
from conftest import DATA
from fnemm.cli import main
from fnemm.datasets import auto_splits, load_dataset
from fnemm.io.errors import FnemmError
from test_train import SMALL


def test_csv_with_and_without_splits(tmp_path, capsys):
    path = tmp_path / "mine.csv"
    path.write_text('image,caption,split\na.jpg,"a dog, running",train\na.jpg,a brown dog,train\n'
                    'b.jpg,a cat,val\nc.jpg,two birds,test\n')
    ds = load_dataset(path)
    assert ds.image_ids == ["a.jpg", "b.jpg", "c.jpg"] and ds.captions[0] == ["a dog, running", "a brown dog"]
    assert ds.splits == ["train", "val", "test"]
    rows = "".join(f"img{k}.jpg,caption {k}\nimg{k}.jpg,another caption {k}\n" for k in range(30))
    (tmp_path / "nosplit.csv").write_text("image,caption\n" + rows)
    with pytest.warns(UserWarning, match=r"drew 24 train / 3 val / 3 test images at random \(seed 0"):
        drawn = load_dataset(tmp_path / "nosplit.csv")
    assert drawn.counts() == {"train": 24, "val": 3, "test": 3, "restval": 0}
    assert load_dataset(tmp_path / "nosplit.csv").splits == drawn.splits            # the same draw
    assert repr(drawn) == "Dataset(nosplit: 30 images (24 train, 3 val, 3 test), 60 captions)"
    for text, message in [("img,caption\n", "expected a header"), ("image;caption\na.jpg;a dog\n",
                                                                     "separated by ';'. save it with commas"),
                          ("image,caption\nx.jpg\n", ":2: 1 columns"),
                          ("image,caption,split\nx.jpg,a,train\nx.jpg,b,test\n", "in split train on an earlier row"),
                          ("image,caption,split\nx.jpg,a,train\ny.jpg,b,\n", "has no split while others have one"),
                          ("image,caption\n", "no rows")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(FnemmError, match=message):
            load_dataset(tmp_path / "bad.csv")


def test_jsonl_without_splits_and_the_draw():
    assert sorted(auto_splits([f"{k}" for k in range(100)]).values()).count("test") == 10
    assert set(auto_splits(["a", "b"]).values()) == {"train"}                 # too few to hold out


def test_tiny_splits_and_small_folds_are_warned(synth, tmp_path, capsys):
    jsonl, npy, ids = synth
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for r in records[: len(records) - 8]:
        if r["split"] == "test":
            r["split"] = "train"
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(tmp_path / "few.jsonl"), "--features",
                 str(npy), "--ids", str(ids), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet",
                 *sum((["--set", s] for s in SMALL), [])]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--dataset", str(tmp_path / "few.jsonl"),
                 "--features", str(npy), "--ids", str(ids)]) == 0
    err = capsys.readouterr().err
    assert "only 8 test images" in err and "R@10 is 100% by construction" in err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--protocol", "5fold"]) == 0
    assert "ranks among folds of 18, not MSCOCO's 1,000" in capsys.readouterr().err


def test_a_config_file_from_presets_show(synth, tmp_path, capsys):
    jsonl, npy, ids = synth
    assert main(["presets", "--show", "flickr30k/FNE-MH"]) == 0
    config = json.loads(capsys.readouterr().out)
    config["model"].update(embed_dim=24, word_dim=12)
    config["stages"][0]["max_epochs"] = 1
    config["batch_size"] = 32
    (tmp_path / "mine.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())   # Notepad's mark: fine
    assert main(["train", "--config", str(tmp_path / "mine.json"), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["embed_dim"] == 24 and json.loads((tmp_path / "run" / "run.json").read_text())[
        "preset"] == "config:mine.json"
    (tmp_path / "bad.json").write_text(json.dumps({**config, "learning": 1}))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--out", str(tmp_path / "r2")]) == 2
    assert "unknown field 'learning'" in capsys.readouterr().err
    # a field of the wrong type is named, and never trained as something else: the string
    # "false" is truthy (it trained a layer-normalised GRU), 1024.0 and "1" failed deep in torch
    bad = json.loads(json.dumps(config))
    for where, value, said in [(("model", "layer_norm"), "false", 'model.layer_norm="false": expected true or false'),
                               (("model", "embed_dim"), 24.0, "model.embed_dim=24.0: expected a whole number"),
                               (("seed",), "1", 'seed="1": expected a whole number'),
                               (("stages", 0, "lr"), "1e-3", 'stages.0.lr="1e-3": expected a number (unquoted'),
                               (("model", "use_abs"), 0, "model.use_abs=0: expected true or false"),
                               (("stages", 0, "lr"), float("nan"), "stages.0.lr=nan: expected a finite number"),
                               (("model",), [1], "model=[1]: expected a mapping of fields"),
                               (("stages",), {"lr": 1}, 'stages={"lr": 1}: expected a list'),
                               (("stages", 0), 3, "stages.0: expected a mapping of fields, found int")]:
        edited = json.loads(json.dumps(config))
        node = edited
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
        (tmp_path / "typed.json").write_text(json.dumps(edited))
        assert main(["train", "--config", str(tmp_path / "typed.json"), "--dataset", str(jsonl), "--features",
                     str(npy), "--ids", str(ids), "--out", str(tmp_path / "typed")]) == 2
        err = capsys.readouterr().err
        assert f"typed.json: not a config ({said}" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "typed").exists()
    from fnemm.joint.config import TrainConfig                       # ints where floats are due: floats
    bad["stages"][0]["lr"], bad["model"]["image_dropout"] = 1, 0
    loaded = TrainConfig.from_dict(bad)
    assert isinstance(loaded.stages[0].lr, float) and loaded.model.image_dropout == 0.0
    assert TrainConfig.from_dict(config) == TrainConfig.from_dict(json.loads(TrainConfig.from_dict(config).to_json()))
    assert main(["train", "--config", str(tmp_path / "mine.json"), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--out", str(jsonl)]) == 2             # --out a file: one line, no traceback
    assert f"{jsonl}: a file, not a folder; give a folder's path" in capsys.readouterr().err
    pytest.importorskip("yaml")
    (tmp_path / "latin.yaml").write_bytes("seed: 1  # caf\u00e9\n".encode("latin-1"))   # was a traceback
    assert main(["train", "--config", str(tmp_path / "latin.yaml"), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--out", str(tmp_path / "r3")]) == 2
    assert "latin.yaml:1: not UTF-8 text (byte 0xe9" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "flickr8k" / "images").is_dir(), reason="../shared/data not present")
def test_a_gallery_moved_with_its_images_still_finds_them(demo, tmp_path):
    """A store, run and index copied together elsewhere: the images and files are found
    where they sit relative to each other, not at the absolute paths of the old place."""
    out, _ = demo
    pytest.importorskip("faiss")
    place = tmp_path / "old"
    place.mkdir()
    shutil.copytree(out / "features", place / "features")
    shutil.copytree(out / "FNE-MH" / "seed-0", place / "run")
    images = sorted((DATA / "flickr8k" / "images").iterdir())
    kept = set(json.loads((place / "features" / "manifest.json").read_text())["image_ids"])
    (place / "images").mkdir()
    for f in images:
        if f.name in kept:
            shutil.copy(f, place / "images" / f.name)
    manifest = json.loads((place / "features" / "manifest.json").read_text())
    manifest["images_dir_relative"] = "../images"          # as `fnemm extract --images ../images` writes it
    (place / "features" / "manifest.json").write_text(json.dumps(manifest))
    fnemm.build_index(place / "run", place / "features", place / "index", quiet=True)
    moved = tmp_path / "new"
    shutil.move(place, moved)                              # all of it, elsewhere; the old place is gone
    gallery = fnemm.Gallery.from_index(moved / "index")
    hit = gallery.text("a dog", 1)[0]
    assert gallery.image_path(hit.image) == moved / "images" / hit.image
    assert len(gallery.thumbnail(hit.image, 64)) > 100


def test_a_60_photo_csv_states_its_chance_level_at_train_evaluate_and_report(tmp_path, capsys):
    """Chance everywhere: train says the validation chance level and calls a model at
    chance that; evaluate and report state the test set's."""
    import numpy as np
    import synthetic
    records, feats, ids = synthetic.make(n_images=60, splits=(0.8, 0.1, 0.1))
    import csv as csv_module
    csv = tmp_path / "mine.csv"
    with open(csv, "w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["image", "caption", "split"])
        writer.writerows([r["image"], c, r["split"]] for r in records for c in r["captions"])
    np.save(tmp_path / "feats.npy", feats)
    (tmp_path / "feats.ids.txt").write_text("\n".join(ids) + "\n")
    common = ["--dataset", str(csv), "--features", str(tmp_path / "feats.npy")]
    # a learning rate that cannot move it: the model stays at chance
    assert main(["train", "--preset", "demo/FNE-MH", *common, "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--lr", "1e-12", "--threads", "1", *sum((["--set", s] for s in SMALL), [])]) == 0
    out, err = capsys.readouterr()
    assert "validation: 6 images x 5 captions; chance (random embeddings) scores rsum" in out
    assert "fnemm: warning: " in err and "this model is at chance" in err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), *common]) == 0
    out = capsys.readouterr().out
    assert "test [all: 6 images, 30 captions]" in out and "chance on 6 images x 5 captions" in out
    assert "this model is at chance" in out
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "FNE-MH is at chance: its rsum, " in out and "| chance: random embeddings, 6 images x 5 captions |" in out
    assert (tmp_path / "report" / "val_rsum.png").stat().st_size > 1000
