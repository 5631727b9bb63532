"""Process-group set-up under torchrun (or a single process) and small collective helpers."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False          # we initialised the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but CUDA is not available; use engine.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_choice: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment describes one (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, device, owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: dict[str, float | torch.Tensor], device) -> dict[str, float]:
    """SUM-reduce a dict of scalars over ranks (same keys on every rank, sorted for a fixed order)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _GatherRows(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gathered rows' gradients, this rank's
    slice (all_reduce, which gloo has, rather than reduce_scatter, which it lacks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order, differentiably: the backward pass
    returns each rank the gradient of all ranks' losses with respect to its own rows (the
    all-gather that contrastive losses need so that a rank's rows meet the whole global batch).
    On one process: `x` itself. Every rank must pass the same shape."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _GatherRows.apply(x)


def all_reduce_tensor(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A copy of `x` SUM- or MEAN-reduced over ranks (no gradient); `x` itself on one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size() if op == "mean" else out
