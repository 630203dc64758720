"""Every dataset layout loads into the same Dataset; malformed files name file and line."""

import json
from pathlib import Path

import pytest

from fnemm import FnemmError, load_dataset

SHARED_F8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def write_flickr(folder: Path, token_lines: list[str], train, dev, test):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for name, items in (("trainImages", train), ("devImages", dev), ("testImages", test)):
        (folder / f"Flickr_8k.{name}.txt").write_text("\n".join(items) + "\n")
    return folder


def _tokens(images, n=5):
    return [f"{im}#{k}\tA caption {k} of {im} ." for im in images for k in range(n)]


def test_flickr_raw(tmp_path):
    folder = write_flickr(tmp_path / "f8k", _tokens(["a.jpg", "b.jpg", "c.jpg", "stray.jpg"]),
                          ["a.jpg"], ["b.jpg"], ["c.jpg"])
    ds = load_dataset(folder)
    assert ds.name == "flickr8k"
    assert ds.image_ids == ["a.jpg", "b.jpg", "c.jpg"]          # stray.jpg is in no split
    assert ds.splits == ["train", "val", "test"]
    assert ds.captions[0][4] == "A caption 4 of a.jpg ."
    assert load_dataset(folder / "Flickr8k.token.txt").image_ids == ds.image_ids


def test_flickr_broken_line_names_file_and_line(tmp_path):
    lines = _tokens(["a.jpg", "b.jpg", "c.jpg"])
    lines[7] = "b.jpg this line lost its tab and number"
    folder = write_flickr(tmp_path / "f8k", lines, ["a.jpg"], ["b.jpg"], ["c.jpg"])
    with pytest.raises(FnemmError, match=r"Flickr8k\.token\.txt:8: expected"):
        load_dataset(folder)


def test_flickr_split_image_without_caption(tmp_path):
    folder = write_flickr(tmp_path / "f8k", _tokens(["a.jpg"]), ["a.jpg"], ["zzz.jpg"], [])
    with pytest.raises(FnemmError, match="zzz.jpg has no caption"):
        load_dataset(folder)


@pytest.mark.skipif(not SHARED_F8K.exists(), reason="bundled Flickr8K not present")
def test_real_flickr8k_official_split():
    ds = load_dataset(SHARED_F8K)
    assert ds.counts() == {"train": 6000, "val": 1000, "test": 1000, "restval": 0}
    assert all(len(c) == 5 for c in ds.captions)
    assert "2258277193_586949ec62.jpg.1" not in ds.image_ids


def karpathy(tmp_path, name="dataset_coco.json"):
    images = [{"filename": f"COCO_{k}.jpg", "filepath": "val2014", "split": s,
               "sentences": [{"raw": f"cap {j} of {k}", "tokens": []} for j in range(5 + (k % 2))]}
              for k, s in enumerate(["train", "restval", "val", "test", "test"])]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_with_restval(tmp_path):
    ds = load_dataset(karpathy(tmp_path))
    assert ds.name == "coco"
    assert ds.split_indices("train") == [0]                       # the paper's: train2014 only
    assert ds.split_indices("restval") == [1]
    assert ds.with_restval().split_indices("train") == [0, 1]
    assert ds.split_indices("test") == [3, 4]
    assert len(ds.captions[1]) == 6


def test_karpathy_malformed(tmp_path):
    bad = tmp_path / "dataset_flickr8k.json"
    bad.write_text('{"images": [\n{"filename": "a.jpg",\n "split": "train" "sentences": []}]}')
    with pytest.raises(FnemmError, match=r"dataset_flickr8k\.json:3: invalid JSON"):
        load_dataset(bad)
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    with pytest.raises(FnemmError, match=r"images\[0\]: needs"):
        load_dataset(bad)


def coco_file(path, ids):
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"COCO_{i:012d}.jpg"} for i in ids],
        "annotations": [{"image_id": i, "id": 10 * i + j, "caption": f"c{j} {i}"} for i in ids for j in range(5)],
    }))
    return path


def test_coco_captions_files(tmp_path):
    tr = coco_file(tmp_path / "captions_train2014.json", [1, 2, 3])
    va = coco_file(tmp_path / "captions_val2014.json", [4, 5])
    ds = load_dataset([tr, va])
    assert ds.counts()["train"] == 3 and ds.counts()["val"] == 2
    assert ds.image_ids[3] == "COCO_000000000004.jpg"
    other = coco_file(tmp_path / "caps.json", [6])
    ds2 = load_dataset([tr, f"test={other}"])
    assert ds2.splits[-1] == "test"
    with pytest.raises(FnemmError, match="cannot tell the split"):
        load_dataset([tr, other])


