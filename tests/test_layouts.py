"""The full datasets' layouts, end to end at toy size: the files as they are
distributed (Flickr8K's text release, Karpathy's json for Flickr30K and MSCOCO
with restval, COCO's own captions files with train2014/ and val2014/ image
folders) -> fnemm extract -> train one epoch -> evaluate."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import tinycnn
from fnemm.cli import main

SMALL = ["--epochs", "1", "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--batch-size", "4", "--quiet"]


def _images(folder: Path, names: list[str], seed: int) -> None:
    tmp = folder.parent / f".gen-{seed}"
    made = tinycnn.write_images(tmp, len(names), seed=seed)
    for made_name, name in zip(made, names):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp / made_name, target)
    shutil.rmtree(tmp)


def _caps(name: str, k: int) -> list[str]:
    return [f"a photo number {k} with a {w} in it ." for w in ("dog", "cat", "tree", "car", "boat")]


SPLITS = ["train"] * 6 + ["val"] * 3 + ["test"] * 3


def flickr8k(root: Path) -> tuple[str, list[str], Path]:
    names = [f"{1000 + k}_abc.jpg" for k in range(12)]
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#{j}\t{c}\n" for k, n in enumerate(names) for j, c in enumerate(_caps(n, k))))
    for split, file in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        (text / f"Flickr_8k.{file}.txt").write_text("".join(n + "\n" for n, s in zip(names, SPLITS) if s == split))
    _images(root / "Flicker8k_Dataset", names, 1)
    return "flickr8k/FNE-MH", [str(text)], root / "Flicker8k_Dataset"


def karpathy(root: Path, dataset: str) -> tuple[str, list[str], Path]:
    coco = dataset == "coco"
    splits = SPLITS if not coco else ["train"] * 3 + ["restval"] * 3 + SPLITS[6:]
    images = []
    for k, split in enumerate(splits):
        folder = "train2014" if coco and split in ("train", "restval") else ("val2014" if coco else "")
        name = f"COCO_{folder}_{k:012d}.jpg" if coco else f"{2000 + k}.jpg"
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": k,
                       "sentences": [{"raw": c, "tokens": c.split()} for c in _caps(name, k)]})
        _images(root / "images" / folder, [name], 10 + k)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    family = "coco" if coco else dataset
    return f"{family}/FNE-MH", [str(path)], root / "images"


def coco_captions(root: Path) -> tuple[str, list[str], Path]:
    files = []
    for split, ids in (("train", range(1, 9)), ("val", range(9, 13))):
        folder = f"{split}2014"
        info = {"images": [{"id": i, "file_name": f"COCO_{folder}_{i:012d}.jpg"} for i in ids],
                "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                                for i in ids for j, c in enumerate(_caps("", i))]}
        path = root / "annotations" / f"captions_{folder}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info))
        files.append(str(path))
        _images(root / "images" / folder, [im["file_name"] for im in info["images"]], 30 + ids[0])
    return "coco/FNE-MH", files, root / "images"


LAYOUTS = {"flickr8k-text-release": flickr8k,
           "flickr30k-karpathy": lambda root: karpathy(root, "flickr30k"),
           "coco-karpathy-restval": lambda root: karpathy(root, "coco"),
           "coco-captions-files": coco_captions}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_extracts_trains_and_evaluates(layout, tmp_path, capsys):
    preset, dataset, images = LAYOUTS[layout](tmp_path / "data")
    data_args = sum((["--dataset", d] for d in dataset), [])

    def fnemm(*args):
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = fnemm("extract", "--images", str(images), *data_args, "--cnn", "tinycnn:build", "--workers", "0",
                "--out", str(tmp_path / "store"), "--quiet")
    assert "0 skipped" in out
    fnemm("train", "--preset", preset, *data_args, "--features", str(tmp_path / "store"),
          "--out", str(tmp_path / "run"), *SMALL)
    split = "val" if layout == "coco-captions-files" else "test"
    out = fnemm("evaluate", "--checkpoint", str(tmp_path / "run"), *data_args,
                "--features", str(tmp_path / "store"), "--split", split)
    assert "rsum" in out
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    n_train = 3 if layout == "coco-karpathy-restval" else 6 if layout != "coco-captions-files" else 8
    assert manifest["stats"]["images"] == n_train     # COCO: train2014 only, the paper's (restval: below)
    if layout == "coco-captions-files":
        code = main(["evaluate", "--checkpoint", str(tmp_path / "run"), *data_args, "--features",
                     str(tmp_path / "store"), "--split", "test"])
        assert code == 2 and "pass --dataset dataset_coco.json" in capsys.readouterr().err


def test_coco_restval_is_trained_on_only_when_asked(tmp_path, capsys):
    """The paper trains MSCOCO on train2014's images alone; --restval adds restval to the
    statistics, the vocabulary and the training set alike."""
    preset, dataset, images = karpathy(tmp_path / "data", "coco")
    data = json.loads(Path(dataset[0]).read_text())
    for img in data["images"]:                    # a word only restval captions use
        if img["split"] == "restval":
            img["sentences"][0]["raw"] += " zebracorn"
    Path(dataset[0]).write_text(json.dumps(data))
    runs = {}
    for restval in (False, True):
        flag = ["--restval"] if restval else []
        store, run = tmp_path / f"store-{restval}", tmp_path / f"run-{restval}"
        assert main(["extract", "--images", str(images), "--dataset", dataset[0], "--cnn", "tinycnn:build",
                     "--workers", "0", "--out", str(store), "--quiet", *flag]) == 0
        assert main(["train", "--preset", preset, "--dataset", dataset[0], "--features", str(store), "--out",
                     str(run), *SMALL, *flag]) == 0
        runs[restval] = json.loads((run / "run.json").read_text())
        manifest = json.loads((store / "manifest.json").read_text())
        assert manifest["stats"]["images"] == (6 if restval else 3)
        vocab = torch.load(run / "best.pt", weights_only=True)["vocab"]
        assert ("zebracorn" in vocab) == restval
    assert (runs[False]["n_train"], runs[True]["n_train"]) == (3, 6)
    capsys.readouterr()
    # resuming a --restval run keeps training on restval (run.json remembers it)
    assert main(["train", "--out", str(tmp_path / "run-True"), "--resume", "--quiet"]) == 0
