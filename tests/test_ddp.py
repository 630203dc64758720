"""Training across processes (gloo on CPU): the sharded loss and its gradients equal the
single-process ones on the whole batch, and a 2-process run of `fnemm train` under
torchrun ends where a 1-process run ends."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fnemm.training.distributed import shares, sharded_loss
from fnemm.joint.losses import contrastive_loss
from test_train import SMALL

N, D, WORLD = 13, 6, 2          # 13 pairs: shares of 7 and 6


def batch(similarity: str):
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    cap = torch.nn.functional.normalize(img + 0.8 * torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    return (img.abs(), cap.abs()) if similarity == "order" else (img, cap)


def _worker(rank: int, init: str, out: str, similarity: str, reduction: str):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    img, cap = batch(similarity)
    parts = shares(N, WORLD)
    mine = parts[rank]
    local_img = img[mine].clone().requires_grad_(True)
    local_cap = cap[mine].clone().requires_grad_(True)
    loss = sharded_loss(local_img, local_cap, parts, rank, WORLD, similarity, reduction, margin=0.2)
    loss.backward()
    torch.save({"loss": loss.detach(), "img": local_img.grad, "cap": local_cap.grad}, f"{out}-{rank}.pt")
    torch.distributed.barrier()           # both done before either tears down (gloo aborts otherwise)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("similarity", ["cosine", "order"])
@pytest.mark.parametrize("reduction", ["sum", "max"])
def test_sharded_loss_and_gradients_equal_the_whole_batch(tmp_path, similarity, reduction):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "part"), similarity, reduction),
             nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"part-{r}.pt") for r in range(WORLD)]
    img, cap = batch(similarity)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    loss = contrastive_loss(img, cap, similarity, reduction, 0.2)
    loss.backward()
    # each process's loss is its pairs' part x WORLD (DDP averages): the parts sum to the loss
    torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, loss.detach(), rtol=1e-12, atol=1e-12)
    # the gathered gradient reaches each process's own rows, x WORLD likewise
    parts = shares(N, WORLD)
    for r, g in enumerate(got):
        torch.testing.assert_close(g["img"] / WORLD, img.grad[parts[r]], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g["cap"] / WORLD, cap.grad[parts[r]], rtol=1e-10, atol=1e-12)


def test_a_two_process_run_ends_where_a_one_process_run_ends(synth, tmp_path):
    jsonl, npy, ids = synth
    args = ["train", "--preset", "flickr30k/FNE-MH", "--dataset", str(jsonl), "--features", str(npy), "--ids",
            str(ids), "--epochs", "2", "--lr", "2e-3", "--quiet", "--threads", "1", "--checkpoint-every", "0",
            *sum((["--set", s] for s in SMALL), [])]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "fnemm.cli", *args, "--out", str(tmp_path / "one")], check=True, env=env)
    for _ in range(3):
        # torchrun --standalone picks its ports by binding and releasing them: another test's
        # server (the other pytest worker) can take one in between. That race, and only it,
        # is tried again, as PyTorch's own tests do (retry_on_connect_failures).
        two_run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", "-m", "fnemm.cli", *args, "--out", str(tmp_path / "two")], env=env,
                                 capture_output=True, text=True)
        if two_run.returncode == 0 or "in use" not in two_run.stderr or (tmp_path / "two").exists():
            break
    assert two_run.returncode == 0, f"torchrun exited {two_run.returncode}:\n{two_run.stderr[-6000:]}"
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    # float32 sums in another order, then Adam: equal to 1e-4 of the weights' scale
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    print(json.dumps({"max_abs_weight_difference": max(float((two["model"][k] - v).abs().max())
                                                         for k, v in one["model"].items())}))
    h1 = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in h2] == [1, 2]
    for a, b in zip(h1, h2):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * abs(a["loss"]) and abs(a["val"]["rsum"] - b["val"]["rsum"]) < 1.0


def test_collectives_use_the_backends_device(monkeypatch):
    """NCCL has no CPU tensors: the epoch's loss sum and the broadcasts go through the
    process's GPU there, through the CPU under gloo (the README's torchrun --device cuda
    command crashed at the end of its first epoch on a CPU tensor)."""
    import torch
    import torch.distributed as dist
    import fnemm.training.distributed as fd
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert fd.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert fd.collective_device() == torch.device("cpu")
    seen = []
    monkeypatch.setattr(fd, "collective_device", lambda: seen.append("asked") or torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda t: seen.append(t.device.type) or t.mul_(2))
    assert fd.all_sum(1.5) == 3.0
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, device: seen.append(device.type))
    assert fd.broadcast({"a": 1}) == {"a": 1}
    assert seen == ["asked", "cpu", "asked", "cpu"]


def test_a_torchrun_group_of_one_process_trains_in_it(monkeypatch):
    """Under torchrun, even with one process, fnemm joins the process group (so one GPU
    checks the NCCL path); outside torchrun it trains alone."""
    import fnemm.training.distributed as fd
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert fd.from_env("cpu") == (None, "cpu")
    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(fd.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fd.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(fd.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(fd.dist, "get_world_size", lambda: 1)
    group, device = fd.from_env("cpu")
    assert calls == ["gloo"] and group.world == 1 and group.main and device == "cpu"


def test_the_group_fnemm_opens_is_closed_before_the_interpreter_tears_down(tmp_path):
    """A gloo group left open to interpreter finalisation can abort a finished process
    (SIGABRT, "terminate called without an active exception"), failing a torchrun run whose
    work was done (it failed CI once). The group from_env opens is closed at exit, after an
    exception too; one the caller opened is left to the caller."""
    script = tmp_path / "child.py"
    script.write_text(
        "import atexit, sys\n"
        "import torch.distributed as dist\n"
        "atexit.register(lambda: print('open at exit:', dist.is_initialized()))  # runs after fnemm's\n"
        "if sys.argv[1] == 'caller':\n"
        "    dist.init_process_group('gloo')\n"
        "from fnemm.training.distributed import from_env, all_sum, collective_work\n"
        "group, _ = from_env('cpu')\n"
        "print('sum:', all_sum(2.0), 'world:', group.world)\n"
        "try:\n"
        "    with collective_work():\n"
        "        all_sum(1.0)\n"
        "        if sys.argv[1] == 'cut':\n"
        "            raise RuntimeError('cut short')\n"
        "except RuntimeError:\n"
        "    pass\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "0"}
    for opener, open_at_exit in (("fnemm", "False"), ("cut", "False"), ("caller", "True")):
        done = subprocess.run([sys.executable, str(script), opener], env=env, capture_output=True, text=True)
        if open_at_exit == "False":           # left open, the group may abort the process as it ends
            assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["sum:", "2.0", "world:", "1", "open", "at", "exit:", open_at_exit], done.stdout


def test_an_nccl_group_whose_work_an_exception_cut_short_is_left_to_torchrun(monkeypatch):
    """destroy_process_group drains NCCL work that peers still in a collective will never
    complete: after an exception inside a run's collectives, the NCCL group is not closed
    at exit (torchrun reaps the processes); after a clean run it is."""
    import fnemm.training.distributed as fd
    closed = []
    monkeypatch.setattr(fd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(fd.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(fd.dist, "destroy_process_group", lambda: closed.append("closed"))
    with fd.collective_work():
        pass
    fd.close()
    assert closed == ["closed"]
    with pytest.raises(RuntimeError):
        with fd.collective_work():
            raise RuntimeError("a peer waits in a collective")
    fd.close()
    assert closed == ["closed"]
    monkeypatch.setattr(fd.dist, "get_backend", lambda *a: "gloo")
    fd.close()
    assert closed == ["closed", "closed"]
    with fd.collective_work():            # the module's state back to clean for the tests after
        pass
