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
    from fnemm.training.folders import training_summary       # the time line: every run's epochs, summed
    hours = sum(training_summary(p.parent)["seconds"] for p in (out / "runs").rglob("metrics-test.json")) / 3600
    assert f"Time: 10 finished runs took {hours:.1f} hours of training" in report
    from fnemm.io.version import software                     # the code line: which code made the runs
    made = software()["commit"]
    made = f"{made[:7]}{'+modified' if software()['modified'] else ''}" if made else f"fnemm {software()['fnemm']}"
    assert f"\nCode: 10 runs at {made} (run.json's" in report
    assert summary["progress"] == {"full": [6, 6], "curve": [4, 4]}
    assert ("\nFinished: 10 of the grid's 10 runs (24 training images: 6 of 6; the learning curve: 4 of 4).\n"
            in report)
    assert sum(e["training"]["hours"] for e in summary["results"]) == pytest.approx(hours, rel=1e-9)
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

    # --report-only says how far the grid is: a run with epochs but no test metrics is started
    (run / "metrics-test.json").rename(tmp_path / "kept.json")
    assert main(study_args(out, "--train-sizes", "12", "--report-only")) == 0
    assert capsys.readouterr().out.startswith("9 of the grid's 10 runs finished; started, not finished: "
                                              "mobilenet_v2 n24 fne split 1 seed 0 (epoch 2); ")
    assert json.loads((out / "study.json").read_text())["progress"] == {"full": [5, 6], "curve": [4, 4]}
    (tmp_path / "kept.json").rename(run / "metrics-test.json")

    # a finished run trained with another config than the grid gives it (records from another
    # fnemm whose presets changed) is refused by name, not counted in a row it was not trained for
    config = (run / "config.json").read_text()
    changed = json.loads(config)
    changed["stages"][0]["lr"] *= 2
    (run / "config.json").write_text(json.dumps(changed))
    for extra in ([], ["--report-only"]):
        assert main(study_args(out, "--train-sizes", "12", *extra)) == 2
        err = capsys.readouterr().err
        assert f"{run / 'config.json'}: this finished run was trained with another config" in err
        assert "(stages.0.lr)" in err and "choose another --out" in err
    (run / "config.json").write_text(config)
    assert main(study_args(out, "--train-sizes", "12", "--report-only")) == 0

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
    from fnemm_studies.study import Grid
    from fnemm_studies.study_summary import trends
    from fnemm_studies.study_report import trend_lines
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


def test_curve_table_lists_the_curve_variants_once_any_size_has_them():
    """The columns are the variants run below the full size, whichever size has them so
    far (a partial curve shows every variant it has); one run shows no spread."""
    from fnemm_studies.study_report import curve

    def entry(size, variant, rsum, runs=1, std=0.0):
        return {"cnn": "c", "train_images": size, "variant": variant, "rsum_mean": rsum, "runs": runs,
                "rsum_std": std}
    results = [entry(6000, v, 260.0 + k) for k, v in enumerate(("baseline", "fne", "late", "fne+baseline"))]
    results += [entry(4000, "baseline", 231.2), entry(2000, "late", 200.0, runs=2, std=3.25)]
    lines = curve(results, "c").splitlines()
    assert lines[0] == "| training images | baseline | late | FNE - baseline |"
    assert lines[2] == "| 2000 | – | 200.0 ± 3.2 | – |"
    assert lines[3] == "| 4000 | 231.2 (1 run) | – | – |"
    assert lines[4].startswith("| 6000 | 260.0 (1 run) | 262.0 (1 run) |")
    assert curve(results[:4], "c") == ""


