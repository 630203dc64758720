"""The damage matrix: every file of a feature store, a run folder and an index folder
truncated, emptied, garbled, made non-UTF-8, valid JSON of the wrong type, cut by a
line, or removed; every command that reads it. Each must end in one `fnemm: error:`
line naming the file (or its folder), or in the right result: the same output as on
the undamaged files, or (for commands that write) the folder repaired. Never a
traceback: an exception other than FnemmError fails the test."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinycnn
from fnemm.cli import main
from test_extract import write_dataset
from test_train import SMALL

BINARY = ["truncated", "emptied", "garbled", "removed", "overwritten"]
JSON = BINARY + ["not-utf8", "wrong-type"]
JSONL = JSON + ["line-removed"]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "overwritten":              # the same size, the header intact: 1/3 of the data replaced
        n = len(data)
        path.write_bytes(data[: n // 3] + bytes(np.full(n // 3, 0x41, np.uint8)) + data[2 * (n // 3):])
    elif how == "garbled":
        path.write_bytes(np.random.default_rng(len(data)).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "removed":
        path.unlink()
    elif how == "middle-garbled":            # a few bytes in the middle of the data, the size the same
        n = len(data)
        path.write_bytes(data[: n // 2] + bytes((b + 1) % 256 for b in data[n // 2:n // 2 + 16]) + data[n // 2 + 16:])
    elif how == "swapped":                   # the twin world's file of the same name
        shutil.copyfile(TWIN[0] / path.relative_to(path.parents[1]), path)
    elif how == "swapped-with-its-record":   # the twin run's checkpoint with the checksums.json naming it
        shutil.copyfile(TWIN[0] / path.relative_to(path.parents[1]), path)
        shutil.copyfile(TWIN[0] / path.parent.name / "checksums.json", path.parent / "checksums.json")
    elif how == "not-utf8":
        path.write_bytes(b"\xff\xfe" + data[2:])
    elif how == "wrong-type":
        path.write_text("[]" if data.lstrip()[:1] == b"{" else "{}")
    elif how == "line-removed":
        lines = data.decode().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]))
    elif how in ("key-removed", "value-mistyped"):       # still valid JSON, one field wrong
        import re
        text = data.decode()
        field = re.compile(r'^(\s*"[^"]+": )(-?\d[\d.eE+-]*|true|false)(,?)$', re.M)
        m = list(field.finditer(text))[-1]               # the last number or flag (a metric, a seed...)
        if how == "key-removed":
            text = text[:m.start()] + text[m.end() + 1:]
            text = re.sub(r",(\s*[}\]])", r"\1", text)           # no comma left before a closing brace
        else:
            text = text[:m.start()] + f'{m.group(1)}"{m.group(2)}"{m.group(3)}' + text[m.end():]
        json.loads(text)
        path.write_text(text)


def build(root: Path, images: bool = True) -> None:
    """A store, a trained run (evaluated) and an index in ``root`` (images and dataset too,
    unless ``images`` is False: they are there already)."""
    if images:
        write_dataset(root, tinycnn.write_images(root / "images", 12), extra=())
    data = root / "data.jsonl"
    assert main(extract_args(root)) == 0
    assert main(["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(data), "--features", str(root / "store"),
                 "--out", str(root / "run"), "--epochs", "2", "--quiet", "--checkpoint-every", "0",
                 *sum((["--set", s] for s in SMALL), [])]) == 0
    assert main(["evaluate", "--checkpoint", str(root / "run"), "--dataset", str(data), "--features",
                 str(root / "store")]) == 0
    assert main(index_args(root)) == 0


def extract_args(root: Path) -> list[str]:
    return ["extract", "--images", str(root / "images"), "--dataset", str(root / "data.jsonl"), "--cnn",
            "tinycnn:build", "--workers", "0", "--quiet", "--out", str(root / "store")]


def index_args(root: Path) -> list[str]:
    return ["index", "build", "--checkpoint", str(root / "run"), "--features", str(root / "store"), "--dataset",
            str(root / "data.jsonl"), "--out", str(root / "index"), "--quiet"]


def commands(root: Path) -> dict[str, list[str]]:
    data, store, run = str(root / "data.jsonl"), str(root / "store"), str(root / "run")
    return {
        "extract": extract_args(root),
        "train": ["train", "--preset", "flickr30k/FNE-MH", "--dataset", data, "--features", store, "--out",
                  str(root / "new-run"), "--epochs", "1", "--quiet", *sum((["--set", s] for s in SMALL), [])],
        "resume": ["train", "--out", run, "--resume", "--quiet"],
        "evaluate": ["evaluate", "--checkpoint", run, "--dataset", data, "--features", store, "--json",
                     "--output", str(root / "m.json")],
        "report": ["report", run],
        "search-text": ["search", "--checkpoint", run, "--features", store, "--text", "picture number 3", "--json"],
        "search-image": ["search", "--checkpoint", run, "--features", store, "--dataset", data, "--image",
                         str(root / "images" / "img004.jpg"), "--json"],
        "index": index_args(root),
        "index-text": ["search", "--index", str(root / "index"), "--text", "picture number 3", "--json"],
        "index-image": ["search", "--index", str(root / "index"), "--image", "img001.jpg", "--json"],
    }


READERS = {  # which commands read each file
    "store/manifest.json": ["extract", "train", "evaluate", "search-text", "search-image", "index"],
    "store/fne.npy": ["extract", "train", "evaluate", "search-text", "index"],
    "store/fc7.npy": ["extract"],
    "store/stats.npy": ["extract", "search-image"],
    "store/raw.npy": ["extract"],
    "run/config.json": ["resume"],
    "run/run.json": ["resume", "report"],
    "run/metrics.jsonl": ["resume", "report"],
    "run/metrics-test.json": ["report"],
    "run/ranks-test.jsonl": ["report"],
    "run/best.pt": ["evaluate", "search-text", "index"],
    "run/last.pt": ["resume"],
    "run/checksums.json": ["resume", "evaluate", "search-text"],
    "index/manifest.json": ["index-text", "index", "index-image"],
    "index/images.npy": ["index-text", "index"],
    "index/images.ids.json": ["index-text", "index"],
    "index/captions.npy": ["index-image", "index"],
    "index/captions.jsonl": ["index-image", "index"],
}
WRITERS = {"extract": "store", "resume": "run", "index": "index"}     # commands that may repair what they read


def kinds(name: str) -> list[str]:
    return JSONL if name.endswith(".jsonl") else JSON if name.endswith(".json") else BINARY


# same-shape damage to a JSON file: a field gone or of another type (report, resume and
# encoding a new image each had a traceback for one)
FIELDS = [("run/metrics-test.json", "key-removed"), ("run/metrics-test.json", "value-mistyped"),
          ("run/config.json", "value-mistyped"), ("run/config.json", "key-removed"),
          ("store/manifest.json", "value-mistyped")]
# same-shape damage to a binary file: garbled in the middle, or the same file swapped in
# from a twin world (other images, the same shapes): only its content says it is not this one's
SAME_SHAPE = [(f, how) for f in READERS if kinds(f) == BINARY for how in ("middle-garbled", "swapped")]
# a checkpoint swapped in with its record, so every hash agrees: the run's id (run.json) says it
# is another run's (the twin's last.pt is refused earlier, for its other vocabulary)
WITH_RECORD = [("run/best.pt", "swapped-with-its-record"), ("run/last.pt", "swapped-with-its-record")]
CASES = [(f, how) for f in READERS for how in kinds(f)] + FIELDS + SAME_SHAPE + WITH_RECORD


TWIN: list[Path] = []          # the twin world's root, once built


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "w"
    build(root)
    twin = tmp_path_factory.mktemp("twin") / "w"     # other photos (another seed), the same shapes
    write_dataset(twin, tinycnn.write_images(twin / "images", 12, seed=7), extra=())
    build(twin, images=False)
    TWIN[:] = [twin]
    return root


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _rebase(text: str, a: Path, b: Path) -> str:
    return text.replace(str(a), str(b))


@pytest.mark.parametrize("file,how", CASES, ids=[f"{f}:{h}" for f, h in CASES])
def test_damaged_file(pristine, tmp_path, capsys, file, how):
    root = tmp_path / "w"
    shutil.copytree(pristine, root, symlinks=True)
    # the copies point at each other, not at the pristine world
    for meta in (root / "run" / "run.json", root / "index" / "manifest.json"):
        meta.write_text(_rebase(meta.read_text(), pristine, root))
    expected = {}
    for name, args in commands(root).items():          # what the undamaged world answers
        if name in READERS[file] and name not in WRITERS:
            code, out, err = run(args, capsys)
            assert code == 0, (name, err)
            expected[name] = out
    shutil.rmtree(root / "new-run", ignore_errors=True)
    damage(root / file, how)
    target = Path(file).name
    for name in READERS[file]:
        code, out, err = run(commands(root)[name], capsys)
        if code == 0:
            if name in WRITERS:                         # it repaired what it writes
                assert_repaired(WRITERS[name], pristine, root, capsys)
            else:                                       # (image paths: the pristine or the copied images)
                same = [o.replace(str(pristine), "<W>").replace(str(root), "<W>") for o in (out, expected[name])]
                if (file, how) == ("run/ranks-test.jsonl", "removed"):     # optional: said, no interval
                    assert "ranks-test.jsonl) are missing: evaluate it again" in out
                    continue
                assert same[0] == same[1], f"{name}: a different answer with {file} {how}"
        else:
            line = err.strip()
            assert code == 2 and line.startswith("fnemm: error:") and "\n" not in line, (name, err)
            assert target in line or str(root / Path(file).parent) in line, (name, line)


def assert_repaired(what: str, pristine: Path, root: Path, capsys) -> None:
    if what == "store":          # what a store serves (raw.npy only feeds a re-assembly, which checks it)
        for f in ("stats.npy", "fne.npy", "fc7.npy"):
            assert (root / "store" / f).read_bytes() == (pristine / "store" / f).read_bytes(), f
    elif what == "index":
        code, out, _ = run(commands(root)["index-text"], capsys)
        ref = run(commands(pristine)["index-text"], capsys)[1]
        assert code == 0 and out.replace(str(root), str(pristine)) == ref
    else:
        assert json.loads((root / "run" / "config.json").read_text()) == \
            json.loads((pristine / "run" / "config.json").read_text())
        assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_image_names_with_newlines_and_line_separators(tmp_path, capsys):
    """Names a line-per-id file cannot hold: extract, train, index and search them."""
    names = tinycnn.write_images(tmp_path / "plain", 12)
    odd = [n.replace("img", "im\ng" if k % 3 == 0 else "im\u2028g" if k % 3 == 1 else "im#g?") for k, n in
           enumerate(names)]
    (tmp_path / "images").mkdir()
    for a, b in zip(names, odd):
        (tmp_path / "plain" / a).rename(tmp_path / "images" / b)
    write_dataset(tmp_path, odd, extra=())
    build(tmp_path, images=False)
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "index"), "--text", "picture number 4", "-k", "12",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert sorted(h["image"] for h in hits) == sorted(odd)
    assert main(["search", "--index", str(tmp_path / "index"), "--image", odd[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["caption"].startswith("picture number")
    # through the service: percent-encoded result URLs fetch the thumbnails of such names
    pytest.importorskip("fastapi")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # starlette's note that it prefers httpx2
        from fastapi.testclient import TestClient

    from fnemm.search.gallery import Gallery
    from fnemm.search.service import create_app
    client = TestClient(create_app(Gallery.from_index(tmp_path / "index")))
    results = client.post("/search/text", json={"query": "picture number 2", "k": 12}).json()["results"]
    odd_hash = next(r for r in results if "#" in r["image"])
    assert "%23" in odd_hash["url"] and "%3F" in odd_hash["url"]
    for r in results:
        thumb = client.get(r["url"], params={"size": 64})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg", r["image"]


def test_a_reassembly_never_reads_a_damaged_raw_npy(pristine, tmp_path, capsys):
    """raw.npy overwritten in place (same size, header intact): a store that is reused is
    fine, but other thresholds must not be computed from those numbers."""
    root = tmp_path / "w"
    shutil.copytree(pristine, root)
    damage(root / "store" / "raw.npy", "overwritten")
    code, out, _ = run([*extract_args(root)[:-1], str(root / "store"), "--thresholds=-1,1"], capsys)
    assert code == 0
    assert (root / "store" / "raw.npy").read_bytes() == (pristine / "store" / "raw.npy").read_bytes()
    assert main([*extract_args(root), "--verify"]) == 0      # and back: re-assembled from the repaired raw
    for f in ("stats.npy", "fne.npy", "fc7.npy"):
        assert (root / "store" / f).read_bytes() == (pristine / "store" / f).read_bytes(), f


def test_an_index_of_a_dataset_naming_none_of_the_stores_images_is_refused(pristine, tmp_path, capsys):
    """Not an image-only index that says 'captions: none (pass --dataset ...)' while one was passed."""
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"image": "elsewhere.jpg", "captions": ["a cat"], "split": "test"}) + "\n")
    code, _, err = run(["index", "build", "--checkpoint", str(pristine / "run"), "--features",
                        str(pristine / "store"), "--dataset", str(other), "--out", str(tmp_path / "i"), "--quiet"],
                       capsys)
    assert code == 2 and "none of its images is in other" in err and err.count("\n") == 1
    assert not (tmp_path / "i" / "manifest.json").exists()


def test_a_run_still_training_is_not_indexed(pristine, tmp_path, capsys):
    """index build refuses a checkpoint whose run is still being trained (the lock of its
    folder is held): its best.pt may still change under the index."""
    import subprocess
    import sys
    from test_locks import HOLD
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(pristine / "run"), "exit"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        code, _, err = run(index_args(pristine)[:-3] + ["--out", str(tmp_path / "i"), "--quiet"], capsys)
        assert code == 2 and "still being trained (pid" in err and err.count("\n") == 1
    finally:
        holder.communicate("go\n")
    code, _, _ = run(index_args(pristine)[:-3] + ["--out", str(tmp_path / "i"), "--quiet"], capsys)
    assert code == 0
