"""Exponential moving average of model weights (float32 shadow copy).

``shadow <- decay * shadow + (1 - decay) * param`` after every applied update; the decay comes from
:func:`simdiff.train.config.ema_decay` (EDM2 half-life in images). Floating buffers are copied, not averaged
(as in EDM's ``training_loop.py``); integer buffers are copied too. The state dict has the model's own keys,
so EMA weights load straight into a fresh model (``model.load_state_dict(ema.state_dict())``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]


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

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """``shadow = decay * shadow + (1 - decay) * param`` for parameters; buffers are copied."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        params = dict(model.named_parameters())
        for name in self.param_names:
            self.shadow[name].lerp_(params[name].detach().float(), 1.0 - decay)
        for name, b in model.named_buffers():
            if name in self.shadow:
                self.shadow[name].copy_(b.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (cast to each tensor's dtype)."""
        model.load_state_dict(self.shadow, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors (float32 for floating entries), keyed like ``model.state_dict()``."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow; keys and shapes must match (one-line ValueError naming the first mismatch)."""
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, t in state.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name!r}: shape {tuple(t.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(t)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model``; the live weights are restored on exit."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)
