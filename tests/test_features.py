import json

import numpy as np
import pytest

from fnemm import FnemmError, load_features, write_store


def test_store_roundtrip_and_alignment(tmp_path):
    fne = np.array([[1, 0, -1], [0, 1, 1]], dtype=np.int8)
    fc7 = np.random.default_rng(0).random((2, 4)).astype(np.float32)
    write_store(tmp_path / "s", ["a.jpg", "b.jpg"], {"fne": fne, "fc7": fc7},
                skipped={"c.jpg": "cannot identify image file"}, cnn="mobilenet_v2")
    f = load_features(tmp_path / "s", "fne")
    assert f.array.dtype == np.int8 and f.dim == 3 and f.manifest["cnn"] == "mobilenet_v2"
    assert f.rows_for(["b.jpg", "a.jpg"]).tolist() == [1, 0]
    assert np.array_equal(load_features(tmp_path / "s", "fc7").array, fc7)
    with pytest.raises(FnemmError, match="1 of 2 images.*skipped at extraction.*cannot identify"):
        f.rows_for(["a.jpg", "c.jpg"])
    with pytest.raises(FnemmError, match="no 'raw' features"):
        load_features(tmp_path / "s", "raw")


def test_plain_npy_with_ids(tmp_path):
    np.save(tmp_path / "f.npy", np.ones((3, 5), np.float32))
    (tmp_path / "f.ids.txt").write_text("x\ny\nz\n")
    assert load_features(tmp_path / "f.npy").ids == ["x", "y", "z"]
    (tmp_path / "other.txt").write_text("x\ny\n")
    with pytest.raises(FnemmError, match="3 rows but 2 image ids"):
        load_features(tmp_path / "f.npy", ids=tmp_path / "other.txt")
    (tmp_path / "dup.txt").write_text("x\ny\nx\n")
    with pytest.raises(FnemmError, match="'x' appears twice"):
        load_features(tmp_path / "f.npy", ids=tmp_path / "dup.txt")
    np.save(tmp_path / "g.npy", np.ones(3))
    with pytest.raises(FnemmError, match="no ids file"):
        load_features(tmp_path / "g.npy")


def test_ids_that_do_not_match_the_dataset(tmp_path):
    np.save(tmp_path / "f.npy", np.ones((2, 5), np.float32))
    (tmp_path / "f.ids.txt").write_text("x.jpg\ny.jpg\n")
    f = load_features(tmp_path / "f.npy")
    with pytest.raises(FnemmError, match=r"2 of 2 images of the train split have no features \(e.g. 'a.jpg'\)"):
        f.rows_for(["a.jpg", "b.jpg"], "the train split")


def test_bad_store(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(FnemmError, match="no manifest.json"):
        load_features(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FnemmError, match="not an fnemm feature store"):
        load_features(tmp_path / "s")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "bad.ids.txt").write_text("a\n")
    with pytest.raises(FnemmError, match="not a readable .npy"):
        load_features(tmp_path / "bad.npy")


def test_training_rows_are_read_into_one_block_chunk_by_chunk(tmp_path, monkeypatch):
    """gather_rows: the same bytes as fancy indexing, for shuffled and repeated rows, from a
    memory-mapped store, whatever the chunk (a chunk of 1, 3 and all rows)."""
    import numpy as np
    import fnemm.joint.inputs as inputs
    rng = np.random.default_rng(0)
    array = rng.integers(-1, 2, size=(50, 7), dtype=np.int8)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    rows = np.concatenate([rng.permutation(50)[:30], [4, 4]])
    for chunk_rows in (1, 3, 100):
        monkeypatch.setattr(inputs, "GATHER_BYTES", chunk_rows * 7)
        got = inputs.gather_rows(mapped, rows)
        assert got.dtype == np.int8 and got.tobytes() == array[rows].tobytes()
    assert inputs.gather_rows(mapped, np.zeros(0, np.int64)).shape == (0, 7)


