"""Index folders (`fnemm index build`) and the HTTP API (ASGI test client) over a small
real index: the demo's models on 30 bundled Flickr8K photos."""

import io
import json
import logging
import re
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from conftest import DATA  # noqa: E402
from fnemm.cli import main  # noqa: E402
from fnemm.datasets import load_dataset  # noqa: E402
from fnemm.io.errors import Conflict, FnemmError, NotAnImage, NotFound, TooLarge  # noqa: E402
from fnemm.search.gallery import MAX_K, Gallery  # noqa: E402
from fnemm.search.index_folder import build_index  # noqa: E402
from fnemm.search.service import create_app  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")           # starlette's note that it prefers httpx2
    from fastapi.testclient import TestClient  # noqa: E402

SPEC = f"flickr8k-1k={DATA / 'flickr8k'}"


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory):
    """{model: index folder}: FNE-MH exact, FNE-POE (order) through HNSW."""
    out, _ = demo
    root = tmp_path_factory.mktemp("index")
    dataset = load_dataset(SPEC)
    folders = {"FNE-MH": root / "mh", "FNE-POE": root / "poe"}
    build_index(out / "FNE-MH" / "seed-0", out / "features", folders["FNE-MH"], dataset=dataset, quiet=True)
    build_index(out / "FNE-POE" / "seed-0", out / "features", folders["FNE-POE"], dataset=dataset, method="hnsw",
                quiet=True)
    return out, folders


@pytest.fixture(scope="module")
def client(built):
    _, folders = built
    return TestClient(create_app(Gallery.from_index(folders["FNE-MH"]), max_upload_bytes=200_000))


def photo_bytes(name=None, size=(320, 240), fmt="JPEG") -> bytes:
    if name:
        return (DATA / "flickr8k" / "images" / name).read_bytes()
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, fmt)
    return buf.getvalue()


# --- index folders -------------------------------------------------------------

def test_index_matches_brute_force_search(built):
    out, folders = built
    gallery = Gallery.from_index(folders["FNE-MH"])
    manifest = json.loads((folders["FNE-MH"] / "manifest.json").read_text())
    assert manifest["images"]["method"] == "exact" and manifest["images"]["count"] == 30
    assert manifest["captions"]["count"] == 150 and len(manifest["request"]["checkpoint"]["sha256"]) == 64
    for side in (gallery.images, gallery.caption_index):      # exact sides are served from their files, mapped
        assert isinstance(side.vectors.base, np.memmap) or isinstance(side.vectors, np.memmap)
    assert not list(folders["FNE-MH"].glob(".*.tmp"))          # the embeddings were written in place, then renamed
    searcher = Gallery.from_store(out / "FNE-MH" / "seed-0", out / "features", load_dataset(SPEC))
    for query in ("a dog runs on the beach", "two children play in the snow", "a man on a bike"):
        ours, ref = gallery.text(query, 10), searcher.text(query, 10)
        assert [h.image for h in ours] == [h.image for h in ref]
        np.testing.assert_allclose([h.score for h in ours], [h.score for h in ref], atol=1e-5)
        assert ours[0].captions == gallery.captions_of[ours[0].image] and len(ours[0].captions) == 5
    image_id = gallery.image_ids[3]
    ours, ref = gallery.image(image_id, 7), searcher.image(image_id, 7)
    assert [(h.image, h.caption) for h in ours] == [(h.image, h.caption) for h in ref]
    # brute force, by hand: the scores are the model's cosine of caption and image embeddings
    import torch
    from fnemm.joint.checkpoint import open_model
    from fnemm.joint.inputs import embed_captions, embed_images
    from fnemm.features.store import load_features
    opened = open_model(out / "FNE-MH" / "seed-0", out / "features")
    feats = load_features(out / "features")
    img = embed_images(opened.model, np.asarray(feats.array), "cpu")
    cap = embed_captions(opened.model, [opened.vocab.encode("a man on a bike")], "cpu")
    scores = (img @ cap.T)[:, 0]
    best = torch.argsort(scores, descending=True)[:10].tolist()
    assert [h.image for h in gallery.text("a man on a bike", 10)] == [feats.ids[k] for k in best]


