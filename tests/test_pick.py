"""Which run `make serve-flickr8k` / `make serve-photos` serve: the benchmark's best so far
(also while the study still runs), else the demo's best, else one line saying how to make one."""

import json

import pytest

from fnemm.io.errors import FnemmError
from fnemm.training.folders import METRIC_KEYS, metrics_path, save_metrics
from fnemm_studies import pick
from fnemm_studies.pick import best_run, photo_model


def _run(out, cnn, size, variant, seed, rsum, trained=True):
    run = out / "runs" / cnn / f"n{size}" / variant / "split-0" / f"seed-{seed}"
    run.mkdir(parents=True)
    metrics = {k: 0.0 for k in METRIC_KEYS} | {"rsum": rsum}
    save_metrics(metrics_path(run, "test"), "test", run, {"all": metrics})
    (run / "run.json").write_text(json.dumps({"args": {"features": f"/stores/{cnn}-{variant}"}}))
    if trained:
        (run / "best.pt").write_bytes(b"weights")
    return run


def test_the_best_variant_so_far_while_the_study_runs(tmp_path):
    out = tmp_path / "f8k"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"grid": {}}))         # a study in progress: no results yet
    _run(out, "cnn_a", 6000, "baseline", 0, 260.0)
    _run(out, "cnn_a", 6000, "fne", 0, 250.0)
    _run(out, "cnn_a", 6000, "fne", 1, 290.0)                        # fne's mean 270 beats 260
    _run(out, "cnn_a", 1000, "late", 0, 400.0)                       # a smaller training size: not a candidate
    run, store = best_run(out)
    assert run == out / "runs/cnn_a/n6000/fne/split-0/seed-0" and str(store) == "/stores/cnn_a-fne"
    assert photo_model(out, tmp_path / "no-demo") == run


def test_a_finished_study_by_its_summary_and_one_line_without_any_model(tmp_path, capsys):
    out = tmp_path / "f8k"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"grid": {}, "full_train_images": 6000, "results": [
        {"cnn": "cnn_b", "train_images": 6000, "variant": "baseline", "rsum_mean": 300.0}]}))
    _run(out, "cnn_b", 6000, "baseline", 0, 300.0, trained=False)     # seed 0 has no weights: seed 1's
    best = _run(out, "cnn_b", 6000, "baseline", 1, 300.0)
    assert best_run(out)[0] == best
    assert pick.main(["flickr8k", str(out)]) == 0 and capsys.readouterr().out.split()[0] == str(best)
    with pytest.raises(FnemmError, match="run the study"):
        best_run(tmp_path / "none")
    demo = tmp_path / "demo" / "FNE-late-MH" / "seed-0"               # the demo's, when no benchmark run
    demo.mkdir(parents=True)
    (demo / "best.pt").write_bytes(b"weights")
    assert photo_model(tmp_path / "none", tmp_path / "demo") == demo
    assert pick.main(["photos", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make demo" in err and "MODEL_RUN=RUN" in err


def test_the_best_of_every_worker_not_of_the_last_ones_part_of_the_grid(tmp_path):
    """Workers sharing an --out may run parts of one grid (`--cnns cnn_a` here, `--cnns cnn_b`
    there); study.json holds the table of the last to finish, so the pick reads the runs."""
    out = tmp_path / "f8k"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"grid": {}, "full_train_images": 6000, "results": [
        {"cnn": "cnn_a", "train_images": 6000, "variant": "fne", "rsum_mean": 270.0}]}))   # cnn_a's worker, last
    _run(out, "cnn_a", 6000, "fne", 0, 270.0)
    best = _run(out, "cnn_b", 6000, "late", 0, 290.0)
    assert best_run(out)[0] == best


def test_records_without_weights_say_how_to_train_the_run_here(tmp_path, capsys):
    """A grid carried to a new machine by its committed records (README) has no weights."""
    out = tmp_path / "f8k"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"grid": {}}))
    _run(out, "cnn_a", 6000, "baseline", 0, 260.0)
    record = _run(out, "cnn_a", 6000, "fne", 0, 290.0, trained=False)
    assert pick.main(["flickr8k", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only the records" in err and f"delete {record} " in err and "make flickr8k" in err
