"""fnemm embed (images or texts -> joint embeddings, .npy and parquet) and image -> image
search, against the model's own towers and brute force."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import DATA
from fnemm.cli import main
from fnemm.datasets import load_dataset
from fnemm.search.embed import read_embeddings
from fnemm.search.gallery import Gallery


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model(demo):
    out, _ = demo
    return out / "FNE-MH" / "seed-0", out / "features"


@pytest.fixture(scope="module")
def gallery(model):
    run_dir, store = model
    return Gallery.from_store(run_dir, store, load_dataset(f"flickr8k-1k={DATA / 'flickr8k'}"))


def test_texts_match_the_text_tower_in_npy_and_parquet(capsys, model, gallery, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    run_dir, _ = model
    texts = ["a dog runs on the beach", "", "two children play in the snow", "a man on a bike"]
    (tmp_path / "q.txt").write_text("\n".join(texts) + "\n")
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--texts", tmp_path / "q.txt",
                         "--out", tmp_path / "emb", "--parquet")
    assert code == 0, err
    assert "texts: 3 x" in out
    vectors, meta = read_embeddings(tmp_path / "emb", "texts")
    kept = [t for t in texts if t]
    assert meta["texts"] == kept and meta["ids"] == [0, 1, 2] and meta["similarity"] == "cosine"
    expected = np.vstack([gallery.text_embedding(t) for t in kept])
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    table = pq.read_table(tmp_path / "emb" / "texts.parquet")
    assert table.column_names == ["id", "text", "embedding"]
    assert table.column("text").to_pylist() == kept
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), vectors)


def test_a_texts_file_is_utf8_its_byte_order_mark_dropped(capsys, model, gallery, tmp_path):
    """A sentence file saved with a byte-order mark embeds its first line as written (the
    mark used to stay glued to it); one that is not UTF-8 is refused naming file and line,
    where its bytes used to be replaced and embedded silently."""
    run_dir, _ = model
    texts = ["a dog on the beach", "a caf\u00e9 terrace"]
    (tmp_path / "q.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(texts).encode())
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--texts", tmp_path / "q.txt",
                         "--out", tmp_path / "e")
    assert code == 0, err
    vectors, meta = read_embeddings(tmp_path / "e", "texts")
    assert meta["texts"] == texts
    np.testing.assert_allclose(vectors[:1], gallery.text_embedding(texts[0]), rtol=1e-5, atol=1e-6)
    (tmp_path / "latin.txt").write_bytes("\n".join(texts).encode("latin-1"))
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--texts", tmp_path / "latin.txt",
                         "--out", tmp_path / "e2")
    assert code == 2 and f"{tmp_path / 'latin.txt'}:2: not UTF-8 text (byte 0xe9" in err, err
    assert not (tmp_path / "e2").exists()
    import io
    import sys
    for data, said in ((b"\xef\xbb\xbf" + "\n".join(texts).encode(), None),     # standard input: the same rules
                       ("\n".join(texts).encode("latin-1"), "<stdin>:2: not UTF-8 text (byte 0xe9")):
        stdin = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
        try:
            code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--texts", "-", "--out", tmp_path / "e3")
        finally:
            sys.stdin = stdin
        assert (code, said is None or said in err) == (2 if said else 0, True), err
        if said is None:
            assert read_embeddings(tmp_path / "e3", "texts")[1]["texts"] == texts


def test_embedded_texts_the_model_cannot_read_are_named(capsys, model, tmp_path):
    """A search query with no word the model knows is refused (NoMatch); a batch of texts
    embeds every row but warns which ones the model read as nothing, and which it cut to
    its token limit, and texts.json lists both."""
    run_dir, _ = model
    texts = ["a dog on the beach", "zzqxv quokka", " ".join(["dog"] * 120), "xylophone !"]
    (tmp_path / "q.txt").write_text("\n".join(texts) + "\n")
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--texts", tmp_path / "q.txt",
                         "--out", tmp_path / "e")
    assert code == 0, err
    assert "texts 1, 3 (2 of 4) have no word in the model's vocabulary (e.g. 'zzqxv quokka')" in err, err
    assert "text 2 (1 of 4) has more than the model's 100 tokens: each was cut to its first 100" in err, err
    vectors, meta = read_embeddings(tmp_path / "e", "texts")
    assert meta["no_known_words"] == [1, 3] and meta["cut"] == [2] and vectors.shape[0] == 4


def test_store_images_match_the_gallery(capsys, model, gallery, tmp_path):
    run_dir, store = model
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--images", store, "--out", tmp_path / "e")
    assert code == 0, err
    vectors, meta = read_embeddings(tmp_path / "e")
    assert meta["ids"] == gallery.image_ids and len(vectors) == 30
    np.testing.assert_allclose(vectors, gallery.images.vectors, rtol=1e-5, atol=1e-6)
    assert all(p.endswith(i) and json.dumps(p) for p, i in zip(meta["paths"], meta["ids"]))
    assert not (tmp_path / "e" / "images.parquet").exists()


def test_new_image_files_go_through_the_stores_cnn_and_statistics(capsys, model, gallery, tmp_path):
    """A folder (and a list file) of photos, two of them already in the store and one
    unreadable: extracted like the store, the two embed as the store's rows do; the
    unreadable one is reported, not silently dropped."""
    pa = pytest.importorskip("pyarrow.parquet")
    run_dir, store = model
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    known = gallery.image_ids[:2]
    shutil.copy(DATA / "flickr8k" / "images" / known[0], photos / known[0])
    shutil.copy(DATA / "flickr8k" / "images" / known[1], photos / "sub" / known[1])
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--images", photos, "--features", store,
                         "--out", tmp_path / "new", "--parquet", "--quiet")
    assert code == 0, err
    assert "broken.jpg" in err and "could not be read" in err and "images: 2 x" in out
    vectors, meta = read_embeddings(tmp_path / "new")
    assert sorted(meta["ids"]) == sorted([known[0], f"sub/{known[1]}"]) and "broken.jpg" in meta["skipped"]
    for row, image in zip(vectors, meta["ids"]):
        np.testing.assert_allclose(row, gallery.image_embedding(image.split("/")[-1])[0], rtol=1e-4, atol=1e-5)
    table = pa.read_table(tmp_path / "new" / "images.parquet")
    assert table.column("id").to_pylist() == meta["ids"] and table.column("path").to_pylist() == meta["paths"]

    # the same photos as a list file (relative to it), the default --features (the trained-on store)
    (tmp_path / "list.txt").write_text(f"photos/{known[0]}\n\nphotos/sub/{known[1]}\n")
    code, out, err = run(capsys, "embed", "--checkpoint", run_dir, "--images", tmp_path / "list.txt",
                         "--out", tmp_path / "listed", "--quiet")
    assert code == 0, err
    listed, meta2 = read_embeddings(tmp_path / "listed")
    assert meta2["ids"] == [known[0], f"sub/{known[1]}"]
    np.testing.assert_allclose(listed, vectors[[meta["ids"].index(i) for i in meta2["ids"]]], atol=1e-6)


def test_embed_errors_are_one_line(capsys, model, tmp_path):
    run_dir, store = model
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "list.txt").write_text("nope.jpg\n")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "twice.txt").write_text("a.jpg\n\n./a.jpg\n")     # found before any extraction
    for argv, fragment in [
        (["--images", tmp_path / "twice.txt"], "twice.txt:3: lists ./a.jpg again (first on line 1)"),
        (["--texts", tmp_path / "empty.txt"], "no sentences"),
        (["--texts", tmp_path / "missing.txt"], "no such file"),
        (["--images", tmp_path / "list.txt"], "missing file"),
        (["--images", tmp_path / "nowhere"], "no such folder or file"),
        (["--texts", tmp_path / "list.txt", "--features", store], "--features is for --images"),
    ]:
        code, _, err = run(capsys, "embed", "--checkpoint", run_dir, *argv, "--out", tmp_path / "o")
        assert code == 2 and fragment in err and "Traceback" not in err, (argv, err)
    code, _, err = run(capsys, "embed", "--checkpoint", tmp_path, "--texts", tmp_path / "list.txt",
                       "--out", tmp_path / "o")
    assert code == 2 and "no such checkpoint" in err
    (tmp_path / "q.txt").write_text("a dog\n")
    records = tmp_path / "records"                     # a study's exported or carried run: numbers, no weights
    records.mkdir()
    for name in ("config.json", "metrics.jsonl", "metrics-test.json"):
        (records / name).write_bytes((run_dir / name).read_bytes() if (run_dir / name).exists() else b"{}")
    for given, said in ((store, f"{store} is a feature store, not a run"),
                        (records, f"{records} holds a finished run's records (its numbers), not its weights"),
                        (run_dir.parent, f"{run_dir.parent} holds seeds: pass one, e.g. {run_dir.parent / 'seed-0'}")):
        code, _, err = run(capsys, "embed", "--checkpoint", given, "--texts", tmp_path / "q.txt",
                           "--out", tmp_path / "o")
        assert code == 2 and said in err, err


def test_open_model_encodes_texts_and_photos_like_open_clip(model, gallery):
    """model = fnemm.open_model(run, store); model.encode_text / encode_image give the
    normalised rows search uses, and model.similarity compares them."""
    import fnemm
    from PIL import Image
    run_dir, store = model
    m = fnemm.open_model(run_dir, store)
    texts = m.encode_text(["a dog runs on the beach", "two children play"])
    assert texts.shape == (2, m.config.model.embed_dim)
    assert torch.allclose(texts.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts[0], torch.from_numpy(gallery.text_embedding("a dog runs on the beach"))[0], atol=1e-6)
    photo = DATA / "flickr8k" / "images" / gallery.image_ids[0]
    with Image.open(photo) as im:
        images = m.encode_image([photo, im.copy()])
    assert images.shape == (2, m.config.model.embed_dim) and torch.allclose(images[0], images[1], atol=1e-5)
    scores = m.similarity(images, texts)
    assert scores.shape == (2, 2) and torch.allclose(scores, images @ texts.t(), atol=1e-6)
    assert m.encode_text("a dog").shape == (1, m.config.model.embed_dim)


def test_a_query_with_no_known_word_gets_no_hits_and_exit_1(capsys, model, gallery):
    run_dir, store = model
    common = ["search", "--checkpoint", run_dir, "--features", store, "--dataset", f"flickr8k-1k={DATA / 'flickr8k'}"]
    code, out, err = run(capsys, *common, "--text", "xylophone quokka")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "none of the query's words is in the model's vocabulary (xylophone, quokka)" in err
    code, out, err = run(capsys, *common, "--text", "a dog xylophone", "-k", "2")   # partly known: hits and a note
    assert code == 0 and "read as <unk>: xylophone" in err


def test_image_to_image_search_is_brute_force_cosine(capsys, model, gallery):
    run_dir, store = model
    vectors = gallery.images.vectors
    for query in gallery.image_ids[:5]:
        q = vectors[gallery.image_ids.index(query)]
        scores = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
        order = np.argsort(-scores, kind="stable")[:7]
        hits = gallery.similar(query, k=7)
        assert [h.image for h in hits] == [gallery.image_ids[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
    # the CLI: by id and by file, the same ranking; captions and paths come with each hit
    first = gallery.image_ids[3]
    common = ["search", "--checkpoint", run_dir, "--features", store, "--dataset", f"flickr8k-1k={DATA / 'flickr8k'}"]
    code, out, err = run(capsys, *common, "--similar", first, "-k", "4", "--json")
    assert code == 0, err
    by_id = json.loads(out)
    assert by_id["query"] == {"similar": first} and by_id["results"][0]["image"] == first
    assert [h["image"] for h in by_id["results"]] == [h.image for h in gallery.similar(first, k=4)]
    assert all(h["captions"] and h["path"] for h in by_id["results"])
    code, out, err = run(capsys, *common, "--similar", DATA / "flickr8k" / "images" / first, "-k", "4", "--json")
    assert code == 0, err
    assert [h["image"] for h in json.loads(out)["results"]] == [h["image"] for h in by_id["results"]]
    code, out, _ = run(capsys, *common, "--similar", first, "-k", "2")
    assert out.splitlines()[0] == f"images like: {first}" and '"' in out.splitlines()[1]


def test_an_output_path_that_is_a_file_is_one_line_for_every_command(capsys, model, tmp_path):
    """--out (or --output) where a file stands, or under one: one line naming it, for every
    command that writes; it was a FileExistsError traceback from train, extract, embed,
    index build and study, and an IsADirectoryError one from evaluate --output DIR."""
    run_dir, store = model
    data = f"flickr8k-1k={DATA / 'flickr8k'}"
    file = tmp_path / "taken.csv"
    file.write_text("image,caption\n")
    (tmp_path / "q.txt").write_text("a dog\n")
    for out, said in ((file, f"{file}: a file, not a folder"), (file / "sub", f"{file / 'sub'}: {file} is a file")):
        for argv in (["extract", "--dataset", data, "--from", store, "--out", out],      # train: test_own_data
                     ["embed", "--checkpoint", run_dir, "--texts", tmp_path / "q.txt", "--out", out],
                     ["index", "build", "--checkpoint", run_dir, "--features", store, "--out", out],
                     ["report", run_dir, "--out", out],
                     ["study", "--quick", "--out", out]):
            code, _, err = run(capsys, *argv)
            assert code == 2 and err.startswith("fnemm: error: ") and said in err and "Traceback" not in err, \
                (argv, err)
    code, _, err = run(capsys, "evaluate", "--checkpoint", run_dir, "--output", tmp_path)
    assert code == 2 and f"--output {tmp_path}: a folder" in err
    code, _, err = run(capsys, "evaluate", "--checkpoint", run_dir, "--output", file / "m.json")
    assert code == 2 and f"{file / 'm.json'}: {file} is a file, not a folder" in err, err
