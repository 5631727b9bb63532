"""Parallelising a model for training, shared by the distiller and the grounding trainer (in the
manner of torchtitan's `parallelize`): activation checkpointing per block, then DDP or FSDP2.

`blocks` are the repeated transformer blocks: FSDP2 shards each of them, then the root, so a block's
parameters are gathered only while it runs; activation checkpointing recomputes each block in the
backward pass instead of keeping its activations.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from distill.distributed import DistInfo

PARALLEL_MODES = ("ddp", "fsdp", "none")


def apply_activation_checkpointing(model: nn.Module, blocks: Iterable[nn.Module]) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing as apply,
                                                                             checkpoint_wrapper)

    blocks = set(blocks)
    apply(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: m in blocks)


def data_parallel(model: nn.Module, info: DistInfo, mode: str = "ddp", blocks: Iterable[nn.Module] = ()) -> nn.Module:
    """`model` wrapped for `info`'s process group: unchanged on one process or with mode 'none'."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if not info.distributed or mode == "none":
        return model
    if mode == "ddp":
        # find_unused_parameters: heads of a teacher a step does not train, experts no token chose
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=True)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6
        raise RuntimeError("parallel mode fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
                           "use ddp") from e
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model