def test_jsonl_and_its_errors(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"image": "x.jpg", "captions": ["a b", "c"], "split": "train"}\n'
                 '{"image": "y.jpg", "captions": ["d"], "split": "dev"}\n')
    ds = load_dataset(p)
    assert ds.splits == ["train", "val"] and ds.captions[0] == ["a b", "c"]
    p.write_text('{"image": "x.jpg", "captions": ["a"], "split": "train"}\n{"image": "y.jpg", "captions": "oops"\n')
    with pytest.raises(FnemmError, match=r"mine\.jsonl:2: invalid JSON"):
        load_dataset(p)
    p.write_text('{"image": "x.jpg", "captions": ["a"], "split": "holdout"}\n')
    with pytest.raises(FnemmError, match=r"mine\.jsonl:1: unknown split 'holdout'"):
        load_dataset(p)
    p.write_text('{"image": "x.jpg", "captions": [], "split": "train"}\n')
    with pytest.raises(FnemmError, match=r"mine\.jsonl:1: image x.jpg has no non-empty caption"):
        load_dataset(p)


def test_missing_path(tmp_path):
    with pytest.raises(FnemmError, match="no such file"):
        load_dataset(tmp_path / "nope.json")


def test_resplit_train_size_head_and_jsonl_round_trip(tmp_path):
    from fnemm.datasets import Dataset
    ds = Dataset("toy", [f"i{k}.jpg" for k in range(20)], [[f"cap {k}", f"other {k}"] for k in range(20)],
                 ["train"] * 12 + ["val"] * 4 + ["test"] * 4)
    assert ds.resplit(0) is ds
    a, b = ds.resplit(1), ds.resplit(1)
    assert a.splits == b.splits != ds.splits and a.counts() == ds.counts() and a.image_ids == ds.image_ids
    assert ds.resplit(2).splits != a.splits
    small = a.with_train_size(5, seed=1)
    assert small.counts()["train"] == 5 and small.counts()["val"] == 4 and small.counts()["test"] == 4
    assert set(small.image_ids) <= set(ds.image_ids) and small.with_train_size(5) is small
    with pytest.raises(FnemmError, match="cannot keep 13"):
        ds.with_train_size(13)
    assert ds.head(10).counts() == {"train": 6, "val": 2, "test": 2, "restval": 0}
    back = load_dataset(a.to_jsonl(tmp_path / "a.jsonl"))
    assert (back.image_ids, back.captions, back.splits) == (a.image_ids, a.captions, a.splits)


