"""Checkpoints are data: every .pt fnemm reads is loaded with weights_only=True, so a
run folder someone shares cannot run code on the machine that opens it; and a resume
restores the random state on the CPU whatever the device (a GPU resume crashed on it);
a checkpoint of another run is refused by the run's id."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnemm.cli import main
from test_train import SMALL


class Payload:
    """What a malicious checkpoint hides: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import synthetic
    folder = tmp_path_factory.mktemp("ckpt")
    jsonl, npy, ids = synthetic.write(folder / "synth")
    out = folder / "run"
    args = ["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy),
            "--ids", str(ids), "--epochs", "3", "--quiet", "--threads", "1", "--checkpoint-every", "0",
            "--out", str(out), *sum((["--set", s] for s in SMALL), [])]
    # killed (as kill -9) after its first epoch: a run to resume
    killed = subprocess.run([sys.executable, "-m", "fnemm.cli", *args], env={**os.environ, "FNEMM_DIE_AT": "epoch-1"})
    assert killed.returncode != 0 and (out / "best.pt").exists()
    return out, jsonl, npy, ids


def _poison(path: Path, marker: Path) -> None:
    """The same checkpoint with one entry swapped for an object that runs code when unpickled."""
    data = torch.load(path, weights_only=True)
    data["preset"] = Payload(marker)
    torch.save(data, path)
    with pytest.raises(pickle.UnpicklingError):       # the file really holds one
        torch.load(path, weights_only=True)


