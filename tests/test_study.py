"""`fnemm study` end to end on a few bundled photos: the grid, its resumable runs, the
paired statistics and report, re-splits, the learning curve and shared work."""

import json
import subprocess
import sys

import pytest

from conftest import DATA
from fnemm.cli import main
from fnemm.datasets import load_dataset
from test_locks import HOLD

pytestmark = pytest.mark.skipif(not (DATA / "flickr8k" / "images").is_dir(),
                                reason="../shared/data (bundled Flickr8K photos) not present")
SPEC = f"flickr8k-1k={DATA / 'flickr8k'}"


def study_args(out, *extra):
    return ["study", "--quick", "--dataset", SPEC, "--images", str(DATA / "flickr8k" / "images"),
            "--out", str(out), "--max-images", "40", "--epochs", "2", "--quiet", *extra]


def test_quick_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    # another worker (process) holds one run: this one leaves it and does the rest
    busy = out / "runs" / "mobilenet_v2" / "n24" / "fne-late" / "split-1" / "seed-0"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(busy), "exit"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert main(study_args(out, "--train-sizes", "12")) == 0
    holder.communicate("go\n")
    assert not (busy / "metrics-test.json").exists()
    done = sorted(p.parent.relative_to(out / "runs") for p in (out / "runs").rglob("metrics-test.json"))
    # 3 variants x 2 splits at 24 training images (one left to the other worker),
    # baseline and fne x 2 splits at 12
    assert len(done) == 5 + 4
    assert main(study_args(out, "--train-sizes", "12")) == 0      # now it does the one left
    assert (busy / "metrics-test.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("best.pt")}
    assert main(study_args(out, "--train-sizes", "12")) == 0      # all done: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    capsys.readouterr()

    report = (out / "study.md").read_text()
    assert "## mobilenet_v2" in report and "paired t-test over splits" in report
    rows = [line for line in report.splitlines() if line.startswith("| fne") or line.startswith("| baseline")]
    assert [r.split("|")[1].strip() for r in rows[:3]] == ["baseline", "fne", "fne-late"]
    assert ("p=0." in rows[1] or "p<0.001" in rows[1]) and "### Learning curve" in report and "| 12 |" in report
    assert (out / "study.png").stat().st_size > 1000
    summary = json.loads((out / "study.json").read_text())
    fne = next(e for e in summary["results"] if e["variant"] == "fne" and e["train_images"] == 24)
    assert fne["runs"] == 2 and fne["vs_baseline"]["n"] == 2 and "over 2 splits" in fne["vs_baseline"]["method"]

    # each run is an ordinary run folder: the CLI evaluates it to the same numbers
    run = out / "runs" / "mobilenet_v2" / "n24" / "fne" / "split-1" / "seed-0"
    info = json.loads((run / "run.json").read_text())
    saved = json.loads((run / "metrics-test.json").read_text())["results"]
    assert main(["evaluate", "--checkpoint", str(run), "--dataset", info["args"]["dataset"][0],
                 "--features", info["args"]["features"], "--json", "--output", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed.keys() == saved.keys() == {"all"}
    assert printed["all"] == {k: round(v, 4) for k, v in saved["all"].items()}

    # split 1 holds the same images as split 0, split differently, with the same sizes
    s0, s1 = (load_dataset(out / "splits" / f"split-{k}.jsonl") for k in (0, 1))
    assert s0.image_ids == s1.image_ids and s0.counts() == s1.counts() and s0.splits != s1.splits
    assert load_dataset(out / "splits" / "split-1-train12.jsonl").counts()["train"] == 12


def test_study_refuses_bad_grids(tmp_path, capsys):
    for extra, message in [(["--variants", "fne,fne-late"], "must include baseline and fne"),
                           (["--variants", "baseline,fne,nope"], "unknown"),
                           (["--train-sizes", "500"], "fewer than the 24 training images")]:
        assert main(study_args(tmp_path / "s", *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("fnemm: error:") and message in err, err
    assert main(["study", "--list"]) == 0
    assert "fne-pca256" in capsys.readouterr().out


def test_learning_curve_trend_against_a_hand_computed_slope():
    """The gap to the baseline grows by 10 rsum per doubling of the training images on
    every split (plus split noise that a per-split slope removes): the trend says +10,
    significant, and where a linear-in-log extrapolation would close the gap."""
    from fnemm.study import Grid, trends
    from fnemm.study_report import trend_lines
    grid = Grid(cnns=("cnn",), variants=("baseline", "fne"), splits=4, seeds=2)
    rows = {}
    for split in range(4):
        for seed in range(2):
            for size, gap in ((200, -40.0), (400, -30.0), (800, -20.0)):
                base = 200 + 7 * split + seed
                rows[("cnn", size, "baseline", split, seed)] = {"rsum": base}
                rows[("cnn", size, "fne", split, seed)] = {"rsum": base + gap + 0.1 * split * (size == 800)}
    (t,) = trends(rows, grid)
    import numpy as np
    xs = np.log2([200, 400, 800])
    slopes = [np.polyfit(xs, [-40.0, -30.0, -20.0 + 0.1 * split], 1)[0] for split in range(4)]
    assert abs(t["per_doubling"]["mean"] - np.mean(slopes)) < 1e-9 and t["per_doubling"]["n"] == 4
    assert t["per_doubling"]["p"] < 0.001 and t["gap"]["800"] == pytest.approx(-20 + 0.1 * 1.5)
    (line,) = trend_lines([t], "cnn")
    assert "-40.0 -> -30.0 -> -19.9 rsum at 200, 400, 800 training images" in line
    assert f"close near {800 * 2 ** (19.85 / np.mean(slopes)):,.0f} training images" in line    # ~3,134
