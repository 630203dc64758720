"""`fnemm extract --ray`: the forward pass on a Ray cluster started on this machine (2 CPUs:
one CNN actor, decoding fused into it), against the local run, byte for byte."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import DATA

try:
    import ray.data  # noqa: F401
except ImportError:
    if os.environ.get("FNEMM_REQUIRE_RAY") == "1":         # .ci/run: the extra is installed, these must run
        raise
    pytest.skip("Ray is not installed (pip install 'fnemm[ray]')", allow_module_level=True)


def _extract(images, data, out, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "fnemm.cli", "extract", "--images", str(images),
                           "--dataset", str(data), "--out", str(out), "--chunk-size", "6", "--batch-size", "4",
                           "--quiet", "--threads", "1", *extra],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900)


def same_store(a, b):
    """Every file byte for byte; the manifest up to where the photos are (it records that)."""
    files = sorted(p.name for p in a.iterdir() if p.is_file() and p.name != ".lock")
    assert files == sorted(p.name for p in b.iterdir() if p.is_file() and p.name != ".lock")
    for name in files:
        if name == "manifest.json":
            where = ("images_dir", "images_dir_relative")
            ma, mb = (json.loads((s / name).read_text()) for s in (a, b))
            assert {k: v for k, v in ma.items() if k not in where} == {k: v for k, v in mb.items() if k not in where}
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 bundled photos and one damaged file, with captions and splits."""
    from fnemm.datasets import load_dataset
    if not (DATA / "flickr8k" / "images").is_dir():
        pytest.skip("../shared/data (bundled Flickr8K photos and MobileNetV2) not present")
    folder = tmp_path_factory.mktemp("ray")
    dataset = load_dataset(f"flickr8k-1k={DATA / 'flickr8k'}").head(16)
    (folder / "images").mkdir()
    for image in dataset.image_ids:
        shutil.copy(DATA / "flickr8k" / "images" / image, folder / "images" / image)
    (folder / "images" / dataset.image_ids[9]).write_bytes(b"not a jpeg")
    data = dataset.to_jsonl(folder / "data.jsonl")
    local = _extract(folder / "images", data, folder / "local")
    assert local.returncode == 0, local.stderr
    return folder, data


def test_killed_after_a_chunk_the_rerun_does_only_the_missing_ones_and_ends_byte_identical(photos, tmp_path):
    """The driver dies (kill -9) right after committing chunk 0; a re-run with other
    settings is refused; the same command again must not read chunk 0's photos: one of
    them is damaged in between, and the store still ends identical to the local one,
    byte for byte (every chunk, the first before the kill and the rest after, by Ray's
    actor: one test, as each Ray start costs half a minute)."""
    folder, data = photos
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    killed = _extract(images, data, tmp_path / "ray", "--ray", env={"FNEMM_DIE_AT": "chunk-0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = tmp_path / "ray" / ".partial"
    assert (partial / "chunk-00000.json").exists() and not (partial / "chunk-00001.json").exists()
    # other settings on the unfinished folder: refused in one line, before Ray starts
    refused = _extract(images, data, tmp_path / "ray", "--ray", "--crops", "1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("fnemm: error: ") and "crops" in last
    from fnemm.datasets import load_dataset
    first = load_dataset(str(data)).image_ids[0]          # in chunk 0
    (images / first).write_bytes(b"damaged after its chunk was done")
    again = _extract(images, data, tmp_path / "ray", "--ray")
    assert again.returncode == 0, again.stderr
    same_store(folder / "local", tmp_path / "ray")