def test_training_table_reports_the_median_epoch_and_pairs_per_second(tmp_path):
    """The median epoch's seconds of a run's history (training and validation) and the
    training pairs a second it makes (one pair per training image an epoch)."""
    from fnemm.training.folders import training_summary
    from fnemm_studies.study_report import training
    run = tmp_path / "run"
    run.mkdir()
    times = [10.0, 30.0, 20.0, 100.0]
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"epoch": k + 1, "stage": 1, "loss": 1.0, "val": {"rsum": 10.0 + k}, "time_s": t}) + "\n"
        for k, t in enumerate(times)))
    t = training_summary(run)
    assert t["median_epoch_s"] == 25.0 and t["seconds"] == 160.0 and t["best_epoch"] == 4
    entry = {"cnn": "c", "train_images": 6000, "variant": "fne",
             "training": {"epochs": [4, 4], "best_epoch": [4, 4], "stage_epochs": [[4], [4]],
                          "plateau_epochs": [None, 1], "median_epoch_s": [25.0, 60.0], "hours": 0.1}}
    row = training([entry], "c", 6000).splitlines()[2]
    assert row == "| fne | 4, 4 | 4; 4 | ?, 1 | 4, 4 | 25, 60 | 240, 100 | 0.1 |"


def test_report_names_the_runs_that_ended_still_on_the_loss_plateau():
    """A run whose last epoch was on the plateau hit its epoch limit before it may have
    started learning: the report names it, at any training size; none such, no warning."""
    from fnemm_studies.study_report import unstarted

    def entry(size, variant, ended):
        return {"cnn": "c", "train_images": size, "variant": variant, "training": {"ended_on_plateau": ended}}
    results = [entry(6000, "fne", [False, False]), entry(1000, "baseline", [True, False]),
               entry(1000, "fne", [None]), {"cnn": "c", "train_images": 2000, "variant": "x"},
               entry(1000, "late", [True]), entry(1000, "other-cnn", [True]) | {"cnn": "d"}]
    warning = unstarted(results, "c")
    assert warning.endswith(": baseline at 1000 images (1 of 2 runs); late at 1000 images (1 of 1 runs).")
    assert unstarted(results[:1], "c") == "" and unstarted(results, "e") == ""


def _toy_study(tmp_path, **grid):
    from fnemm.datasets import Dataset
    from fnemm_studies.study import Grid, Study
    ds = Dataset("toy", [f"i{k}.jpg" for k in range(40)], [[f"cap {k}"] for k in range(40)],
                 ["train"] * 30 + ["val"] * 5 + ["test"] * 5)
    return Study(ds, tmp_path, tmp_path / "out", Grid(**grid))


def test_units_come_seed_by_seed_with_the_curve_on_its_own_cnns_and_seeds(tmp_path):
    """Seed 0 of everything (full size, then the curve, largest first) before seed 1; the
    curve only on --curve-cnns and for --curve-seeds seeds."""
    study = _toy_study(tmp_path, cnns=("mobilenet_v2", "efficientnet_lite0"), variants=("baseline", "fne", "fne-late"), splits=1, seeds=3,
                       train_sizes=(10, 20), curve_variants=("baseline", "fne"), curve_cnns=("efficientnet_lite0",), curve_seeds=2)
    order = [(u.seed, u.size, u.cnn, u.variant.name) for u in study.units()]
    full = [(c, v) for c in ("mobilenet_v2", "efficientnet_lite0") for v in ("baseline", "fne", "fne-late")]
    curve = [(size, "efficientnet_lite0", v) for size in (20, 10) for v in ("baseline", "fne")]
    expected = [(s, *rest) for s in range(3) for rest in [(30, c, v) for c, v in full]
                + ([x for x in curve] if s < 2 else [])]
    assert order == expected
    assert len({u.run for u in study.units()}) == len(order)


def test_study_trains_the_papers_presets_with_patience(tmp_path):
    study = _toy_study(tmp_path, cnns=("mobilenet_v2",), variants=("baseline", "fne", "late-center-layer"), splits=1, seeds=1,
                       presets="flickr8k", patience=7)
    units = {u.variant.name: u for u in study.units()}
    preset, config, overrides = study.config(units["baseline"])
    assert preset == "flickr8k/FC7-MH" and config.features == "fc7" and "stages.patience=7" in overrides
    assert [s.patience for s in config.stages] == [7] and config.model.embed_dim == 1024
    preset, config, _ = study.config(units["late-center-layer"])
    assert preset == "flickr8k/FNE-MH" and [s.patience for s in config.stages] == [7, 7]
    assert [s.lr for s in config.stages] == [2e-4, 2e-5]         # the authors' script: a second stage at 2e-5
    from fnemm.io.errors import FnemmError
    with pytest.raises(FnemmError, match="--presets nope"):
        _toy_study(tmp_path, presets="nope")
    with pytest.raises(FnemmError, match="--patience 0"):
        _toy_study(tmp_path, patience=0)