def test_a_split_of_a_mapped_store_is_read_when_used_with_the_same_bytes(tmp_path, synth):
    """From a memory-mapped store a split's rows are a view read when indexed (no copy of
    the training block in memory); every way training and validation index them gives the
    bytes fancy indexing gives, and training on it ends with the weights of training on
    the same rows held in memory."""
    import numpy as np
    import torch
    from fnemm.joint.inputs import Rows, split_data
    from fnemm.training.trainer import train
    from fnemm.datasets import load_dataset
    from fnemm.joint.inputs import build_vocab
    from fnemm.joint.presets import get_preset
    from fnemm.joint.config import apply_overrides
    from test_train import SMALL
    jsonl, npy, ids = synth
    dataset, mapped = load_dataset(jsonl), load_features(npy, ids=ids)
    assert isinstance(mapped.array, np.memmap) or isinstance(mapped.array.base, np.memmap)
    vocab = build_vocab(dataset)
    data = split_data(dataset, mapped, vocab, "train")
    assert isinstance(data.features, Rows) and data.features.shape == (len(data), mapped.array.shape[1])
    rows = mapped.rows_for(data.image_ids, "train")
    whole = np.asarray(mapped.array)[rows]
    pick = np.array([5, 0, 3, 3, len(data) - 1])
    assert data.features[pick].tobytes() == whole[pick].tobytes()
    assert data.features[2:9].tobytes() == whole[2:9].tobytes() and np.asarray(data.features).tobytes() == whole.tobytes()
    assert data.head(4).features.tobytes() == whole[:4].tobytes()
    config = apply_overrides(get_preset("flickr30k/FNE-MH"), [*SMALL, "stages.max_epochs=1"])
    held = load_features(npy, ids=ids)
    held.array = np.array(held.array)                      # the same rows, in memory
    a = train(config, dataset, mapped, tmp_path / "mapped", quiet=True)
    b = train(config, dataset, held, tmp_path / "held", quiet=True)
    wa = torch.load(tmp_path / "mapped" / "best.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "held" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["val"] == b["val"]


def test_stacked_stores_read_as_the_concatenation_of_their_rows(tmp_path):
    """One gallery over several stores: every read of rows equals the same read of the
    concatenated arrays (the brute-force reference), and the stores must agree."""
    from fnemm.features.store import Features, StackedRows, stack_features
    rng = np.random.default_rng(0)
    parts = [rng.integers(-1, 2, (n, 7)).astype(np.int8) for n in (5, 1, 4)]
    whole = np.concatenate(parts)
    stacked = StackedRows(parts)
    assert stacked.shape == whole.shape and len(stacked) == 10 and stacked.dtype == np.int8
    for rows in ([], [0], [9, 0, 5, 5, 4, 6], rng.integers(0, 10, 50), np.arange(10)[::-1]):
        assert np.array_equal(stacked[np.asarray(rows, np.int64)], whole[np.asarray(rows, np.int64)])
    assert np.array_equal(stacked[2:8], whole[2:8])
    for bad in ([10], [-1], [3, 11]):
        with pytest.raises(IndexError):
            stacked[np.asarray(bad)]
    feats = [Features([f"s{k}-{r}" for r in range(len(p))], p, f"store{k}", "fne") for k, p in enumerate(parts)]
    one = stack_features(*feats)
    assert one.ids == [i for f in feats for i in f.ids] and one.source == "store0"
    assert np.array_equal(one.array[one.rows_for(["s2-3", "s0-0", "s1-0"])], whole[[9, 0, 5]])
    assert stack_features(feats[0]) is feats[0]
    with pytest.raises(FnemmError, match="image 's0-1' is in store0 too"):
        stack_features(feats[0], Features(["s0-1"], parts[1], "dup", "fne"))
    with pytest.raises(FnemmError, match="fne features of 3 dimensions"):
        stack_features(feats[0], Features(["x"], np.zeros((1, 3), np.int8), "narrow", "fne"))
    with pytest.raises(FnemmError, match=r"\(float32\)"):
        stack_features(feats[0], Features(["x"], np.zeros((1, 7), np.float32), "float", "fne"))