def test_order_index_reranks_and_reports_recall(built):
    out, folders = built
    manifest = json.loads((folders["FNE-POE"] / "manifest.json").read_text())
    assert manifest["similarity"] == "order"
    for side in ("images", "captions"):
        info = manifest[side]
        assert info["method"] == "hnsw" and info["params"]["ef_search"] >= 16
        assert 0 <= info["rerank_recall_at_10"] <= 1 and info["candidates"] >= 10
        assert (folders["FNE-POE"] / f"{side}.faiss").exists()
    assert manifest["images"]["tuned_on"] == "the dataset's captions"
    assert manifest["captions"]["tuned_on"] == "the gallery's images"
    # 30 images <= the candidates: the re-rank is the exhaustive S_OE ranking
    gallery = Gallery.from_index(folders["FNE-POE"])
    searcher = Gallery.from_store(out / "FNE-POE" / "seed-0", out / "features", load_dataset(SPEC))
    ours, ref = gallery.text("a black dog in the grass", 10), searcher.text("a black dog in the grass", 10)
    assert [h.image for h in ours] == [h.image for h in ref]
    np.testing.assert_allclose([h.score for h in ours], [h.score for h in ref], atol=1e-5)


def test_rebuild_with_same_inputs_keeps_the_index(built, capsys):
    out, folders = built
    before = {p.name: p.stat().st_mtime_ns for p in folders["FNE-MH"].iterdir() if p.name != ".lock"}
    assert main(["index", "build", "--checkpoint", str(out / "FNE-MH" / "seed-0"), "--features",
                 str(out / "features"), "--dataset", SPEC, "--out", str(folders["FNE-MH"])]) == 0
    assert "index up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folders["FNE-MH"].iterdir() if p.name != ".lock"} == before


def test_index_from_an_older_format_version_is_rebuilt(built, tmp_path, capsys):
    out, folders = built
    old = tmp_path / "old"
    shutil.copytree(folders["FNE-MH"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))   # tuned by older rules
    assert main(["index", "build", "--checkpoint", str(out / "FNE-MH" / "seed-0"), "--features",
                 str(out / "features"), "--dataset", SPEC, "--out", str(old)]) == 0
    assert "index up to date" not in capsys.readouterr().out
    assert json.loads((old / "manifest.json").read_text())["version"] == manifest["version"] > 1


