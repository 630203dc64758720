"""bench/gpu_benchmark.py: the Flickr8K grid's kit travels in parts that each fit a device
call, is verified file by file before anything runs, and its records come back unpacked
only when they are records."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_benchmark as gb  # noqa: E402


def test_the_grid_is_the_makefiles_command_and_parses_as_a_study():
    argv = gb.study_argv((ROOT / "Makefile").read_text())
    assert argv[:3] == ["study", "--dataset", "flickr8k-224"]
    assert argv[argv.index("--patience") + 1] == "10" and argv[argv.index("--seeds") + 1] == "3"
    filled = gb.grid({"study": argv}, Path("/x/grid"), "cuda", 2, ["--workers", "12"])
    assert filled[filled.index("--out") + 1] == "/x/grid" and filled[filled.index("--device") + 1] == "cuda"
    from fnemm.cli import build_parser
    args = build_parser().parse_args(filled)          # every option is one fnemm study knows
    assert args.workers == 12 and args.threads == 2 and args.cnns == "efficientnet_lite0,mobilenet_v2"
    with pytest.raises(SystemExit, match="make variables this script does not fill"):
        gb.study_argv("F8K_STUDY = $(VENV)/bin/fnemm study --out $(ELSEWHERE)\n")


def test_parts_fit_a_call_and_hold_every_file_once():
    first = [("src/a.py", 30), ("whl/x.whl", 40)]
    files = [(f"data/flickr8k/images-224/{k}.jpg", 25) for k in range(9)]
    parts = gb.plan_parts(files, first, room=100)
    assert parts[0][:2] == ["src/a.py", "whl/x.whl"]
    sizes = dict(first + files)
    assert all(sum(sizes[n] for n in part) <= 100 for part in parts)
    assert sorted(n for part in parts for n in part) == sorted(sizes)
    assert [n for part in parts for n in part if n.endswith(".jpg")] == [n for n, _ in files]   # order kept
    with pytest.raises(SystemExit, match="does not fit a call"):
        gb.plan_parts([("big.jpg", 101)], [], room=100)
    with pytest.raises(SystemExit, match="code and wheels alone"):
        gb.plan_parts([], [("whl/huge.whl", 101)], room=100)


def _kit(tmp_path: Path) -> Path:
    kit = tmp_path / "f8k"
    files = {"src/fnemm/__init__.py": (1, b"x = 1\n"), "data/flickr8k/images-224/a.jpg": (1, b"A" * 10),
             "data/flickr8k/images-224/b.jpg": (2, b"B" * 10)}
    manifest = {"ref": "bench", "commit": "0" * 40, "study": ["study"], "parts": 2, "files": {}}
    for name, (part, data) in files.items():
        path = kit / f"part-{part}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest["files"][name] = {"part": part, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (kit / "part-1" / "kit.json").write_text(json.dumps(manifest))
    return kit


def test_a_part_counts_only_when_every_file_is_the_one_the_kit_names(tmp_path):
    kit = _kit(tmp_path)
    assert gb.read_kit(kit)[1] == [1, 2]
    b = kit / "part-2" / "data/flickr8k/images-224/b.jpg"
    b.write_bytes(b"C" * 10)                                     # same size, other bytes
    with pytest.raises(SystemExit, match=r"b.jpg: not the file kit.json names; carry .gpu/f8k/part-2 again"):
        gb.read_kit(kit)
    b.unlink()
    assert gb.read_kit(kit)[1] == [1]                             # part 2 not carried yet
    with pytest.raises(SystemExit, match=r"parts \[2\] of 2 are not on this machine"):
        gb.main(["run", "--kit", str(kit), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()                          # refused before installing or running anything
    with pytest.raises(SystemExit, match="the first call carries .gpu/f8k/part-1"):
        gb.read_kit(tmp_path / "nothing")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (path.parent / (path.name + ".sha256")).write_text(f"{gb.sha256_file(path)}  {path.name}\n")   # as `run` writes it
    return path


def test_receive_unpacks_records_and_nothing_else(tmp_path, capsys):
    good = _tar(tmp_path / "good.tar.gz", {"records/study.json": b'{"grid": {"seeds": 3}}',
                                           "records/runs/m/n6000/fne/split-0/seed-0/metrics-test.json": b"{}"})
    assert gb.main(["receive", str(good), "--out", str(tmp_path / "gpu")]) == 0
    assert (tmp_path / "gpu" / "runs" / "m" / "n6000" / "fne" / "split-0" / "seed-0" / "metrics-test.json").exists()
    assert "1 runs' records -> " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):
        gb.main(["receive", str(good), "--out", str(tmp_path / "gpu")])
    sums = tmp_path / "good.tar.gz.sha256"
    sums.write_text("0" * 64 + "  good.tar.gz\n")                # a transfer that changed the bytes
    with pytest.raises(SystemExit, match="good.tar.gz: not the file good.tar.gz.sha256 names"):
        gb.main(["receive", str(good), "--out", str(tmp_path / "again")])
    sums.unlink()
    with pytest.raises(SystemExit, match="no good.tar.gz.sha256 beside it"):
        gb.main(["receive", str(good), "--out", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()
    evil = _tar(tmp_path / "evil.tar.gz", {"records/../../escaped.txt": b"x"})
    with pytest.raises(SystemExit, match="is not a record of ours; not unpacked"):
        gb.main(["receive", str(evil), "--out", str(tmp_path / "other")])
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "other").exists()


def test_a_later_call_starts_the_half_trained_runs_again_and_keeps_the_finished(tmp_path):
    fne = tmp_path / "runs" / "m" / "n6000" / "fne"
    half, done = fne / "seed-1", fne / "seed-0"
    for run in (half, done):
        run.mkdir(parents=True)
        (run / "last.pt").write_bytes(b"x")
    (done / "metrics-test.json").write_text("{}")
    assert gb.drop_unfinished(tmp_path / "runs") == [half]
    assert not half.exists() and (done / "last.pt").exists()
    assert gb.drop_unfinished(tmp_path / "nothing") == []


def test_install_links_the_parts_here_so_far_and_the_rest_when_they_come(tmp_path):
    kit, work = _kit(tmp_path), tmp_path / "work"
    (work / "site").mkdir(parents=True)
    (work / "site" / ".done").touch()                              # no wheels to install in this test
    b = kit / "part-2" / "data/flickr8k/images-224/b.jpg"
    saved = b.read_bytes()
    b.unlink()
    env = gb.install(json.loads((kit / "part-1" / "kit.json").read_text()), kit, work)
    assert (work / "data/flickr8k/images-224/a.jpg").read_bytes() == b"A" * 10
    assert not (work / "data/flickr8k/images-224/b.jpg").is_symlink()          # no dangling link
    assert env["FNEMM_DATA"] == str(work / "data") and env["PYTHONPATH"].startswith(str(kit / "part-1" / "src"))
    b.write_bytes(saved)                                           # the next call carries part 2
    gb.install(json.loads((kit / "part-1" / "kit.json").read_text()), kit, work)
    assert (work / "data/flickr8k/images-224/b.jpg").read_bytes() == saved
