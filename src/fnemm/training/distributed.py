"""Training across processes (torch DDP): ``torchrun --nproc-per-node N -m fnemm.cli train ...``.

The paper's batch of 128 pairs is the *global* batch: every process draws the same
epoch order and captions (the same seed), takes its share of each batch, embeds it,
and the embeddings of all shares are gathered *with their gradient*, so each
process's hinge terms see every in-batch negative (the hardest negative of the max
of hinges may be another process's). Each process scores only its own pairs' rows and
columns of the batch's score matrix; their sum is the single-process loss, and with
that local loss multiplied by the number of processes, DDP's gradient averaging gives
exactly the single-process gradient. Only rank 0 validates and writes.

Backends: gloo on CPU, NCCL on GPUs (one per process, by LOCAL_RANK).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fnemm.io.errors import FnemmError
from fnemm.joint.losses import hinge_loss, scores


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(device: str) -> tuple[Dist | None, str]:
    """(the process group, this process's device) when launched by torchrun (RANK and
    WORLD_SIZE set; a group of one process too, which exercises the same collectives),
    else (None, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise FnemmError(f"process {rank}: no GPU {local} here ({torch.cuda.device_count()} visible); "
                             f"start at most as many processes per node as GPUs")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # The group this process opened is closed before the interpreter tears down: a gloo
        # group left to finalisation can abort the process after its work is done ("terminate
        # called without an active exception", SIGABRT; pytorch/pytorch#190489), and torchrun
        # then fails the whole run. A group the caller opened is the caller's to close.
        atexit.register(close)
    return Dist(dist.get_rank(), dist.get_world_size()), device


_in_flight = False          # inside collective_work, or left it by an exception


@contextlib.contextmanager
def collective_work():
    """Around a run's collectives. A process that leaves it by an exception (its peers may
    wait in a collective it will never join) does not close an NCCL group at exit: NCCL's
    teardown would wait on them for ever, and torchrun reaps the others once it exits. A
    gloo group is closed all the same (this process has no collective of its own in flight
    once the exception is out; its peers then fail instead of waiting)."""
    global _in_flight
    _in_flight = True
    yield
    _in_flight = False


def close() -> None:
    """Close this process's default group if it is open, unless it is NCCL's and an
    exception cut its collective work short (idempotent)."""
    if dist.is_available() and dist.is_initialized() and (not _in_flight or dist.get_backend() == "gloo"):
        dist.destroy_process_group()


def shares(n: int, world: int) -> list[slice]:
    """Each process's contiguous share of a global batch of ``n`` pairs (sizes differ by at most 1)."""
    bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(n), world)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class _AllGather(torch.autograd.Function):
    """Every process's (equal-sized) tensor, stacked; backward: each process gets the sum,
    over all processes, of the gradient of its own part (an all-reduce, which gloo has;
    gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_with_grad(local: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """The whole batch's rows from every process's share, differentiable: the gradient of
    a row flows back to the process that owns it. Shares may differ in size by one."""
    size = max(p.stop - p.start for p in parts)
    padded = torch.cat([local, local.new_zeros(size - len(local), *local.shape[1:])]) if len(local) < size else local
    gathered = _AllGather.apply(padded)
    return torch.cat([g[:p.stop - p.start] for g, p in zip(gathered, parts)])


def sharded_loss(images: torch.Tensor, captions: torch.Tensor, parts: list[slice], rank: int, world: int,
                 similarity: str, reduction: str, margin: float) -> torch.Tensor:
    """This process's part of the batch loss, scaled for DDP's averaging: its own pairs'
    rows (caption negatives) and columns (image negatives) of the whole batch's scores."""
    all_images = gather_with_grad(images, parts)
    all_captions = gather_with_grad(captions, parts)
    return world * hinge_loss(scores(all_images, all_captions, similarity), margin, reduction, pairs=parts[rank])


def collective_device() -> torch.device:
    """Where a collective's tensors must be: NCCL reduces GPU tensors only (the process's
    current GPU), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def barrier() -> None:
    dist.barrier()