def test_index_refuses_changed_checkpoint_or_store(built, tmp_path):
    out, folders = built
    ckpt = tmp_path / "run"
    shutil.copytree(out / "FNE-MH" / "seed-0", ckpt)
    Gallery.from_index(folders["FNE-MH"], checkpoint=ckpt, encoder=False)          # an identical copy is fine
    with open(ckpt / "best.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(FnemmError, match=r"not the checkpoint .* \(sha256 differs\); rebuild it: fnemm index build"):
        Gallery.from_index(folders["FNE-MH"], checkpoint=ckpt)
    store = tmp_path / "store"
    shutil.copytree(out / "features", store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["thresholds"] = [-0.5, 0.5]
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FnemmError, match="not the feature store"):
        Gallery.from_index(folders["FNE-MH"], features=store)
    with pytest.raises(FnemmError, match="is not there"):
        Gallery.from_index(folders["FNE-MH"], features=tmp_path / "moved")
    with pytest.raises(FnemmError, match="not an index folder"):
        Gallery.from_index(tmp_path)
    # a run folder or a store given for an index: said as such
    with pytest.raises(FnemmError, match=r"not an index folder \(a run folder: `index build --checkpoint`"):
        Gallery.from_index(out / "FNE-MH" / "seed-0")
    with pytest.raises(FnemmError, match=r"not an index folder \(a feature store: `index build --features`"):
        Gallery.from_index(out / "features")
    broken = tmp_path / "broken"
    shutil.copytree(folders["FNE-POE"], broken)
    (broken / "images.faiss").unlink()
    with pytest.raises(FnemmError, match="images.faiss: missing, or not the file the manifest records"):
        Gallery.from_index(broken)
    shutil.copy(folders["FNE-POE"] / "images.faiss", broken)
    (broken / "images.ids.json").write_text('["a.jpg"]')
    with pytest.raises(FnemmError, match="images.ids.json: missing, or not the file"):
        Gallery.from_index(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(FnemmError, match=r"manifest.json:1: invalid JSON .*rebuild it: fnemm index build"):
        Gallery.from_index(broken)


def test_a_damaged_index_is_rebuilt_by_the_same_command(built, tmp_path, capsys):
    """The advice of every load error, `fnemm index build` with the same inputs, repairs the
    index: files whose bytes changed (same size) make it out of date."""
    out, folders = built
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["FNE-MH"], damaged)
    data = bytearray((damaged / "images.npy").read_bytes())
    data[-400:] = b"\x7f" * 400                           # same size, other numbers
    (damaged / "images.npy").write_bytes(bytes(data))
    args = ["index", "build", "--checkpoint", str(out / "FNE-MH" / "seed-0"), "--features", str(out / "features"),
            "--dataset", SPEC, "--out", str(damaged)]
    assert main(args) == 0
    assert "up to date" not in capsys.readouterr().out
    assert (damaged / "images.npy").read_bytes() == (folders["FNE-MH"] / "images.npy").read_bytes()
    assert main(args) == 0 and "index up to date" in capsys.readouterr().out


def test_index_cli_errors_and_search(built, tmp_path, capsys):
    out, folders = built
    common = ["index", "build", "--checkpoint", str(out / "FNE-MH" / "seed-0"), "--features", str(out / "features")]
    for extra, message in [(["--target-recall", "2"], "fraction"), (["--threshold", "0"], "at least 1")]:
        assert main([*common, "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["index", "build", "--checkpoint", str(tmp_path / "none"), "--features", str(out / "features"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    # a split-restricted index without captions: text search only
    assert main([*common, "--dataset", SPEC, "--split", "test", "--out", str(tmp_path / "test")]) == 0
    # --split without --dataset: the splits of the dataset the run was trained on, as search's
    assert main([*common, "--split", "test", "--out", str(tmp_path / "run-split")]) == 0
    assert "(the one the checkpoint was trained on)" in capsys.readouterr().err
    assert ((tmp_path / "run-split" / "images.ids.json").read_bytes() == (tmp_path / "test" / "images.ids.json").read_bytes())
    assert main([*common, "--out", str(tmp_path / "nocap"), "--quiet"]) == 0
    assert "captions: none" in capsys.readouterr().out
    assert main(["search", "--index", str(tmp_path / "test"), "--text", "a dog", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    test_ids = {json.loads(line)["image"] for line in (tmp_path / "test" / "captions.jsonl").read_text().splitlines()}
    assert len(hits) == 3 and {h["image"] for h in hits} <= test_ids and len(test_ids) == 6
    assert main(["search", "--index", str(tmp_path / "nocap"), "--image", "x.jpg"]) == 2
    assert "no captions" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "test"), "--image", "x.jpg"]) == 2
    assert "x.jpg: no such image file, and not an image id of" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "t"), "--tune-queries", str(tmp_path / "none.txt")]) == 2
    assert "--tune-queries" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n\n")
    assert main([*common, "--out", str(tmp_path / "t"), "--tune-queries", str(tmp_path / "blank.txt")]) == 2
    assert "no sentences in it" in capsys.readouterr().err
    (tmp_path / "q.txt").write_text("a dog on the beach\n\na girl with a kite\n")
    assert main([*common, "--out", str(tmp_path / "t"), "--tune-queries", str(tmp_path / "q.txt"),
                 "--method", "hnsw"]) == 0
    tuned = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert tuned["images"]["queries"] == 2 and tuned["request"]["tune_queries"]
    assert tuned["images"]["tuned_on"] == "--tune-queries"
    assert main(["search", "--index", str(tmp_path / "test"), "--features", "f", "--text", "dog"]) == 2
    assert main(["serve", "--index", str(tmp_path / "missing")]) == 2
    assert "not an index folder" in capsys.readouterr().err


# --- the HTTP API --------------------------------------------------------------

