"""Exponential moving average of model weights (float32 shadow copy).

``shadow <- decay * shadow + (1 - decay) * param`` after every applied update; the decay comes from
:func:`simdiff.train.config.ema_decay` (EDM2 half-life in images). Floating buffers are copied, not averaged
(as in EDM's ``training_loop.py``); integer buffers are copied too. The state dict has the model's own keys,
so EMA weights load straight into a fresh model (``model.load_state_dict(ema.full_state_dict())``).

Under FSDP2 (:func:`simdiff.train.distributed.shard_model`) the parameters are ``DTensor`` shards and so is the
shadow: each rank averages only its own shard (no communication, ``1 / world_size`` of the memory).
:meth:`EMA.full_state_dict` gathers the full tensors (a collective) and :meth:`EMA.load_state_dict` takes full
tensors and keeps this rank's shard, so the EMA on disk is the same unsharded file as under DDP / one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from simdiff.train.distributed import full_tensor, shard_like

__all__ = ["EMA", "CHUNK"]

#: elements per fused chunk of the device-flag EMA update (bounds its temporary memory to 4 * CHUNK bytes)
CHUNK = 1 << 26


def _chunks(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive index ranges of ``sizes`` with at most :data:`CHUNK` elements each (or one tensor)."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > CHUNK:
            out.append((lo, i))
            lo, total = i, 0
        total += n
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


class EMA:
    """Float32 shadow of ``model``'s parameters and buffers.

    Args:
        model: the (unwrapped) module to track; the shadow lives on the same device.
    """

    def __init__(self, model: nn.Module):
        self.param_names = [n for n, _ in model.named_parameters()]
        self.shadow: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():
            t = t.detach()
            self.shadow[name] = t.float().clone() if t.is_floating_point() else t.clone()
        self._cache: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                           list[torch.Tensor]] | None = None

    def _lists(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(shadow params, live params, shadow buffers, live buffers), cached per model object."""
        if self._cache is None or self._cache[0] is not model:
            params = dict(model.named_parameters())
            buffers = [(n, b) for n, b in model.named_buffers() if n in self.shadow]
            self._cache = (model, [self.shadow[n] for n in self.param_names], [params[n] for n in self.param_names],
                           [self.shadow[n] for n, _ in buffers], [b for _, b in buffers])
        return self._cache[1:]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, *, apply: torch.Tensor | None = None) -> None:
        """``shadow = decay * shadow + (1 - decay) * param`` for parameters (one ``torch._foreach_lerp_`` over
        cached lists, the same numbers as a per-tensor ``lerp_``); buffers are copied.

        ``apply``: optional 0-dim bool tensor on the device; where False the shadow is left exactly as it is
        (weight 0; buffers keep their shadow), without reading the flag on the host. ``_foreach_lerp_`` takes its
        weight as a host scalar only, so this path computes ``shadow += w * (param - shadow)`` with the weight
        ``w`` as a device tensor (fused ``_foreach_sub`` / ``_foreach_mul_`` / ``_foreach_add_`` in chunks of at
        most :data:`CHUNK` elements): the same update up to float rounding (lerp may fuse the multiply-add).
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        shadow_p, live_p, shadow_b, live_b = self._lists(model)
        live_p = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in live_p]
        if apply is None:
            if shadow_p:
                torch._foreach_lerp_(shadow_p, live_p, 1.0 - decay)
            for s, b in zip(shadow_b, live_b):
                s.copy_(b.detach())
            return
        weight = torch.where(apply, 1.0 - decay, 0.0).to(torch.float32)
        for lo, hi in _chunks([t.numel() for t in shadow_p]):
            diff = torch._foreach_sub(live_p[lo:hi], shadow_p[lo:hi])
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(shadow_p[lo:hi], diff)
        for s, b in zip(shadow_b, live_b):
            s.copy_(torch.where(apply, b.detach().to(s.dtype), s))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (cast to each tensor's dtype)."""
        model.load_state_dict(self.shadow, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors (float32 for floating entries), keyed like ``model.state_dict()``; ``DTensor``
        shards for an FSDP2 model (use :meth:`full_state_dict` for plain full tensors)."""
        return dict(self.shadow)

    @torch.no_grad()
    def full_state_dict(self, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """The shadow as full (unsharded) tensors. With sharded (FSDP2) entries this is a collective: every rank
        must call it. ``rank0_only``: other ranks get ``{}`` (they still take part in the gathers)."""
        import torch.distributed as dist

        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        out = {}
        for name, t in self.shadow.items():
            full = full_tensor(t)  # gather one tensor at a time: peak memory is one full tensor
            if keep:
                out[name] = full
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow from full tensors (as on disk; each rank keeps its shard of sharded entries); keys
        and shapes must match (one-line ValueError naming the first mismatch)."""
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, t in state.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name!r}: shape {tuple(t.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(shard_like(t, self.shadow[name]))  # full -> this rank's shard if sharded

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model``; the live weights are restored on exit."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)