def test_learning_curve_subsets_are_nested_and_seeded():
    from fnemm.datasets import Dataset
    ds = Dataset("toy", [f"i{k}.jpg" for k in range(60)], [[f"cap {k}"] for k in range(60)],
                 ["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    train = {n: {ds.with_train_size(n, seed=3).image_ids[k] for k in ds.with_train_size(n, seed=3).split_indices("train")}
             for n in (5, 10, 20, 40)}
    assert [len(train[n]) for n in (5, 10, 20, 40)] == [5, 10, 20, 40]
    assert train[5] < train[10] < train[20] < train[40]          # nested, for one seed
    again = ds.with_train_size(10, seed=3)
    assert {again.image_ids[k] for k in again.split_indices("train")} == train[10]    # seeded
    other = ds.with_train_size(10, seed=4)
    assert {other.image_ids[k] for k in other.split_indices("train")} != train[10]
    for n in (5, 20):     # val and test untouched
        kept = ds.with_train_size(n, seed=3)
        assert kept.counts()["val"] == 10 and kept.counts()["test"] == 10


@pytest.mark.skipif(not (SHARED_F8K / "images-224").is_dir(), reason="bundled Flickr8K images-224 not present")
def test_flickr8k_224_is_the_papers_whole_benchmark():
    ds = load_dataset("flickr8k-224")
    assert ds.counts() == {"train": 6000, "val": 1000, "test": 1000, "restval": 0}
    assert all(len(c) == 5 for c in ds.captions)
    assert ds.images == SHARED_F8K / "images-224"
    present = {p.name for p in ds.images.iterdir()}
    assert set(ds.image_ids) <= present                                       # every image is found
    official = {s: set((SHARED_F8K / f"Flickr_8k.{s}Images.txt").read_text().split()) for s in ("train", "dev", "test")}
    assert {ds.image_ids[k] for k in ds.split_indices("test")} == official["test"]
    assert {ds.image_ids[k] for k in ds.split_indices("val")} == official["dev"]
    assert load_dataset(f"flickr8k-224={SHARED_F8K}").image_ids == ds.image_ids


@pytest.mark.skipif(not (SHARED_F8K / "images-224").is_dir(), reason="bundled Flickr8K images-224 not present")
def test_flickr8k_224_all_adds_the_releases_unlisted_photos_as_restval():
    """The whole release for a search gallery: 8,091 photos and 40,455 captions; the 91
    photos no official list names are restval, so training and testing are unchanged."""
    ds, listed = load_dataset("flickr8k-224-all"), load_dataset("flickr8k-224")
    assert ds.counts() == {"train": 6000, "val": 1000, "test": 1000, "restval": 91}
    assert len(ds.image_ids) == 8091 and sum(len(c) for c in ds.captions) == 40455
    assert set(ds.image_ids) == {p.name for p in ds.images.iterdir()}       # every photo of the folder
    assert ds.image_ids[:8000] == listed.image_ids and ds.captions[:8000] == listed.captions
    for split in ("train", "val", "test"):
        assert [ds.image_ids[k] for k in ds.split_indices(split)] == \
               [listed.image_ids[k] for k in listed.split_indices(split)]
    assert ds.with_restval().counts()["train"] == 6091


def test_unlisted_images_are_kept_as_restval_only_when_asked(tmp_path):
    from fnemm.datasets.formats import load_flickr_raw
    folder = write_flickr(tmp_path / "f8k", _tokens(["a.jpg", "b.jpg", "c.jpg", "stray.jpg"]),
                          ["a.jpg"], ["b.jpg"], ["c.jpg"])
    assert load_flickr_raw(folder).image_ids == ["a.jpg", "b.jpg", "c.jpg"]
    ds = load_flickr_raw(folder, unlisted=True)
    assert ds.image_ids == ["a.jpg", "b.jpg", "c.jpg", "stray.jpg"] and ds.splits[-1] == "restval"
    assert ds.counts() == {"train": 1, "val": 1, "test": 1, "restval": 1}


def test_flickr8k_224_refuses_a_folder_missing_images(tmp_path):
    """A copy with one photo missing is not the benchmark: one line naming it, not a subset."""
    from fnemm.datasets import Dataset
    folder = tmp_path / "f8k"
    (folder / "images-224").mkdir(parents=True)
    (folder / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\nb.jpg#0\ta cat\nc.jpg#0\ta cow\n")
    for name, image in (("train", "a.jpg"), ("dev", "b.jpg"), ("test", "c.jpg")):
        (folder / f"Flickr_8k.{name}Images.txt").write_text(image + "\n")
    for image in ("a.jpg", "b.jpg"):
        (folder / "images-224" / image).write_bytes(b"")
    with pytest.raises(FnemmError, match=r"images-224: 1 of the 3 images .* missing \(e\.g\. c\.jpg\)"):
        load_dataset(f"flickr8k-224={folder}")
    (folder / "images-224" / "c.jpg").write_bytes(b"")
    ds = load_dataset(f"flickr8k-224={folder}")
    assert isinstance(ds, Dataset) and ds.counts()["test"] == 1 and ds.images == folder / "images-224"
    assert ds.subset([0]).images == ds.resplit(1).images == folder / "images-224"
    with pytest.raises(FnemmError, match="flickr8k-224 needs the Flickr8K folder with images-224/"):
        load_dataset(f"flickr8k-224={tmp_path}")


@pytest.mark.parametrize("text", [b"", b"\n\n  \n", b"image,caption\n"])
def test_an_empty_dataset_is_one_line_for_every_command(tmp_path, text, capsys):
    from fnemm.cli import main
    path = tmp_path / ("mine.csv" if text.startswith(b"image") else "mine.jsonl")
    path.write_bytes(text)
    for argv in (["extract", "--dataset", str(path), "--images", str(tmp_path), "--out", str(tmp_path / "s")],
                 ["train", "--preset", "demo/FNE-MH", "--dataset", str(path), "--features", str(tmp_path / "x.npy"),
                  "--out", str(tmp_path / "r")],
                 ["index", "build", "--checkpoint", str(tmp_path), "--features", str(tmp_path), "--dataset", str(path),
                  "--out", str(tmp_path / "i")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fnemm: error: ") and "mine." in err, (argv, err)


def test_a_file_that_is_not_utf8_is_named_with_the_line(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"image": "a.jpg", "captions": ["a dog"]}\n'.encode()
                                           + '{"image": "caf\u00e9.jpg", "captions": ["x"]}\n'.encode("latin-1"))
    with pytest.raises(FnemmError, match=r"latin\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_dataset(tmp_path / "latin.jsonl")
    folder = tmp_path / "f8k"
    folder.mkdir()
    (folder / "Flickr8k.token.txt").write_bytes("a.jpg#0\tun caf\u00e9\n".encode("latin-1"))
    with pytest.raises(FnemmError, match=r"Flickr8k\.token\.txt:1: not UTF-8"):
        load_dataset(folder)


def test_a_byte_order_mark_is_dropped_from_every_text_format(tmp_path):
    """Excel's "CSV UTF-8" and Windows Notepad start a file with a byte-order mark. It used
    to glue itself to the first name: a token file's first caption went to an image no
    split lists (lost, silently), a split list's first image became another name, and JSON
    lines, CSV and JSON were refused. Each loads as without it; UTF-16 is refused by name."""
    bom = b"\xef\xbb\xbf"
    plain = write_flickr(tmp_path / "plain", _tokens(["a.jpg", "b.jpg", "c.jpg"]), ["a.jpg"], ["b.jpg"], ["c.jpg"])
    marked = write_flickr(tmp_path / "marked", _tokens(["a.jpg", "b.jpg", "c.jpg"]), ["a.jpg"], ["b.jpg"], ["c.jpg"])
    for file in marked.iterdir():
        file.write_bytes(bom + file.read_bytes())
    want = load_dataset(plain)
    got = load_dataset(marked)
    assert (got.image_ids, got.captions, got.splits) == (want.image_ids, want.captions, want.splits)
    assert [len(c) for c in got.captions] == [5, 5, 5]
    files = {"mine.jsonl": '{"image": "a.jpg", "captions": ["a dog"], "split": "train"}\n',
             "mine.csv": "image,caption,split\r\na.jpg,\"a dog, wet\",train\r\n",
             "dataset_flickr8k.json": json.dumps({"images": [{"filename": "a.jpg", "split": "train",
                                                              "sentences": [{"raw": "a dog"}]}]})}
    for name, text in files.items():
        (tmp_path / name).write_bytes(bom + text.encode())
        ds = load_dataset(tmp_path / name)
        assert ds.image_ids == ["a.jpg"] and ds.captions[0][0] in ("a dog", "a dog, wet"), name
        (tmp_path / name).write_bytes(text.encode("utf-16"))
        with pytest.raises(FnemmError, match=f"{name}: UTF-16 text .*; save the file as UTF-8"):
            load_dataset(tmp_path / name)


def test_lines_end_at_line_ends_only_not_at_unicode_separators(tmp_path):
    """JSON may hold U+2028 (line separator) and U+0085 (next line) unescaped in a string,
    as a web caption can; str.splitlines cut such a JSON line in two ("invalid JSON").
    Lines end at \\n, \\r\\n or \\r, and nowhere else."""
    odd = "a dog\u2028runs\u0085on sand"
    records = [{"image": "a.jpg", "captions": [odd], "split": "train"}, {"image": "b.jpg", "captions": ["x"]}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    (tmp_path / "odd.jsonl").write_bytes(text.replace('"x"]}', '"x"], "split": "test"}').encode())
    ds = load_dataset(tmp_path / "odd.jsonl")
    assert ds.image_ids == ["a.jpg", "b.jpg"] and ds.captions[0] == [odd]
    folder = write_flickr(tmp_path / "mac", _tokens(["a.jpg", "b.jpg", "c.jpg"]), ["a.jpg"], ["b.jpg"], ["c.jpg"])
    for file in folder.iterdir():                                       # classic Mac line ends
        file.write_bytes(file.read_bytes().replace(b"\n", b"\r"))
    assert [len(c) for c in load_dataset(folder).captions] == [5, 5, 5]