def test_text_search_endpoint(client, built):
    r = client.post("/search/text", json={"query": "a dog runs on the beach", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(body["results"], body["results"][1:]))
    ref = Gallery.from_index(built[1]["FNE-MH"], encoder=False).text("a dog runs on the beach", 5)
    assert [h["image"] for h in body["results"]] == [h.image for h in ref]
    assert body["results"][0]["url"] == f"/images/{ref[0].image}"
    r = client.post("/search/text", json={"query": "a zzqxv dog"})        # k defaults to 10
    assert len(r.json()["results"]) == 10 and r.json()["unknown_words"] == ["zzqxv"]
    assert len(client.post("/search/text", json={"query": "dog", "k": MAX_K}).json()["results"]) == 30
    # no word the model knows: no confident noise, a 422 naming the words
    r = client.post("/search/text", json={"query": "xylophone quokka"})
    assert r.status_code == 422 and r.json()["unknown_words"] == ["xylophone", "quokka"]
    assert "none of the query's words is in the model's vocabulary (xylophone, quokka)" in r.json()["error"]


@pytest.mark.parametrize("body, status, message", [
    ({"query": "   ", "k": 3}, 422, "query is empty"),
    ({"query": "a" * 1001}, 422, "at most 1000"),
    ({"query": "dog", "k": 0}, 422, "k=0: must be between 1 and 100"),
    ({"query": "dog", "k": 101}, 422, "k=101"),
    ({"query": "dog", "k": "many"}, 422, "k: Input should be a valid integer"),
    ({"k": 3}, 422, "query: Field required"),
    ({"query": 7}, 422, "query: Input should be a valid string"),
    (b"{not json", 422, "not valid JSON"),
])
def test_text_search_rejects_bad_input(client, body, status, message):
    if isinstance(body, bytes):
        r = client.post("/search/text", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/search/text", json=body)
    assert r.status_code == status
    assert set(r.json()) == {"error"} and message in r.json()["error"]


def test_image_search_endpoint(client, built):
    gallery = Gallery.from_index(built[1]["FNE-MH"])
    image_id = gallery.image_ids[0]
    r = client.post("/search/image", files={"file": (image_id, photo_bytes(image_id), "image/jpeg")},
                    data={"k": "4"})
    assert r.status_code == 200
    hits = r.json()["results"]
    assert len(hits) == 4 and all(h["url"] == f"/images/{h['image']}" for h in hits)
    # the upload goes through the store's CNN and statistics: same captions as the stored image
    by_id = gallery.image(image_id, 4)
    assert [h["caption"] for h in hits] == [h.caption for h in by_id]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in by_id], atol=0.05)
    png = client.post("/search/image", files={"file": ("noise.png", photo_bytes(fmt="PNG"), "image/png")})
    assert png.status_code == 200 and len(png.json()["results"]) == 10


def _at_once(encoder, files):
    """encoder.encode of each file in a thread of its own, all queued before the first
    forward pass starts (the test holds the CNN's turn until every thread waits)."""
    import threading
    results, errors = [None] * len(files), [None] * len(files)
    queued = threading.Semaphore(0)

    class Queue(list):                 # the encoder's waiting list, telling the test of each image
        def append(self, item):
            super().append(item)
            queued.release()
    encoder._waiting = Queue()

    def one(k):
        try:
            results[k] = encoder.encode(files[k])
        except Exception as e:  # noqa: BLE001 - handed to the test
            errors[k] = e
    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(files))]
    with encoder._lock:
        for t in threads:
            t.start()
        for _ in files:                                  # every thread has queued its image
            assert queued.acquire(timeout=300), "a thread never queued its image"
    for t in threads:
        t.join()
    return results, errors


def test_images_encoded_at_once_share_a_forward_pass(built, monkeypatch):
    """Concurrent uploads go through the CNN together, each row as it is alone; an error
    in a shared pass reaches every image of it."""
    from fnemm.features import encode
    out, _ = built
    encoder = encode.StoreEncoder(out / "features")
    assert encoder.batch_size == 1                    # on a CPU: one pass each (see StoreEncoder)
    encoder.batch_size = 3                            # as on a GPU, smaller
    files = sorted((DATA / "flickr8k" / "images").glob("*.jpg"))[:5]
    alone = [encoder.encode(f) for f in files]
    passes = []
    forward = encoder._forward
    encoder._forward = lambda batch: (passes.append(len(batch)), forward(batch))
    together, errors = _at_once(encoder, files)
    assert errors == [None] * len(files)
    assert passes == [3, 2]                           # every waiting image, a batch at a time
    for a, b in zip(alone, together):
        # the same features up to the rounding that batch-mates already move a store's rows by
        # (int8-grid steps flipped by float sums in another order): cosine above 0.999
        for name in ("raw", "fne", "fc7"):
            x, y = a[name].astype(np.float64).ravel(), b[name].astype(np.float64).ravel()
            cos = x @ y / np.sqrt((x @ x) * (y @ y))
            assert cos > 0.999, (name, cos)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the CNN")
    encoder._forward = forward
    with monkeypatch.context() as patch:
        patch.setattr(encode, "forward_images", broken)
        _, errors = _at_once(encoder, files[:3])
    assert [str(e) for e in errors] == ["out of memory in the CNN"] * 3
    assert encoder._waiting == [] and encoder.encode(files[0])["fne"].shape == alone[0]["fne"].shape


