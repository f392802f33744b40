"""Multi-process data parallelism under ``torchrun``: DDP and FSDP2 (all distributed code lives here).

``torchrun --nproc_per_node N script.py`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
:func:`init_distributed` reads them and starts a process group (nccl on CUDA, gloo on CPU). Without those
variables everything degrades to a single process: rank 0, world size 1, collectives are no-ops.

Strategies (:func:`wrap_model`):

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`; every rank holds the full model and optimizer.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, in place): each block (:func:`shard_model`) and the
  root become :class:`FSDPModule`; parameters are ``DTensor`` s sharded on dim 0 over ranks, so parameters,
  gradients and AdamW moments cost ``1 / world_size`` of the full size per rank. Works with gloo on CPU (tested)
  and nccl on CUDA. Full (unsharded, CPU, rank-0-only) state dicts for checkpoints come from
  :func:`full_model_state_dict` / :func:`full_optimizer_state_dict` (``torch.distributed.checkpoint.state_dict``
  with ``full_state_dict=True, cpu_offload=True``); the optimizer's is re-keyed by parameter index so the file
  format is exactly that of ``optimizer.state_dict()`` under DDP / one process (checkpoints move both ways).
"""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from simdiff.devices import resolve_device

__all__ = [
    "DistInfo", "init_distributed", "cleanup", "is_distributed", "get_rank", "get_world_size", "is_main",
    "barrier", "all_reduce_mean", "all_reduce_grads_mean", "all_reduce_mean_",
    "wrap_model", "unwrap_model", "STRATEGIES", "shard_model", "is_sharded",
    "full_tensor", "shard_like", "full_model_state_dict", "full_optimizer_state_dict", "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
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
        device: "auto" -> ``cuda:LOCAL_RANK`` if CUDA is available, else cpu; or an explicit device string. An
            unknown name or an accelerator this machine lacks raises a one-line ConfigError naming train.device.
        backend: default nccl for CUDA devices, gloo otherwise.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, what="train.device", local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"), init_method="env://")
        atexit.register(cleanup)  # tear the group down while the interpreter is still whole (see cleanup)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Destroy the process group if one is running, and free what still holds it (idempotent).

    DDP/FSDP wrappers keep their own reference to the group, so ``destroy_process_group`` alone can leave the gloo
    backend (and its worker threads) alive until interpreter shutdown, where tearing it down can abort the process
    ("terminate called without an active exception", SIGABRT) after all work has finished. Collecting garbage here
    frees those wrappers, and with them the backend, while Python is still fully alive. :func:`init_distributed`
    registers this function with :mod:`atexit`, so scripts that never call it are covered too.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


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


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place (one all-reduce per dtype). No-op in one process."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    world = dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for t in group:
            t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_grads_mean(params: list[torch.Tensor]) -> None:
    """Average ``p.grad`` over ranks in place, for a model that is not wrapped in DDP (e.g. a loss object's
    auxiliary network with its own optimizer), so that every rank takes the same optimizer step: the gradient of
    the mean loss over the *global* batch when each rank's loss is the mean over its equal share.

    A rank where a parameter has no gradient contributes zeros; a parameter without a gradient on every rank keeps
    ``grad = None`` (the optimizer skips it, as in one process). No-op in one process. Every rank must call it with
    the same parameters in the same order."""
    if not is_distributed():
        return
    params = list(params)
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([present, *[p.grad for p in params]])
    for p, flag in zip(params, present.tolist()):
        if flag == 0:
            p.grad = None


def wrap_model(model: nn.Module, strategy: str = "ddp", *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` (already on its device) for data parallelism; a single process returns it unchanged.

    ``ddp``: returns a DistributedDataParallel wrapper (gradients averaged over ranks in backward).
    ``fsdp``: shards ``model`` in place with :func:`shard_model` (FSDP2) and returns the same object;
    gradients are reduce-scattered (averaged) over ranks in backward. ``find_unused_parameters`` is DDP-only.
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
    return shard_model(model)


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """Members of ``nn.ModuleList`` / ``nn.Sequential`` containers that own parameters (transformer / res blocks,
    layers of an MLP); if there are none, the root's direct children that own parameters."""
    blocks = [child for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
              for child in m.children() if any(True for _ in child.parameters())]
    if not blocks:
        blocks = [c for c in model.children() if any(True for _ in c.parameters())]
    return blocks


def shard_model(model: nn.Module, *, blocks: Callable[[nn.Module], list[nn.Module]] | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2 ``fully_shard``: each block, innermost first, then the root.

    Each block is one all-gather unit in forward / reduce-scatter unit in backward, so at most about one block's
    full parameters are materialised at a time. Buffers are not sharded (replicated on every rank).

    Args:
        model: the plain module, on its device, identical on every rank (same init seed).
        blocks: ``blocks(model) -> modules`` to shard individually; default :func:`_default_blocks`.
        reshard_after_forward: free gathered parameters after forward (re-gather in backward), ZeRO-3 style.
    Returns:
        ``model`` itself (its class becomes an ``FSDP<Name>`` subclass; parameter names are unchanged).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded")
    chosen = blocks(model) if blocks is not None else _default_blocks(model)
    order = {id(m): i for i, m in enumerate(model.modules())}
    for m in sorted({id(m): m for m in chosen if m is not model}.values(), key=lambda m: -order[id(m)]):
        fully_shard(m, reshard_after_forward=reshard_after_forward)  # children before their parents
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` was sharded with FSDP2 (:func:`shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a ``DTensor`` (a collective: every rank must call it); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) laid out like ``ref``: this rank's shard as a DTensor with ``ref``'s mesh
    and placements when ``ref`` is a DTensor (no communication), else ``full`` on ``ref``'s device/dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=ref.device, dtype=ref.dtype)
    if isinstance(ref, DTensor):
        return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    return full


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of an FSDP2 model on rank 0 (``{}`` on other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded CPU optimizer state on rank 0 (``{}`` elsewhere), keyed by parameter *index* in
    ``model.named_parameters()`` order, i.e. the layout of ``optimizer.state_dict()`` for an optimizer built
    over ``model.parameters()`` in one process. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not osd:
        return {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": {index[n]: entry for n, entry in osd["state"].items()}, "param_groups": groups}


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict, present on every rank, into an FSDP2 model (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # the load runs one collective per tensor in dict order, and a safetensors file's key order can differ between
    # processes: put the keys in the model's own order on every rank
    order = list(model.state_dict())
    state = {k: state[k] for k in order if k in state} | {k: v for k, v in state.items() if k not in order}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state_dict`: an index-keyed full optimizer state (on every rank) into the
    sharded optimizer of an FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    entries = sorted(state["state"].items(), key=lambda kv: int(kv[0]))  # same order on every rank (see above)
    osd = {"state": {names[int(i)]: dict(sorted(e.items())) for i, e in entries}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / ``torch.compile`` wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
