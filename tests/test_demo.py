"""The demo pipeline end to end on a handful of the bundled Flickr8K photos, and
`fnemm search` / `fnemm report` on what it wrote."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fnemm.cli import main
from fnemm_studies.demo import run_demo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "flickr8k" / "images").is_dir(),
                                reason="../shared/data (bundled Flickr8K photos) not present")


def test_demo_writes_table_plots_and_report(demo):
    out, result = demo
    rows = [line for line in result["table"].splitlines() if line.startswith("| F")]
    assert [r.split("|")[1].strip() for r in rows] == ["FNE-MH", "FC7-MH", "FNE-POE", "FNE-late-MH"]
    report = (out / "report.md").read_text()
    assert "NOT comparable to the paper" in report and "Chance level" in report
    # intervals over the test images, each model against the FC7 baseline, and a verdict
    assert "rsum [95% interval]" in report and "vs FC7-MH: Δ rsum [95%], p" in report
    assert "has the highest mean rsum" in report and "test set's noise" in report
    assert result["verdict"] in report and (out / "FNE-MH" / "seed-0" / "ranks-test.jsonl").exists()
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    for png in ("val_rsum.png", "retrieval.png", "annotation.png"):
        with Image.open(out / png) as img:
            assert img.width > 300 and img.height > 150
    for name in ("FNE-MH", "FC7-MH", "FNE-POE", "FNE-late-MH"):
        metrics = json.loads((out / name / "seed-0" / "metrics-test.json").read_text())
        assert 0 <= next(iter(metrics["results"].values()))["rsum"] <= 600
    # FNE-late-MH: the same images' late layers, centred per layer, derived without a forward pass
    late = json.loads((out / "features-late" / "manifest.json").read_text())
    assert late["recipe"]["layers"] == "late" and late["recipe"]["post"] == "center-layer"
    assert not (out / "features-late" / "raw.npy").exists() and late["image_ids"] == manifest["image_ids"]
    assert manifest["cnn"] == "mobilenet_v2" and manifest["crops"] == 10
    assert len(manifest["image_ids"]) == 30 and manifest["stats"]["images"] == 18


def test_demo_of_one_model_trains_only_it_and_draws_its_examples_from_its_store(demo, tmp_path):
    """run_demo(models=("FNE-late-MH",)): that model alone, its examples drawn with its
    own (late-layer) store, not the base store its image map does not fit."""
    import shutil
    out = tmp_path / "demo"
    shutil.copytree(demo[0] / "features", out / "features")      # the forward pass, reused
    result = run_demo(out, DATA / "flickr8k", models=("FNE-late-MH",), max_images=30, epochs=1, quiet=True)
    assert sorted(p.name for p in out.iterdir() if (p / "seed-0").is_dir()) == ["FNE-late-MH"]
    assert "FNE-late-MH" in result["table"] and (out / "retrieval.png").exists()
    with pytest.raises(Exception, match="demo models"):
        run_demo(out, DATA / "flickr8k", models=("nope",), quiet=True)


def test_demo_rerun_reuses_every_stage(demo):
    out, _ = demo
    best = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-0/best.pt")}
    raw = (out / "features" / "raw.npy").stat().st_mtime_ns
    again = run_demo(out, DATA / "flickr8k", max_images=30, epochs=2, quiet=True)
    assert (out / "features" / "raw.npy").stat().st_mtime_ns == raw
    assert {p: p.stat().st_mtime_ns for p in best} == best
    assert again["table"] == demo[1]["table"]


def test_search_text_and_image(demo, capsys):
    out, _ = demo
    common = ["--checkpoint", str(out / "FNE-MH" / "seed-0"), "--features", str(out / "features"),
              "--dataset", f"flickr8k-1k={DATA / 'flickr8k'}", "--split", "test"]
    assert main(["search", *common, "--text", "a dog runs on the beach", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(len(h["captions"]) == 5 and Path(h["path"]).is_file() for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    test_ids = set(json.loads((out / "features" / "manifest.json").read_text())["image_ids"])
    assert all(h["image"] in test_ids for h in hits)
    # a photo from outside the gallery goes through the same CNN + statistics
    assert main(["search", *common, "--image", str(DATA / "reference-images" / "cat.bmp"), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # query, then per hit: rank, score, image and its caption in quotes; then the image's path
    assert lines[0].startswith("query:") and len(lines) == 5
    assert lines[1].split()[0] == "1" and lines[1].count('"') == 2 and lines[2].strip().endswith(".jpg")
    assert Path(lines[2].strip()).is_file()
    # text queries show each image's first caption and how many more, and warn of unknown words
    assert main(["search", *common, "--text", "a zzqxv dog", "-k", "2"]) == 0
    printed = capsys.readouterr()
    assert "(+4)" in printed.out and "zzqxv" in printed.err and "vocabulary" in printed.err
    # an image of the store queried as a file or by id embeds identically
    from fnemm.datasets import load_dataset
    from fnemm.search.gallery import Gallery
    gallery = Gallery.from_store(out / "FNE-MH" / "seed-0", out / "features",
                                 load_dataset(f"flickr8k-1k={DATA / 'flickr8k'}"))
    image_id = gallery.image_ids[0]
    by_file = gallery.image_embedding(DATA / "flickr8k" / "images" / image_id)
    by_id = gallery.image_embedding(image_id)
    assert float((by_file * by_id).sum()) > 0.99
    # --split without --dataset: the dataset the run was trained on, as evaluate does
    no_dataset = ["--checkpoint", common[1], "--features", common[3], "--split", "test", "--text", "a dog", "--json"]
    assert main(["search", *no_dataset]) == 0
    printed = capsys.readouterr()
    assert "(the one the checkpoint was trained on)" in printed.err
    assert main(["search", *common, "--text", "a dog", "--json"]) == 0
    assert json.loads(printed.out) == json.loads(capsys.readouterr().out)
    for bad, message in [(["--text", "   "], "text query is empty"), (["--text", "x", "-k", "0"], "k=0: must be between 1 and 100"),
                         (["--image", "nope.jpg"], "no such image file")]:
        assert main(["search", *common, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fnemm: error:") and message in err and "\n" not in err


def test_report_with_the_papers_rows(demo, capsys, tmp_path):
    out, _ = demo
    assert main(["report", str(out / "FNE-MH"), str(out / "FC7-MH"), "--paper", "flickr8k",
                 "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "| FNE-MH | 1 |" in text and "| paper flickr8k FNE-MH | | 27.3 | 56.8 | 69.3 | 4 | – |" in text
    assert "paper flickr8k FC7-MH" in text and "paper flickr8k FNE-POE" not in text    # the rows reported
    assert (tmp_path / "r" / "report.md").exists() and (tmp_path / "r" / "val_rsum.png").exists()
    assert main(["report", str(out / "features")]) == 2
    assert "not evaluated yet" in capsys.readouterr().err
    # two runs of one preset would be two rows called FNE-MH: named, they are two rows
    shutil.copytree(out / "FNE-MH", tmp_path / "again")
    assert main(["report", str(out / "FNE-MH"), str(tmp_path / "again")]) == 2
    assert f"would both be shown as FNE-MH: name them, as in `fnemm report A={out / 'FNE-MH'} B=" in \
        capsys.readouterr().err
    assert main(["report", f"first={out / 'FNE-MH'}", f"again={tmp_path / 'again'}"]) == 0
    assert "| first | 1 |" in capsys.readouterr().out
    assert main(["report", f"first={out / 'FNE-MH'}", f"again={tmp_path / 'again'}", "--baseline", "frist"]) == 2
    assert "--baseline frist: neither the NAME of a run here (first, again) nor a run folder" in capsys.readouterr().err