def big_dimensions_png(width: int = 8000, height: int = 8000) -> bytes:
    """A PNG that declares width x height: a real one, or (too big to make) a 1x1 PNG
    whose header says so, its checksum fixed."""
    import struct
    import zlib
    buf = io.BytesIO()
    if width * height <= 10 ** 8:
        Image.new("1", (width, height)).save(buf, "PNG")       # 64 megapixels in a few KB
        return buf.getvalue()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.mark.parametrize("files, data, status, message", [
    ({"file": ("notes.txt", b"hello, not a photo", "text/plain")}, {}, 415, "notes.txt: not an image"),
    ({"file": ("half.jpg", photo_bytes()[:300], "image/jpeg")}, {}, 415, "not an image"),
    ({"file": ("empty.jpg", b"", "image/jpeg")}, {}, 422, "upload is empty"),
    ({"file": ("big.png", photo_bytes(size=(700, 700), fmt="PNG"), "image/png")}, {}, 413,
     "request body over 0.253 MiB"),                                   # refused on its Content-Length
    ({"file": ("a.jpg", b"\xff" * 210_000, "image/jpeg")}, {}, 413, "a.jpg: upload over 0.191 MiB"),
    ({"file": ("huge.png", big_dimensions_png(), "image/png")}, {}, 413, "8000x8000 pixels"),
    ({"file": ("bomb.png", big_dimensions_png(100_000, 100_000), "image/png")}, {}, 413, "too many pixels"),
    ({"file": ("ok.jpg", photo_bytes(), "image/jpeg")}, {"k": "0"}, 422, "k=0"),
    ({"file": ("ok.jpg", photo_bytes(), "image/jpeg")}, {"k": "500"}, 422, "k=500"),
    ({"file": ("ok.jpg", photo_bytes(), "image/jpeg")}, {"k": "lots"}, 422, "k: Input should be a valid integer"),
    (None, {"k": "3"}, 422, "file: Field required"),
])
def test_image_search_rejects_bad_input(client, files, data, status, message):
    r = client.post("/search/image", files=files, data=data)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"]


