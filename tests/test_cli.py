"""The command line: a newcomer's path works, and bad input is one clear line."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fnemm.cli import main

SMALL = ["--set", "model.embed_dim=32", "--set", "model.word_dim=16", "--batch-size", "32"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    # Progress/info lines may come first; the error itself is one line, the last.
    lines = [x for x in err.strip().splitlines() if x.startswith("fnemm: error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_train_then_evaluate(capsys, synth, tmp_path):
    jsonl, npy, ids = synth
    code, out, err = run(capsys, "train", "--preset", "flickr8k/FNE-SH", "--dataset", jsonl,
                         "--features", npy, "--out", tmp_path / "r", "--epochs", "2", "--quiet", *SMALL)
    assert code == 0, err
    assert "best epoch" in out
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model"]["embed_dim"] == 32 and cfg["stages"][0]["loss"] == "sum"
    assert cfg["stages"][0]["max_epochs"] == 2
    code, out, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "r", "--dataset", jsonl,
                         "--features", npy, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert set(res["all"]) >= {"i2t_r1", "t2i_r10", "i2t_medr", "rsum"} and res["all"]["images"] == 90
    assert (tmp_path / "r" / "metrics-test.json").exists()


def test_presets_table(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and len(out.strip().splitlines()) == 2 + 80
    assert "flickr8k/FNE-POE" in out and "sum->max" in out


def test_unknown_preset(capsys, synth, tmp_path):
    jsonl, npy, _ = synth
    code, _, err = run(capsys, "train", "--preset", "flickr8k/FNE-XX", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "unknown preset", "fnemm presets")


def test_broken_caption_line(capsys, synth, tmp_path):
    jsonl, npy, _ = synth
    lines = jsonl.read_text().splitlines()
    lines[4] = lines[4][:-5]
    jsonl.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r")
    assert_one_line_error(code, err, f"{jsonl}:5: invalid JSON")


def test_ids_that_do_not_match(capsys, synth, tmp_path):
    jsonl, npy, ids = synth
    ids.write_text("\n".join(f"other{k}.jpg" for k in range(600)) + "\n")
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r")
    assert_one_line_error(code, err, str(npy), "have no features", "img00000.jpg")


def test_wrong_feature_dim(capsys, synth, tmp_path):
    jsonl, npy, ids = synth
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r", "--epochs", "1", "--quiet", *SMALL)
    assert code == 0, err
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((600, 99), np.float32))
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "r", "--dataset", jsonl,
                       "--features", wide, "--ids", ids)
    assert_one_line_error(code, err, str(wide), "99 dimensions", "trained on 48")


def test_resume_refuses_config_changes_and_missing_checkpoint(capsys, synth, tmp_path):
    jsonl, npy, _ = synth
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r", "--epochs", "1", "--quiet", *SMALL)
    assert code == 0, err
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--resume", "--lr", "1")
    assert_one_line_error(code, err, "--resume continues the saved config")
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "nothing", "--dataset", jsonl,
                       "--features", npy)
    assert_one_line_error(code, err, "no such checkpoint")


def test_bad_override_and_device(capsys, synth, tmp_path):
    jsonl, npy, _ = synth
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r", "--set", "model.embed_dim=wide")
    assert_one_line_error(code, err, "model.embed_dim=wide", "expected int")
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r", "--lr", "nan")
    assert_one_line_error(code, err, "stages.lr=nan", "expected a finite number")
    code, _, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", "--dataset", jsonl,
                       "--features", npy, "--out", tmp_path / "r2", "--device", "tpu", *SMALL)
    assert_one_line_error(code, err, "--device tpu")


def test_a_device_this_machine_lacks_is_one_line_before_any_work(monkeypatch):
    """cuda:N past the last GPU used to pass the check and fail at the first tensor moved
    there (a CUDA traceback after the data loaded); a machine with one GPU is faked here."""
    import torch
    from fnemm.errors import FnemmError
    from fnemm.joint.checkpoint import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:0", "auto")] == ["cpu", "cuda", "cuda:0", "cuda"]
    for device, message in [("cuda:1", "this machine has 1 CUDA device (cuda:0)"), ("cuda:x", "expected cpu, cuda"),
                            ("cuda1", "expected cpu, cuda"), ("mps", "expected cpu, cuda")]:
        with pytest.raises(FnemmError, match=re.escape(f"--device {device}: {message}")):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(FnemmError, match=re.escape("has 2 CUDA devices (cuda:0 to cuda:1)")):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FnemmError, match="no CUDA device is available here"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == "cpu"


def test_help_is_there(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--resume" in out and "examples:" in out


def test_train_seeds_evaluate_and_report_mean_and_std(capsys, synth, tmp_path):
    jsonl, npy, ids = synth
    common = ["--dataset", jsonl, "--features", npy, "--ids", ids]
    code, out, err = run(capsys, "train", "--preset", "flickr30k/FNE-MH", *common, "--out", tmp_path / "s",
                         "--seeds", "2", "--epochs", "2", "--quiet", "--set", "model.embed_dim=32",
                         "--set", "model.word_dim=16")
    assert code == 0, err
    assert "2 seeds: best val rsum" in out
    assert (tmp_path / "s" / "seed-0" / "best.pt").exists() and (tmp_path / "s" / "seed-1" / "best.pt").exists()
    seeds = [json.loads((tmp_path / "s" / f"seed-{k}" / "config.json").read_text())["seed"] for k in range(2)]
    assert seeds == [0, 1]
    code, out, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "s", *common, "--split", "test")
    assert code == 0, err
    assert out.count("(seed-") == 2
    code, out, err = run(capsys, "report", tmp_path / "s")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| FNE-MH"))
    # 10 recall / rank columns and rsum, each mean ± std over the 2 seeds; rsum's 95% interval
    assert row.count("±") == 11 and "| 2 |" in row and row.rstrip(" |").endswith("]")
    assert (tmp_path / "s" / "seed-1" / "ranks-test.jsonl").exists()


def test_stability_study_counts_runs_that_start_training(capsys, tmp_path):
    import synthetic
    from fnemm.features.store import write_store
    jsonl, npy, ids_file = synthetic.write(tmp_path / "d")
    ids = ids_file.read_text().split()
    feats = np.load(npy).astype(np.float32)
    store = write_store(tmp_path / "store", ids, {"fne": feats, "fc7": feats[:, :16].copy()})
    code, out, err = run(capsys, "stability", "--dataset", jsonl, "--features", store, "--out", tmp_path / "st",
                         "--seeds", "2", "--rows", "FNE-MOE-abs", "FC7-MOE-bl", "--epochs", "2", "--quiet",
                         "--set", "model.embed_dim=32", "--set", "model.word_dim=16")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| F")]
    assert [r.split("|")[1].strip() for r in rows] == ["FNE-MOE-abs", "FC7-MOE-bl"]
    assert "| 0.0001 | 0.05 | yes |" in rows[0] and "| 4/5 |" in rows[0]
    saved = json.loads((tmp_path / "st" / "table5.json").read_text())
    for r in saved:
        assert r["threshold"] >= 10
        n_ok = sum(b > r["threshold"] for b in r["best_val_rsum"])
        assert r["success"] == f"{n_ok}/2" and len(r["best_val_rsum"]) == 2
    assert f"val rsum > {saved[0]['threshold']:g})" in out
    cfg = json.loads((tmp_path / "st" / "FNE-MOE-abs" / "seed-1" / "config.json").read_text())
    assert cfg["model"]["similarity"] == "order" and cfg["stages"][0]["loss"] == "max" and cfg["seed"] == 1
    code, _, err = run(capsys, "stability", "--dataset", jsonl, "--features", store, "--out", tmp_path / "x",
                       "--rows", "MOE-XX")
    assert_one_line_error(code, err, "not a Table 5 row")


def test_stability_threshold_is_the_papers_10_scaled_to_the_validation_split():
    """On 1,000 validation images chance rsum is 3.4 +- 0.67 and the paper's 10 is 10 std
    above it; on 113 images chance alone is ~27, so the threshold must rise with it."""
    from fnemm.eval.metrics import chance_rsum
    from fnemm_studies.stability import start_threshold
    mean, std = chance_rsum(1000, draws=20)
    assert mean + 10 * std == pytest.approx(10.0, abs=1.0)       # what the paper's 10 is
    assert start_threshold(1000) == start_threshold(5000) == 10.0
    mean, std = chance_rsum(113, draws=100)
    assert mean > 20 and start_threshold(113) == pytest.approx(mean + 10 * std)
    assert start_threshold(500) > 10


def _progress_lines(seconds_each: float, total: int, every: float | None = None) -> list[str]:
    """The log lines of a loop of ``total`` steps taking ``seconds_each``, on a fake clock."""
    import io
    from tqdm import tqdm
    from fnemm.io.progress import Lines
    now, file = [0.0], io.StringIO()
    lines = Lines(tqdm(disable=True), total, 0, "loop", "step", every=every, file=file, clock=lambda: now[0])
    for _ in range(total):
        now[0] += seconds_each
        lines.update()
    lines.close()
    return file.getvalue().splitlines()


def test_a_loop_of_a_few_seconds_writes_no_progress_line_and_a_long_one_a_line_a_tenth(monkeypatch):
    """In a log, the demo's epochs (12 batches, ~5 s) each wrote batch lines at 92% and 100%
    before the epoch's own line; a loop that ends within a few seconds now writes none.
    A long loop still writes one a tenth, the last at 100%."""
    monkeypatch.delenv("FNEMM_PROGRESS_EVERY", raising=False)
    assert _progress_lines(0.45, 12) == []
    long = _progress_lines(10.0, 20)                   # 200 s: a tenth every 20 s
    assert len(long) == 10 and long[-1].startswith("loop: 20/20 step (100%)") and "left" in long[0]
    # every 30 s, however the tenths fall: a 2,000-step loop of 0.1 s steps (200 s)
    assert 6 <= len(_progress_lines(0.1, 2000)) <= 11
    assert len(_progress_lines(0.45, 12, every=0)) == 6    # every=0 (the tests' setting): each tenth, however quick


def test_logs_piped_to_a_file_are_whole_lines(synth, tmp_path):
    """No carriage returns when stdout/stderr are not a terminal: one line per epoch;
    --progress on forces bars, --quiet drops the epoch lines."""
    import subprocess
    import sys
    jsonl, npy, ids = synth
    args = [sys.executable, "-m", "fnemm.cli", "train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl),
            "--features", str(npy), "--ids", str(ids), "--epochs", "2", "--threads", "1", "--set",
            "model.embed_dim=32", "--set", "model.word_dim=16", "--batch-size", "32"]
    done = subprocess.run([*args, "--out", str(tmp_path / "a")], capture_output=True, text=True, check=True)
    assert "\r" not in done.stdout + done.stderr
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1", "2"] and all("val i2t" in line for line in epochs)
    bars = subprocess.run([*args, "--out", str(tmp_path / "b"), "--progress", "on"], capture_output=True,
                          text=True, check=True)
    assert "batch/s" in bars.stderr                     # a bar was drawn
    quiet = subprocess.run([*args, "--out", str(tmp_path / "c"), "--quiet"], capture_output=True, text=True,
                           check=True)
    assert not [line for line in quiet.stdout.splitlines() if line.startswith("epoch ")]
    assert "best epoch" in quiet.stdout


def test_unknown_names_get_the_close_one_suggested(capsys, tmp_path):
    """A typo in a bundled dataset's, a preset's or a CNN's name: one line with the name meant."""
    for argv, meant in [(["train", "--preset", "demo/FNE-MH", "--dataset", "flickr8k-2k", "--features", "x",
                          "--out", str(tmp_path / "r")], "did you mean the bundled flickr8k-1k?"),
                        (["train", "--preset", "flickr8k/FNE-HM", "--dataset", "x", "--features", "x",
                          "--out", str(tmp_path / "r")], "flickr8k/FNE-MH"),
                        (["layers", "--cnn", "mobilenetv2"], "did you mean mobilenet_v2?")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and meant in err, err
    assert main(["train", "--preset", "demo/FNE-MH", "--dataset", str(tmp_path / "none.json"), "--features", "x",
                 "--out", str(tmp_path / "r")]) == 2
    assert ".csv of image,caption[,split] rows" in capsys.readouterr().err


def _suggested_commands():
    """Every `fnemm COMMAND --option ...` the library's messages and docstrings suggest
    (string literals and f-strings; {expressions} stand for a value)."""
    import ast
    import re
    src = Path(__file__).resolve().parents[1] / "src"
    found = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            for m in re.finditer(r"fnemm ((?:index )?[a-z]+)((?: +[^\s`;,)]+)*)", text):
                if "--" in m.group(2) and not re.search(r"\.\.\.|[|>]", m.group(2)):
                    found.add((path.name, m.group(1), m.group(2).strip()))
    return sorted(found)


def test_every_command_a_message_suggests_takes_the_options_it_is_suggested_with():
    """Messages and help that suggest a command (`rebuild it: fnemm index build --checkpoint
    CKPT ...`, `fnemm train --out DIR --resume`) name options that command has."""
    from fnemm.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    suggestions = _suggested_commands()
    assert len(suggestions) >= 10, suggestions
    wrong = []
    for where, command, rest in suggestions:
        sub = commands[command.split()[0]]
        if " " in command:                                   # index build
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[command.split()[1]]
        known = {s for a in sub._actions for s in a.option_strings}
        wrong += [f"{where}: fnemm {command} {rest}: {opt}" for opt in re.findall(r"(--[a-z][a-z0-9-]*)", rest)
                  if opt not in known]
    assert wrong == []


def test_a_count_of_0_is_refused_not_read_as_the_default(capsys):
    """`study --epochs 0` and `stability --epochs 0` trained every run to the full schedule
    (0 read as "not given"); each count a study takes is at least 1, said before any work;
    so is --threads, and a fine-tuning flag of 0 without --finetune is still one."""
    for flag in ("--epochs", "--seeds", "--splits", "--max-images", "--curve-seeds", "--patience"):
        assert main(["study", "--quick", "--out", "never-made", flag, "0"]) == 2
        assert f"{flag} 0: expected at least 1" in capsys.readouterr().err
    assert main(["stability", "--dataset", "x.jsonl", "--features", "f", "--out", "never-made", "--epochs", "0"]) == 2
    assert "--epochs 0: expected at least 1" in capsys.readouterr().err
    assert not Path("never-made").exists()
    for threads in ("0", "-1"):                 # -1 was torch's RuntimeError traceback, 0 ignored
        assert main(["evaluate", "--checkpoint", "never-made", "--threads", threads]) == 2
        assert capsys.readouterr().err == f"fnemm: error: --threads {threads}: expected at least 1\n"
    assert main(["train", "--preset", "demo/FNE-MH", "--dataset", "x.jsonl", "--features", "f", "--out", "never-made",
                 "--finetune-blocks", "0"]) == 2        # a 0 was read as not given, and a plain run trained
    assert "--finetune-blocks is for fine-tuning" in capsys.readouterr().err