def _ranks(hit_i2t, hit_t2i):
    """Per-query ranks of n images with one caption each: rank 1 where hit, else 20."""
    import numpy as np
    n = len(hit_i2t)
    return {"images": [f"i{k}" for k in range(n)], "i2t": np.where(hit_i2t, 1, 20).tolist(),
            "t2i": np.where(hit_t2i, 1, 20).tolist(), "caption_image": list(range(n))}


def test_one_split_is_compared_by_a_paired_bootstrap_over_its_test_images():
    """On one split the seeds share the test images, so the comparison resamples them: a
    variant right on 30 more of 200 images both ways is +90 rsum (3 recalls x 2 directions
    x 15 points), clearly significant; with no ranks saved it falls back to the seeds."""
    import numpy as np
    from fnemm_studies.study import Grid
    from fnemm_studies.study_summary import summarise
    rng = np.random.default_rng(0)
    base_hits = rng.random((2, 200)) < 0.3
    rows, ranks = {}, {}
    for seed in range(2):
        better = base_hits[seed].copy()
        better[np.flatnonzero(~better)[:30]] = True
        for name, hits in (("baseline", base_hits[seed]), ("fne", better)):
            r = _ranks(hits, hits)
            key = ("cnn", 200, name, 0, seed)
            ranks[key] = r
            rows[key] = {"rsum": 300 * hits.mean() * 2, **{k: 0.0 for k in
                         ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr")}}
    grid = Grid(cnns=("cnn",), variants=("baseline", "fne"), splits=1, seeds=2)
    out = summarise(rows, grid, 200, ranks)["results"]
    fne = next(e for e in out if e["variant"] == "fne")
    c = fne["vs_baseline"]
    assert c["mean"] == pytest.approx(90.0) and c["low"] > 40 and c["p"] < 0.01 and c["n"] == 200
    assert "paired bootstrap over 200 test images" in c["method"] and "seeds resampled" in c["method"]
    low, high = fne["rsum_interval"]
    assert low < fne["rsum_mean"] < high
    no_ranks = summarise(rows, grid, 200, {})["results"]
    assert "over 2 seeds of one split" in next(e for e in no_ranks if e["variant"] == "fne")["vs_baseline"]["method"]


def test_bootstrap_slope_against_a_loop_and_where_curves_cross():
    """The slope of the gap against log2(size), resampled: each draw's slope equals a
    least-squares fit (np.polyfit) of that draw's gaps; a gap that changes sign between
    two sizes is reported as a crossing, interpolated in log size."""
    import numpy as np
    from fnemm_studies.stats import image_draws, rsum_of
    from fnemm_studies.stats import bootstrap_slope, crossings
    rng = np.random.default_rng(1)
    n, sizes = 150, (1000, 2000, 4000)
    paired = {}
    for k, size in enumerate(sizes):
        base = rng.random(n) < 0.4
        mine = rng.random(n) < 0.3 + 0.08 * k           # worse at 1000, better at 4000
        paired[size] = ([_ranks(mine, mine)], [_ranks(base, base)])
    c = bootstrap_slope(paired, draws=300, seed=5)
    w = image_draws(n, 300, 5)
    x = np.log2(sizes)
    loop = [np.polyfit(x, [rsum_of(paired[s][0][0], w[d:d + 1])[0] - rsum_of(paired[s][1][0], w[d:d + 1])[0]
                           for s in sizes], 1)[0] for d in range(300)]
    assert c.low == pytest.approx(np.quantile(loop, 0.025)) and c.high == pytest.approx(np.quantile(loop, 0.975))
    point = np.polyfit(x, [rsum_of(paired[s][0][0])[0] - rsum_of(paired[s][1][0])[0] for s in sizes], 1)[0]
    assert c.mean == pytest.approx(point) and c.n == n
    assert crossings({1000: -20.0, 2000: -10.0, 4000: 10.0}) == [pytest.approx((2000 * 4000) ** 0.5)]   # halfway in log
    assert crossings({1000: -20.0, 2000: -10.0, 4000: -1.0}) == []
    assert crossings({1000: 5.0, 2000: -5.0, 4000: 5.0}) == [pytest.approx((1000 * 2000) ** 0.5),
                                                             pytest.approx((2000 * 4000) ** 0.5)]


@pytest.mark.skipif(not (DATA / "flickr8k" / "images-224").is_dir(), reason="bundled Flickr8K images-224 not present")
def test_the_flickr8k_benchmark_command_on_a_few_images(tmp_path, capsys):
    """The reproduction command of the paper's benchmark (README: The paper's Flickr8K
    benchmark) on 30 of its images: paper presets with patience, one split, two seeds,
    a learning-curve point; statistics by the paired bootstrap; ranks kept per run."""
    out = tmp_path / "f8k"
    args = ["study", "--quick", "--dataset", "flickr8k-224", "--out", str(out), "--max-images", "30",
            "--presets", "flickr8k", "--patience", "1", "--epochs", "2", "--splits", "1", "--seeds", "2",
            "--variants", "baseline,fne", "--train-sizes", "9", "--curve-seeds", "1", "--quiet"]
    assert main(args) == 0
    runs = sorted(p.parent.relative_to(out / "runs") for p in (out / "runs").rglob("metrics-test.json"))
    assert len(runs) == 2 * 2 + 2
    fne = out / "runs" / "mobilenet_v2" / "n18" / "fne" / "split-0" / "seed-1"
    config = json.loads((fne / "config.json").read_text())
    assert [s["lr"] for s in config["stages"]] == [2e-4, 2e-5] and config["model"]["embed_dim"] == 1024
    assert [s["patience"] for s in config["stages"]] == [1, 1] and config["seed"] == 1
    assert json.loads((fne / "run.json").read_text())["preset"] == "flickr8k/FNE-MH"
    assert (fne / "ranks-test.jsonl").read_text().count('"query": "image"') == 6
    summary = json.loads((out / "study.json").read_text())
    entry = next(e for e in summary["results"] if e["variant"] == "fne" and e["train_images"] == 18)
    assert entry["runs"] == 2 and "paired bootstrap over 6 test images" in entry["vs_baseline"]["method"]
    assert len(entry["training"]["epochs"]) == 2 and all(1 <= e <= 4 for e in entry["training"]["epochs"])
    report = (out / "study.md").read_text()
    assert "flickr8k/FNE-MH pipeline (the baseline flickr8k/FC7-MH)" in report and "stopped after 1 epoch without" in report
    assert "*paper FNE-MH (VGG16)* | – | 27.3 | 56.8 | 69.3 | 4 |" in report and "### Learning curve" in report
    # evaluate prints the protocol (images and captions) and the chance level of that test set
    capsys.readouterr()
    info = json.loads((fne / "run.json").read_text())
    assert main(["evaluate", "--checkpoint", str(fne), "--dataset", info["args"]["dataset"][0],
                 "--features", info["args"]["features"], "--output", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "test [all: 6 images, 30 captions] " in printed and "chance on 6 images x 5 captions" in printed
    # the grid is fixed: the same --out with other presets is refused
    assert main([*args[:-1], "--presets", "demo"]) == 2
    assert "another presets/patience" in capsys.readouterr().err
    assert main([*args[:-1], "--presets", "demo", "--report-only"]) == 2       # nor reported as another grid
    assert "another presets/patience" in capsys.readouterr().err
    # a worker given part of the grid (one seed) leaves study.json saying which part its results are
    assert main([*args[:args.index("--seeds") + 1], "1", *args[args.index("--seeds") + 2:]]) == 0
    assert json.loads((out / "study.json").read_text())["grid"]["seeds"] == 1
    # its records (no weights) copied out redraw the same report on their own
    records = tmp_path / "records"
    assert main([*args, "--report-only", "--export", str(records)]) == 0
    assert "6 runs' records -> " in capsys.readouterr().out
    assert not list(records.rglob("*.pt")) and not (records / "features").exists()
    assert len(list(records.rglob("ranks-test.jsonl"))) == 6
    assert main([*args[:args.index("--out")], "--out", str(records), *args[args.index("--out") + 2:],
                 "--report-only"]) == 0
    again = json.loads((records / "study.json").read_text())
    assert again["results"] == json.loads((out / "study.json").read_text())["results"]
    assert main(["study", "--out", str(records), "--export", str(tmp_path / "x")]) == 2
    assert "give it with --report-only" in capsys.readouterr().err
    # on a new machine: the records carried into a fresh --out, a third seed asked for; only what is
    # left trains (the third seed, and a run begun there before, which carrying leaves as it is)
    fresh = tmp_path / "fresh"
    begun = fresh / "runs" / "mobilenet_v2" / "n18" / "baseline" / "split-0" / "seed-0"
    begun.mkdir(parents=True)
    seeds = args.index("--seeds") + 1
    third = [*args[:args.index("--out") + 1], str(fresh), *args[args.index("--out") + 2:seeds], "3", *args[seeds + 1:]]
    assert main([*third, "--carry", str(records)]) == 0
    assert "5 finished runs' records carried from" in capsys.readouterr().out
    carried = [p for p in (records / "runs").rglob("metrics-test.json") if "n18/baseline/split-0/seed-0" not in str(p)]
    assert all((fresh / p.relative_to(records)).read_bytes() == p.read_bytes() for p in carried)
    assert all(not (fresh / p.relative_to(records)).with_name("best.pt").exists() for p in carried)   # not retrained
    assert (begun / "best.pt").exists() and (begun / "metrics-test.json").exists()
    assert json.loads((fresh / "study.json").read_text())["progress"]["full"] == [6, 6]
    assert main([*third, "--carry", str(records)]) == 0 and "0 finished runs' records carried" in capsys.readouterr().out
    (fresh / "runs" / "mobilenet_v2" / "n18" / "fne" / "split-0" / ".seed-0.carrying-1").mkdir()   # a killed carry's
    (fresh / "runs" / "mobilenet_v2" / "n18" / "fne" / "split-0" / ".seed-0.carrying-1" / "metrics-test.json").write_text("{}")
    assert main([*third, "--report-only", "--export", str(tmp_path / "again")]) == 0
    assert "8 runs' records -> " in capsys.readouterr().out
    assert main(["study", "--out", str(fresh), "--carry", str(tmp_path / "nothing")]) == 2
    assert "no runs/ folder here" in capsys.readouterr().err
    # a record that is not the file the export's manifest names is refused by name, and nothing is carried
    import shutil
    shutil.copytree(records, tmp_path / "edited")
    edited = sorted((tmp_path / "edited" / "runs").rglob("metrics-test.json"))[2]
    edited.write_text(edited.read_text().replace("rsum", "rsum ", 1))
    edited.with_name("ranks-test.jsonl").rename(tmp_path / "ranks")        # and, first, one missing there
    elsewhere = [*args[:args.index("--out") + 1], str(tmp_path / "elsewhere"), *args[args.index("--out") + 2:]]
    assert main([*elsewhere, "--carry", str(tmp_path / "edited")]) == 2
    err = capsys.readouterr().err
    assert "ranks-test.jsonl: missing, though " in err and "records.json lists it; restore the records" in err
    (tmp_path / "ranks").rename(edited.with_name("ranks-test.jsonl"))
    assert main([*elsewhere, "--carry", str(tmp_path / "edited")]) == 2
    assert f"{edited}: not the file {tmp_path / 'edited' / 'records.json'} names (its sha256 differs)" in \
        capsys.readouterr().err
    assert not (tmp_path / "elsewhere" / "runs").exists()
    (tmp_path / "edited" / "records.json").unlink()
    assert main([*elsewhere, "--carry", str(tmp_path / "edited")]) == 2
    assert "no records.json (the sha256 of each record, which --export writes)" in capsys.readouterr().err
    # records of another schedule (here 3 epochs, not 2) are not carried into a grid they were not trained for
    other = [*args[:args.index("--out") + 1], str(tmp_path / "other"), *args[args.index("--out") + 2:]]
    other[other.index("--epochs") + 1] = "3"
    assert main([*other, "--carry", str(records), "--report-only"]) == 2       # and, nothing there, no report
    said = capsys.readouterr()
    assert "0 finished runs' records carried" in said.out and "6 left there, trained with another config" in said.out
    assert "no study here (no study.json, no runs/) to report" in said.err
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(not (DATA / "flickr8k" / "images-224").is_dir(), reason="bundled Flickr8K images-224 not present")
def test_the_committed_benchmark_records_redraw_the_committed_report(tmp_path, capsys):
    """README: the records under results/flickr8k-224 (no weights) are in the repository and
    redraw its study.md and study.json exactly (they were once ignored by git, silently)."""
    import shutil
    from pathlib import Path
    committed = Path(__file__).resolve().parents[1] / "results" / "flickr8k-224"
    tracked = subprocess.run(["git", "ls-files", "--", "results/flickr8k-224/runs"], cwd=committed.parents[1],
                             capture_output=True, text=True)
    if tracked.returncode == 0:             # a git checkout (not an sdist): the records are tracked files
        assert len([f for f in tracked.stdout.splitlines() if f.endswith("metrics-test.json")]) == \
               len(list((committed / "runs").rglob("metrics-test.json"))) > 0, \
               "results/flickr8k-224/runs holds records git does not track: `git add results` after an export"
    out = tmp_path / "records"
    shutil.copytree(committed, out)
    grid = json.loads((committed / "study.json").read_text())["grid"]
    assert main(["study", "--dataset", "flickr8k-224", "--presets", grid["presets"], "--patience",
                 str(grid["patience"]), "--splits", str(grid["splits"]), "--seeds", str(grid["seeds"]),
                 "--cnns", ",".join(grid["cnns"]), "--variants", ",".join(grid["variants"]),
                 "--train-sizes", ",".join(map(str, grid["train_sizes"])),
                 "--curve-variants", ",".join(grid["curve_variants"]), "--curve-cnns", ",".join(grid["curve_cnns"]),
                 "--curve-seeds", str(grid["curve_seeds"]), "--out", str(out), "--report-only", "--quiet"]) == 0
    assert (out / "study.md").read_text() == (committed / "study.md").read_text()
    assert json.loads((out / "study.json").read_text()) == json.loads((committed / "study.json").read_text())
    # and its manifest names every record as it is (what --carry checks on a new machine)
    from fnemm_studies.records import read_manifest, write_manifest
    assert write_manifest(out) == read_manifest(committed), \
        "results/flickr8k-224/records.json does not name the records there: export them again (make flickr8k-export)"


def test_the_readme_benchmark_tables_are_the_committed_records(monkeypatch):
    """README's tables of the Flickr8K benchmark are drawn from results/flickr8k-224/study.json
    (which the test above ties to the records): a hand edit or a forgotten redraw fails here."""
    from pathlib import Path
    from fnemm_studies.readme_table import main as redraw
    monkeypatch.chdir(Path(__file__).resolve().parents[1])     # the README names the folder from the root
    assert redraw(["results/flickr8k-224", "README.md", "--check"]) == 0, \
        "README's benchmark tables are stale: python -m fnemm_studies.readme_table results/flickr8k-224 README.md"


def test_readme_tables_show_spread_bold_significance_and_the_papers_rows(tmp_path, capsys):
    from fnemm_studies.readme_table import main as redraw, markers, tables

    def entry(variant, runs, std, **vs):
        e = {"cnn": "mobilenet_v2", "train_images": 6000, "variant": variant, "runs": runs, "rsum_mean": 250.04,
             "rsum_std": std, "rsum_interval": [240.0, 260.0], "i2t_r1": 20.0, "i2t_r5": 50.0, "i2t_r10": 60.0,
             "t2i_r1": 15.0, "t2i_r5": 40.0, "t2i_r10": 50.0,
             "training": {"stage_epochs": [[60, 14], [50, 9]], "best_epoch": [64, 55]}}
        for other, (mean, p) in vs.items():
            e[f"vs_{other}"] = {"mean": mean, "low": mean - 5, "high": mean + 5, "p": p, "n": 1000, "method": "m"}
        return e
    summary = {"grid": {"cnns": ["efficientnet_lite0", "mobilenet_v2"], "presets": "flickr8k"},
               "full_train_images": 6000,
               "results": [entry("baseline", 1, 0.0, fne=(-3.0, 0.2)),
                           entry("fne", 3, 4.25, baseline=(3.0, 0.2)),
                           entry("late", 3, 1.0, baseline=(20.0, 0.0004), fne=(17.0, 0.01)),
                           {**entry("fne", 1, 0.0), "train_images": 1000}],
               "trends": [{"cnn": "mobilenet_v2", "variant": "fne", "gap": {"1000": -5.0, "6000": 3.0},
                           "per_doubling": {"mean": 3.1, "low": 1.0, "high": 5.0, "p": 0.01, "n": 1000, "method": "m"},
                           "crossings": [3000.0]}]}
    drawn = tables(summary, {"late": "late layers"})
    full, rest = drawn.split("\n\n", 1)
    lines = full.splitlines()
    assert lines[0].startswith("| MobileNetV2, 6,000 training images | runs |") and len(lines) == 7
    assert rest.splitlines() == ["Learning curve, MobileNetV2 (test rsum by training images):", "",
                                 "| training images | fne | FNE - baseline |", "|---:|---:|---:|",
                                 "| 1000 | 250.0 (1 run) | – |", "| 6000 | 250.0 ± 4.2 | +3.0 [-2.0, +8.0], p=0.200 |",
                                 "", "- fne - baseline: -5.0 -> +3.0 rsum at 1000, 6000 training images; +3.1 [+1.0, "
                                 "+5.0], p=0.010 per doubling (m); the curves cross near 3,000 training images."]
    assert lines[2] == ("| `baseline` (FC7-MH) | 1 | 250.0 [240.0, 260.0] | 20.0 / 50.0 / 60.0 | 15.0 / 40.0 / 50.0 "
                        "| 60 + 14 (64), 50 + 9 (55) | – | -3.0 [-8.0, +2.0], p=0.200 |")
    assert "| 3 | 250.0 ± 4.2 [240.0, 260.0] |" in lines[3] and lines[3].endswith("| +3.0 [-2.0, +8.0], p=0.200 | – |")
    assert lines[4].startswith("| `late`: late layers | 3 |")
    assert lines[4].endswith("| **+20.0 [+15.0, +25.0], p<0.001** | **+17.0 [+12.0, +22.0], p=0.010** |")
    assert lines[5] == "| *paper, VGG16 FC7-MH* |  | 253.1 | 23.0 / 49.0 / 63.3 | 18.5 / 43.2 / 56.1 |  |  |  |"
    assert lines[6].endswith("|  | +28.3 |  |")
    with_progress = tables({**summary, "progress": {"full": [3, 8], "curve": [1, 6]}}, {})
    assert with_progress.startswith("Finished: 4 of the grid's 14 runs (6,000 training images: 3 of 8; "
                                    "the learning curve: 1 of 6).\n\n| MobileNetV2, 6,000 training images |")
    timed = [{**e, "training": {**e["training"], "epochs": [74, 59], "hours": 3.25}} for e in summary["results"][:2]]
    assert tables({**summary, "results": timed + summary["results"][2:]}, {}).startswith(
        "Time: 4 finished runs took 6.5 hours of training (every epoch with its validation; feature extraction and "
        "testing not included).\n\n| MobileNetV2")
    coded = [{**timed[0], "training": {**timed[0]["training"], "code": [None, ["abc1234"]]}},
             {**timed[1], "training": {**timed[1]["training"], "code": [["abc1234"], ["abc1234", "def5678+modified"]]}}]
    assert tables({**summary, "results": coded + summary["results"][2:]}, {}).split("\n\n")[1] == (
        "Code: 2 runs at abc1234; 1 run at abc1234 then def5678+modified; 1 made before runs recorded it "
        "(run.json's \"software\": commit, and each resumption's).")

    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(summary))
    begin, end = markers(str(folder))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{begin}\nold numbers\n{end}\nafter\n")
    assert redraw([str(folder), str(readme), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err and "old numbers" in readme.read_text()
    assert redraw([str(folder), str(readme)]) == 0
    text = readme.read_text()
    from fnemm_studies.study import BY_NAME                  # the command describes the variants as the study does
    assert text == f"intro\n{begin}\n{tables(summary, {n: v.about for n, v in BY_NAME.items()})}\n{end}\nafter\n"
    assert redraw([str(folder), str(readme), "--check"]) == 0
    readme.write_text(f"intro\n{end}\n{begin}\n")             # markers out of order: one line, nothing written
    assert redraw([str(folder), str(readme)]) == 2
    assert "expected one pair of marker lines" in capsys.readouterr().err
    assert readme.read_text() == f"intro\n{end}\n{begin}\n"
    assert redraw([str(tmp_path / "nowhere"), str(readme)]) == 2
    assert "export the study first" in capsys.readouterr().err


def test_the_studys_feature_extraction_writes_progress_lines_to_a_log(tmp_path, capsys, monkeypatch):
    """The base store is the study's longest single stage (50 min for the benchmark's
    8,000 photos on 2 cores): in a log it says how far it is, like every long loop."""
    monkeypatch.setenv("FNEMM_PROGRESS_EVERY", "0")          # a line every tenth, however quick
    out = tmp_path / "study"
    args = ["study", "--quick", "--dataset", SPEC, "--images", str(DATA / "flickr8k" / "images"),
            "--out", str(out), "--max-images", "20", "--epochs", "1", "--splits", "1", "--seeds", "1",
            "--variants", "baseline,fne"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("extract: ")]
    assert lines and lines[-1].startswith("extract: 20/20 img (100%)"), printed


def test_workers_started_together_extract_different_cnns_side_by_side(tmp_path, monkeypatch, capsys):
    """A worker finding a CNN's store being extracted by another extracts the next CNN
    meanwhile, then waits for the first (it used to wait at once, a core idle for the
    length of an extraction). The forward pass is faked: the order is what is tested."""
    from fnemm_studies import study as study_module
    from fnemm_studies.study import Grid, Study
    out = tmp_path / "grid"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "features" / "mobilenet_v2" / "base"), "exit"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"           # another worker is extracting mobilenet_v2
    order = []

    def fake_extract(images, base, dataset, config, quiet=False):
        order.append(config.cnn)
        (base / "manifest.json").write_text("{}")
        if config.cnn == "efficientnet_lite0":          # done with it: the other worker finishes mobilenet_v2
            holder.communicate("go\n")
    monkeypatch.setattr(study_module, "extract", fake_extract)
    grid = Study(load_dataset(SPEC), tmp_path, out, Grid(cnns=("mobilenet_v2", "efficientnet_lite0"), splits=1, seeds=1))
    import threading
    worker = threading.Thread(target=grid.base_stores)
    worker.start()
    worker.join(timeout=300)         # returns at once when it works; bounds a regression that waits at once
    if holder.returncode is None:
        holder.communicate("go\n")
    worker.join()
    assert order == ["efficientnet_lite0", "mobilenet_v2"] and holder.returncode == 0
    assert "mobilenet_v2: another worker is extracting it; the next CNN meanwhile" in capsys.readouterr().out


def test_a_misspelt_cnn_or_curve_variant_is_refused_before_anything_is_written(tmp_path, capsys):
    """--cnns resnet failed only at extraction, after study.json was written, and a curve
    variant that does not exist left the curve without it, silently. A curve CNN the grid
    does not train (a worker given part of a grid) is said, not refused."""
    for extra, message in [(["--cnns", "resnet"], "--cnns resnet: unknown CNN; choose from "),
                           (["--curve-variants", "baseline,fne,late-centre-layer", "--train-sizes", "100"],
                            "--curve-variants late-centre-layer: unknown; choose from "),
                           (["--curve-cnns", "mobilenet", "--train-sizes", "100"], "--curve-cnns mobilenet: unknown CNN")]:
        assert main(["study", "--dataset", SPEC, "--out", str(tmp_path / "s"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "s").exists()
    (tmp_path / "part" / "runs").mkdir(parents=True)          # a study begun there (--report-only needs one)
    assert main(["study", "--dataset", SPEC, "--out", str(tmp_path / "part"), "--cnns", "mobilenet_v2",
                 "--curve-cnns", "efficientnet_lite0", "--train-sizes", "100", "--report-only"]) == 0
    assert "learning curve: efficientnet_lite0 not in --cnns: this grid trains no curve run of it" in \
        capsys.readouterr().out