def test_oversized_chunked_upload_is_cut_off(client):
    def chunks():
        for _ in range(20):
            yield b"x" * 50_000                # no Content-Length: counted as it arrives
    r = client.post("/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "request body over" in r.json()["error"]


def test_image_search_needs_captions(built, tmp_path):
    out, _ = built
    manifest = build_index(out / "FNE-MH" / "seed-0", out / "features", tmp_path / "nocap", quiet=True)
    assert manifest["images"]["tuned_on"].startswith("the images themselves") and manifest["captions"] is None
    bare = TestClient(create_app(Gallery.from_index(tmp_path / "nocap")))
    r = bare.post("/search/image", files={"file": ("ok.jpg", photo_bytes(), "image/jpeg")})
    assert r.status_code == 409 and "no captions" in r.json()["error"]
    r = bare.post("/search/text", json={"query": "a dog"})
    assert r.status_code == 200 and r.json()["results"][0]["captions"] == []


def test_thumbnails_health_docs_and_page(client, built):
    gallery = Gallery.from_index(built[1]["FNE-MH"], encoder=False)
    image_id = gallery.image_ids[5]
    r = client.get(f"/images/{image_id}", params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as thumb, Image.open(DATA / "flickr8k" / "images" / image_id) as full:
        assert max(thumb.size) == 128 and abs(thumb.width / thumb.height - full.width / full.height) < 0.05
    for url, status, message in [("/images/nope.jpg", 404, "no such image in this gallery"),
                                 ("/images/..%2F..%2Fetc%2Fpasswd", 404, "no such image"),
                                 (f"/images/{image_id}?size=5000", 422, "size=5000"),
                                 (f"/images/{image_id}?size=big", 422, "size: Input should be a valid integer")]:
        r = client.get(url)
        assert r.status_code == status and message in r.json()["error"], (url, r.text)
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "images": 30, "captions": 150, "similarity": "cosine", "embed_dim": 512,
                      "features": "fne", "method": {"images": "exact", "captions": "exact"}, "image_upload": True}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search/text", "/search/image", "/images/{image_id}", "/healthz"} <= set(paths)
    # the schema documents the error bodies the API really sends
    assert set(paths["/search/image"]["post"]["responses"]) == {"200", "409", "413", "415", "422"}
    error = paths["/search/text"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()     # offline: no CDN script
    scripts = [u for u in re.findall(r'(?:src|href)="([^"]+)"', docs.text) if u.endswith((".js", ".css"))]
    assert len(scripts) == 2 and all(client.get(u).status_code == 200 for u in scripts), scripts
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and 'id="drop"' in page.text
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_serve_warns_when_listening_beyond_this_machine(built, monkeypatch, capsys):
    import uvicorn

    from fnemm.search.service import serve
    calls = []

    def run(self, sockets):
        calls.append((self.config.app, [s.getsockname() for s in sockets]))
        for s in sockets:
            s.close()
    monkeypatch.setattr(uvicorn.Server, "run", run)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="listening on")          # no such warning on 127.0.0.1
        serve(built[1]["FNE-MH"], host="127.0.0.1", port=0, quiet=True)
    printed = capsys.readouterr()
    port = calls[0][1][0][1]
    assert port > 0 and f"http://127.0.0.1:{port}/" in printed.out     # port 0: the real one is printed
    with pytest.warns(UserWarning, match="listening on 0.0.0.0: whoever reaches port") as said:
        serve(built[1]["FNE-MH"], host="0.0.0.0", port=0, quiet=True)
    assert f"port {calls[1][1][0][1]} can search" in str(said[0].message)
    assert calls[1][1][0][0] == "0.0.0.0"
    assert TestClient(calls[1][0]).get("/healthz").json()["images"] == 30


# --- every route maps the gallery's errors, and nothing leaks ------------------------------

class Raising:
    """A gallery whose every query raises ``error``: what each route answers then."""

    def __init__(self, error):
        self.error, self.captions, self.manifest = error, [], {}

    def __len__(self):
        return 0

    def raise_(self, *args, **kwargs):
        raise self.error

    text = image = similar = thumbnail = info = raise_


@pytest.mark.parametrize("error", [FnemmError("bad k"), NotFound("no such thing"), Conflict("no captions here"),
                                   TooLarge("too many pixels"), NotAnImage("not a photo")])
def test_every_route_answers_the_gallerys_errors_as_json(built, error, caplog):
    from fnemm.search.service import get_gallery
    app = create_app(Gallery.from_index(built[1]["FNE-MH"], encoder=False))
    app.dependency_overrides[get_gallery] = lambda: Raising(error)
    client = TestClient(app, raise_server_exceptions=False)
    photo = {"file": ("p.jpg", photo_bytes(), "image/jpeg")}
    calls = {"text": lambda: client.post("/search/text", json={"query": "a dog"}),
             "image": lambda: client.post("/search/image", files=photo),
             "similar": lambda: client.post("/search/similar", data={"image": "x.jpg"}),
             "thumbnail": lambda: client.get("/images/x.jpg"),
             "healthz": lambda: client.get("/healthz")}
    with caplog.at_level(logging.WARNING):
        for route, call in calls.items():
            r = call()
            assert r.status_code == error.status and r.json() == {"error": str(error)}, (route, r.text)
    assert not [rec for rec in caplog.records if rec.exc_info], "a user error logged a traceback"


def test_a_bug_is_a_500_whose_traceback_reaches_the_applications_logging(built, caplog):
    """Not a user error: a one-line 500 to the client, and the traceback logged where an
    application's own logging setup (the root logger: here pytest's) sees it."""
    from fnemm.search.service import get_gallery
    app = create_app(Gallery.from_index(built[1]["FNE-MH"], encoder=False))
    app.dependency_overrides[get_gallery] = lambda: Raising(RuntimeError("a bug"))
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.WARNING):
        r = client.post("/search/text", json={"query": "a dog"})
    assert r.status_code == 500 and "Traceback" not in r.text and "a bug" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info and rec.name == "fnemm.search.service"]
    assert logged and "a bug" in str(logged[0].exc_info[1])


