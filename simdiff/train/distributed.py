"""Plain multi-process data parallelism under ``torchrun`` (all distributed code lives here).

``torchrun --nproc_per_node N script.py`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
:func:`init_distributed` reads them and starts a process group (nccl on CUDA, gloo on CPU). Without those
variables everything degrades to a single process: rank 0, world size 1, collectives are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo", "init_distributed", "cleanup", "is_distributed", "get_rank", "get_world_size", "is_main",
    "barrier", "all_reduce_mean", "wrap_model", "unwrap_model", "STRATEGIES",
]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Start the process group from the torchrun environment (idempotent) and pick this rank's device.

    Args:
        device: "auto" -> ``cuda:LOCAL_RANK`` if CUDA is available, else cpu; or an explicit device string.
        backend: default nccl for CUDA devices, gloo otherwise.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"), init_method="env://")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Destroy the process group if one is running."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes checkpoints and logs."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a copy; ``x`` itself is left alone). Identity in a single process."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def wrap_model(model: nn.Module, strategy: str = "ddp", *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` (already on its device) for data parallelism; a single process returns it unchanged.

    ``ddp``: DistributedDataParallel (gradients averaged over ranks in backward).
    ``fsdp``: FullyShardedDataParallel with ``use_orig_params=True`` (parameters sharded). Note: the
    :class:`~simdiff.train.trainer.Trainer`'s EMA and checkpoints need full (unsharded) parameters, so the trainer
    currently accepts only ``ddp``; ``fsdp`` is here for callers that manage state themselves.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=find_unused_parameters
        )
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, use_orig_params=True, device_id=device if device.type == "cuda" else None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / FSDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