def test_a_checkpoint_carrying_a_pickled_object_is_refused_not_run(run, tmp_path, capsys):
    out, jsonl, npy, ids = run
    folder = tmp_path / "shared-run"
    subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
    marker = tmp_path / "it-ran"
    _poison(folder / "best.pt", marker)
    # its checksums.json says best.pt is not the file the run wrote: refused before it is opened
    args = ["evaluate", "--checkpoint", str(folder), "--dataset", str(jsonl), "--features", str(npy),
            "--ids", str(ids), "--output", str(tmp_path / "m.json")]
    assert main(args) == 2
    assert "best.pt: not the file its record names" in capsys.readouterr().err
    (folder / "checksums.json").unlink()          # a folder shared without it: the unpickler must refuse
    assert main(["evaluate", "--checkpoint", str(folder), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--output", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnemm: error: ") and err.count("\n") == 1
    assert "best.pt: holds Python objects" in err and "will not unpickle it" in err
    _poison(folder / "last.pt", marker)
    assert main(["train", "--out", str(folder), "--resume", "--quiet"]) == 2
    assert "last.pt: holds Python objects" in capsys.readouterr().err
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_named_as_what_it_looks_like(tmp_path, capsys):
    """A dataset file or a plain pickle passed as --checkpoint used to read "holds Python
    objects" (any refusal of torch's data-only unpickler did); each says what it is, in one
    line, with none of torch's own warnings."""
    import pickle
    cases = {"data.jsonl": b'{"image": "a.jpg", "captions": ["a dog"]}\n', "plain.pt": pickle.dumps({"a": [1, 2]}, protocol=4),
             "empty.pt": b""}
    said = {"data.jsonl": "not a file torch.save writes (text: '{\"image\": \"a.jpg'...)", "plain.pt":
            "not a file torch.save writes (a plain pickle)", "empty.pt": "not a readable checkpoint (EOFError"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        dataset = str(tmp_path / "data.jsonl")
        assert main(["evaluate", "--checkpoint", str(tmp_path / name), "--dataset", dataset]) == 2
        err = capsys.readouterr().err.splitlines()[-1]          # after the dataset's warning of its draw
        assert err.startswith("fnemm: error: ") and f"{tmp_path / name}: {said[name]}" in err, err


def test_every_load_in_the_library_is_data_only():
    src = Path(__file__).resolve().parents[1] / "src"
    found = [f"{p}:{k}" for p in src.rglob("*.py") for k, line in enumerate(p.read_text().splitlines(), 1)
             if "weights_only=False" in line]
    assert not found, found


def test_resume_restores_the_random_state_on_the_cpu(run, tmp_path, monkeypatch):
    """last.pt is read onto the CPU, so the RNG state torch.set_rng_state takes stays a
    CPU tensor on any device (map_location=cuda moved it to the GPU: a GPU resume
    crashed); a GPU's own generator state is saved beside it."""
    out, *_ = run
    folder = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
    seen = []
    real = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state", lambda state: seen.append(state.device.type) or real(state))
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(str(k.get("map_location"))) or real_load(*a, **k))
    assert main(["train", "--out", str(folder), "--resume", "--quiet"]) == 0
    assert "cpu" in seen and all(s == "cpu" for s in seen), seen
    last = torch.load(folder / "last.pt", weights_only=True)
    assert "cuda_rng" in last and last["cuda_rng"] is None          # saved as such on a CPU run
    assert last["torch_rng"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_run_resumes_exactly(run, tmp_path):
    out, jsonl, npy, ids = run
    common = ["--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids),
              "--epochs", "4", "--quiet", "--checkpoint-every", "0", "--device", "cuda",
              "--set", "model.image_dropout=0.3", *sum((["--set", s] for s in SMALL), [])]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(["train", "--out", str(ref), *common]) == 0
    env = {**os.environ, "FNEMM_DIE_AT": "epoch-2"}
    killed = subprocess.run([sys.executable, "-m", "fnemm.cli", "train", "--out", str(cut), *common], env=env)
    assert killed.returncode != 0
    assert main(["train", "--out", str(cut), "--resume", "--quiet", "--device", "cuda"]) == 0
    a, b = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (ref, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_evaluation_reads_the_file_it_was_given_and_the_protocol_it_was_made_with(run, tmp_path):
    """evaluate_runs(output=F, fresh=True) keeps F when it is newer than best.pt and was
    measured with the same protocol (it used to read RUN/metrics-test.json instead)."""
    import json
    from fnemm.training.runs import evaluate_runs
    out, jsonl, npy, ids = run
    folder = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
    from fnemm.datasets import load_dataset
    from fnemm.features.store import load_features
    dataset, feats = load_dataset(jsonl), load_features(npy, "fne", ids=ids)
    target = tmp_path / "elsewhere.json"
    first = evaluate_runs(folder, dataset, feats, "test", protocol="all", output=target)
    saved = json.loads(target.read_text())
    assert saved["protocol"] == "all" and not (folder / "metrics-test.json").exists()
    saved["results"]["all"]["rsum"] = 123.0             # marks the file: a fresh run must return it
    target.write_text(json.dumps(saved))
    (folder / "metrics-test.json").write_text(json.dumps({"results": {"all": {"rsum": 999.0}}}))
    again = evaluate_runs(folder, dataset, feats, "test", protocol="all", output=target, fresh=True)
    assert next(iter(again.values()))["all"]["rsum"] == 123.0
    other = evaluate_runs(folder, dataset, feats, "test", protocol="all,5fold", output=target, fresh=True)
    assert set(next(iter(other.values()))) == {"all", "5fold"}          # another protocol: measured
    assert next(iter(other.values()))["all"]["rsum"] == next(iter(first.values()))["all"]["rsum"]


def test_checkpoints_of_another_run_are_refused_by_the_run_id(run, tmp_path, capsys):
    """A run's checkpoints carry the random id its run.json holds. A folder whose run.json
    names another run (a best.pt/last.pt copied in from a twin run, their checksums.json
    with them, so every hash agrees) is refused by resume and by evaluate, naming the file."""
    out, jsonl, npy, ids = run
    folder = tmp_path / "twin"
    subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
    info = json.loads((folder / "run.json").read_text())
    ours = torch.load(folder / "best.pt", weights_only=True)["run_id"]
    assert info["run_id"] == ours and len(ours) == 32
    assert main(["evaluate", "--checkpoint", str(folder), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--output", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    (folder / "run.json").write_text(json.dumps({**info, "run_id": "0" * 32}))
    assert main(["train", "--out", str(folder), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnemm: error: ") and "last.pt: from another run" in err, err
    assert main(["evaluate", "--checkpoint", str(folder), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--output", str(tmp_path / "m.json")]) == 2
    assert "best.pt: from another run" in capsys.readouterr().err
    del info["run_id"]                      # a run from before ids: nothing to compare, it reads
    (folder / "run.json").write_text(json.dumps(info))
    assert main(["evaluate", "--checkpoint", str(folder), "--dataset", str(jsonl), "--features", str(npy),
                 "--ids", str(ids), "--output", str(tmp_path / "m.json")]) == 0


def test_evaluate_says_when_the_images_it_scores_are_training_images(run, tmp_path, capsys):
    """Every checkpoint lists the images its model learnt from. Scored on its own test split
    the run is held-out (0 seen); scored on a dataset whose test split holds some of its
    training images (another split of the same photos), evaluate warns, prints how many,
    saves the count, and the report says it: an inflated recall never passes unremarked."""
    out, jsonl, npy, ids = run
    folder = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    trained = [r["image"] for r in records if r["split"] == "train"]
    assert json.loads(torch.load(folder / "best.pt", weights_only=True)["train_images"]) == trained
    data = ["--features", str(npy), "--ids", str(ids)]
    assert main(["evaluate", "--checkpoint", str(folder), "--dataset", str(jsonl), *data, "--json"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["all"]["seen_in_training"] == 0 and "not held-out" not in said.err
    resplit = tmp_path / "resplit.jsonl"            # 7 of its training images are test images here
    resplit.write_text("".join(json.dumps({**r, "split": "test" if r["image"] in trained[:7] else r["split"]}) + "\n"
                               for r in records))
    assert main(["evaluate", "--checkpoint", str(folder), "--dataset", str(resplit), *data]) == 0
    said = capsys.readouterr()
    n_test = sum(r["split"] == "test" for r in records) + 7
    assert f"7 of the {n_test} test images are among the {len(trained)} it was trained on" in said.err, said.err
    assert "not held-out: 7 of the test images it ranked" in said.out, said.out
    assert json.loads((folder / "metrics-test.json").read_text())["results"]["all"]["seen_in_training"] == 7
    assert main(["report", str(folder)]) == 0
    assert "not held-out, 7 of its test images are among those it was trained on" in capsys.readouterr().out


def test_evaluate_says_when_the_images_it_scores_chose_the_checkpoint(run, tmp_path, capsys):
    """Every checkpoint also lists its validation images, whose rsum picked its best epoch:
    scored on them (``--split val``) the recalls are the best of every epoch's, optimistic.
    Evaluate warns, prints and saves how many, and the report says it; the test split
    has none of them."""
    out, jsonl, npy, ids = run
    subprocess.run(["cp", "-r", str(out), str(tmp_path / "run")], check=True)
    out = tmp_path / "run"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    val = [r["image"] for r in records if r["split"] == "val"]
    assert json.loads(torch.load(out / "best.pt", weights_only=True)["val_images"]) == val
    data = ["--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids)]
    assert main(["evaluate", "--checkpoint", str(out), *data, "--json", "--output", str(tmp_path / "t.json")]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["all"]["seen_in_validation"] == 0 and "chose it" not in said.err
    assert main(["evaluate", "--checkpoint", str(out), *data, "--split", "val"]) == 0
    said = capsys.readouterr()
    n = len(val)
    assert f"{n} of the {n} val images are among the {n} whose validation rsum chose it" in said.err, said.err
    assert f"optimistic: {len(val)} of the val images it ranked chose its best epoch" in said.out, said.out
    results = json.loads((out / "metrics-val.json").read_text())["results"]["all"]
    assert results["seen_in_validation"] == len(val) and results["seen_in_training"] == 0
    assert main(["report", str(out), "--split", "val"]) == 0
    assert f"optimistic, {len(val)} of its val images chose its best epoch" in capsys.readouterr().out


def test_a_damaged_list_of_training_images_is_refused_naming_the_file(tmp_path):
    from fnemm.errors import FnemmError
    from fnemm.joint.checkpoint import image_lists, listed_images
    path = tmp_path / "best.pt"
    lists = image_lists(["a.jpg", "b\n.jpg", "a.jpg"], ["v.jpg"])
    assert listed_images(lists, path) == ["a.jpg", "b\n.jpg"]           # each once, first seen first
    assert listed_images(lists, path, "val_images") == ["v.jpg"]
    assert listed_images({}, path) is None                    # a checkpoint from before the lists
    assert listed_images({}, path, "val_images") is None
    for damaged in ('["a.jpg", 3]', '{"a": 1}', '["a.jpg"', ["a.jpg"]):
        with pytest.raises(FnemmError, match=f"^{path}: its list of training images is damaged"):
            listed_images({"train_images": damaged}, path)
        with pytest.raises(FnemmError, match=f"^{path}: its list of validation images is damaged"):
            listed_images({"val_images": damaged}, path, "val_images")


def test_a_run_evaluated_before_it_finished_training_is_said_to_be_so(run, tmp_path, capsys):
    """run.json says "training" from a run's start and "finished" at its end. Evaluating a
    run killed (or still running) before its end warns and marks the metrics; a report of
    them says so; a report of a seeds folder whose unevaluated seed is still training says
    that, where it used to send the user to evaluate the half-trained seed. Resumed to its
    end, the run says "finished" and its metrics are unmarked."""
    from fnemm.datasets import load_dataset
    from fnemm.features.store import load_features
    from fnemm.training.runs import evaluate_runs
    out, jsonl, npy, ids = run
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    subprocess.run(["cp", "-r", str(out), str(seeds / "seed-0")], check=True)
    subprocess.run(["cp", "-r", str(out), str(seeds / "seed-1")], check=True)
    first = seeds / "seed-0"
    assert json.loads((first / "run.json").read_text())["state"] == "training"
    data = ["--dataset", str(jsonl), "--features", str(npy), "--ids", str(ids)]
    assert main(["evaluate", "--checkpoint", str(first), *data]) == 0
    said = capsys.readouterr()
    assert "has not trained to its end" in said.err and "unfinished: the run has not trained" in said.out
    assert json.loads((first / "metrics-test.json").read_text())["results"]["all"]["unfinished"] is True
    from fnemm import evaluate                  # the library says it too, not only the command
    with pytest.warns(UserWarning, match="has not trained to its end"):
        assert evaluate(first, load_dataset(jsonl), load_features(npy, "fne", ids=ids))["all"]["unfinished"] is True
    assert main(["report", str(seeds)]) == 2
    err = capsys.readouterr().err
    assert f"{seeds / 'seed-1'}: still training, or stopped before its end" in err and "seed-0" in err, err
    assert main(["report", str(first)]) == 0
    assert "1 of its 1 seeds had not trained to their end when evaluated" in capsys.readouterr().out
    assert main(["train", "--out", str(first), "--resume", "--quiet"]) == 0
    assert json.loads((first / "run.json").read_text())["state"] == "finished"
    os.utime(first / "metrics-test.json")     # newer than best.pt: a fresh evaluation would keep it...
    again = evaluate_runs(first, load_dataset(jsonl), load_features(npy, "fne", ids=ids), fresh=True)
    assert "unfinished" not in again[str(first)]["all"]     # ...but not its mark: measured again
    assert main(["evaluate", "--checkpoint", str(first), *data]) == 0
    said = capsys.readouterr()
    assert "has not trained to its end" not in said.err and "unfinished" not in said.out
    assert "unfinished" not in json.loads((first / "metrics-test.json").read_text())["results"]["all"]
    assert main(["report", str(first)]) == 0 and "had not trained" not in capsys.readouterr().out