def test_similar_images_surrogates_urls_and_no_paths_in_answers(client, built):
    gallery = Gallery.from_index(built[1]["FNE-MH"], encoder=False)
    image_id = gallery.image_ids[2]
    r = client.post("/search/similar", data={"image": image_id, "k": "4"})
    assert r.status_code == 200
    hits = r.json()["results"]
    assert hits[0]["image"] == image_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)   # itself first
    emb = gallery.images.vectors
    row = gallery.image_ids.index(image_id)
    order = np.argsort(-(emb @ emb[row]), kind="stable")[:4]
    assert [h["image"] for h in hits] == [gallery.image_ids[k] for k in order]
    up = client.post("/search/similar", files={"file": (image_id, photo_bytes(image_id), "image/jpeg")},
                     data={"k": "3"})
    assert up.status_code == 200 and up.json()["results"][0]["image"] == image_id
    for data, files, status, message in [({"image": "/etc/passwd"}, None, 404, "no such image in this gallery"),
                                         ({}, None, 422, "send either file"),
                                         ({"image": image_id}, {"file": ("p.jpg", photo_bytes(), "image/jpeg")},
                                          422, "send either file")]:
        r = client.post("/search/similar", data=data, files=files)
        assert r.status_code == status and message in r.json()["error"], r.text
    # a lone surrogate in the query is a 422, not a 500
    r = client.post("/search/text", content=b'{"query": "\\ud800 dog"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid Unicode" in r.json()["error"]
    # answers never name server paths
    images_dir = str(DATA / "flickr8k" / "images")
    for r in (client.get("/images/nope.jpg"), client.post("/search/similar", data={"image": "nope.jpg"})):
        assert r.status_code == 404 and images_dir not in r.text and str(built[1]["FNE-MH"]) not in r.text


def test_result_urls_are_percent_encoded():
    from fnemm.search.gallery import Hit
    from fnemm.search.service import with_urls
    urls = [h["url"] for h in with_urls([Hit(1, 0.5, "a#b?c d.jpg"), Hit(2, 0.4, "dir/x.jpg")])]
    assert urls == ["/images/a%23b%3Fc%20d.jpg", "/images/dir%2Fx.jpg"]


def test_photos_without_captions_index_build_from_a_folder(built, tmp_path, capsys):
    """`index build --images DIR`: photos with no captions, extracted on the way the way the
    model's training store was made (its CNN and statistics), into OUT/features; each photo
    is its own nearest neighbour, a text query finds photos, and photo -> captions says
    there are none."""
    out, _ = built
    photos = tmp_path / "my photos"
    photos.mkdir()
    names = sorted(p.name for p in (DATA / "flickr8k" / "images").iterdir())[:6]
    for name in names:
        shutil.copy(DATA / "flickr8k" / "images" / name, photos / name)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")                 # left out, and said so
    run = str(out / "FNE-MH" / "seed-0")
    index = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", run, "--images", str(photos), "--out", str(index), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "index: " in printed.out
    assert "fnemm: warning: 1 image(s) could not be read and are left out (e.g. broken.jpg" in printed.err
    manifest = json.loads((index / "features" / "manifest.json").read_text())
    trained = json.loads((out / "features" / "manifest.json").read_text())
    assert sorted(manifest["image_ids"]) == names and manifest["cnn"] == trained["cnn"]
    assert np.array_equal(np.load(index / "features" / "stats.npy"), np.load(out / "features" / "stats.npy"))
    gallery = Gallery.from_index(index)
    assert len(gallery) == 6 and gallery.captions == []
    for name in names[:3]:
        assert gallery.similar(str(photos / name), 1)[0].image == name
    assert len(gallery.text("a dog runs on the beach", 3)) == 3
    with pytest.raises(FnemmError, match="no captions"):
        gallery.image(str(photos / names[0]), 3)
    # the broken photo, asked for by id, is named as left out, with why; a folder as a folder
    with pytest.raises(NotFound, match=r"^broken.jpg: left out of this gallery when its features were extracted "
                                       r"\(unreadable: "):
        gallery.similar("broken.jpg", 3, files=False)
    with pytest.raises(NotFound, match="a folder; give one image file"):
        gallery.similar(str(photos), 3)
    # a photo moved into a subfolder is still found by name; once two files there have
    # its name, neither is taken for it (either could be the photo)
    (photos / "a").mkdir()
    shutil.move(photos / names[0], photos / "a" / names[0])
    assert Gallery.from_index(index).image_path(names[0]) == photos / "a" / names[0]
    (photos / "b").mkdir()
    shutil.copy(photos / "a" / names[0], photos / "b" / names[0])
    twice = Gallery.from_index(index)
    assert twice.image_path(names[0]) is None and twice.image_path(names[1]) == photos / names[1]
    with pytest.raises(NotFound, match="not the only file there of that name"):
        twice.thumbnail(names[0], 64)
    shutil.rmtree(photos / "b")
    shutil.move(photos / "a" / names[0], photos / names[0])
    # moved together, they keep working: the features are found beside the index
    shutil.move(tmp_path / "index", tmp_path / "moved")
    assert len(Gallery.from_index(tmp_path / "moved")) == 6
    for argv, message in ((["--features", str(out / "features"), "--images", str(photos)],
                           "must be in its images folder"),            # not where the service finds photos
                          ([], "--features STORE (extracted already), --images DIR")):
        assert main(["index", "build", "--checkpoint", run, "--out", str(tmp_path / "x"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_photos_a_store_lacks_join_its_gallery(built, tmp_path, capsys):
    """`index build --features STORE --images LIST`: the listed photos the store lacks are
    extracted the model's way and join the gallery with their captions; every embedding
    equals the one an index of the store alone, or of those photos alone, gives."""
    out, folders = built
    run, store = str(out / "FNE-MH" / "seed-0"), out / "features"
    held = json.loads((store / "manifest.json").read_text())["image_ids"]
    dataset = load_dataset(SPEC)
    new = [i for i in dataset.image_ids if i not in held][:2]
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{DATA / 'flickr8k' / 'images' / i}\n" for i in [held[0], *new, held[3]]))
    index = tmp_path / "index"
    argv = ["index", "build", "--checkpoint", run, "--features", str(store), "--images", str(listing),
            "--dataset", SPEC, "--out", str(index)]
    assert main([*argv, "--quiet"]) == 0
    assert json.loads((index / "features" / "manifest.json").read_text())["image_ids"] == new
    gallery, alone = Gallery.from_index(index), Gallery.from_index(folders["FNE-MH"])
    assert gallery.image_ids == held + new and len(alone) == len(held)
    # (equal up to float32 rounding: rows embedded in batches of other sizes)
    np.testing.assert_allclose(gallery.images.vectors[:len(held)], alone.images.vectors, rtol=0, atol=1e-6)
    only_new = tmp_path / "new.txt"
    only_new.write_text("".join(f"{DATA / 'flickr8k' / 'images' / i}\n" for i in new))
    assert main(["index", "build", "--checkpoint", run, "--images", str(only_new), "--out", str(tmp_path / "new"),
                 "--quiet"]) == 0
    reference = Gallery.from_index(tmp_path / "new")
    np.testing.assert_allclose(gallery.images.vectors[len(held):],
                               np.asarray(reference.images.vectors)[[reference.image_ids.index(i) for i in new]],
                               rtol=0, atol=1e-6)
    want = sum(len(c) for i, c in zip(dataset.image_ids, dataset.captions) if i in set(held + new))
    assert len(gallery.captions) == want and {i for i, _ in gallery.captions} == set(held + new)
    assert gallery.text(dataset.captions[dataset.image_ids.index(new[0])][0], len(gallery))      # searchable
    capsys.readouterr()
    assert main(argv) == 0 and "index up to date" in capsys.readouterr().out    # the same command: kept
    # the photos are in the store already: nothing extracted, the store's gallery alone
    held_only = tmp_path / "held.txt"
    held_only.write_text(f"{DATA / 'flickr8k' / 'images' / held[1]}\n")
    assert main(["index", "build", "--checkpoint", run, "--features", str(store), "--images", str(held_only),
                 "--out", str(tmp_path / "same"), "--quiet"]) == 0
    assert Gallery.from_index(tmp_path / "same").image_ids == held
    assert not (tmp_path / "same" / "features").exists()
