"""Device-side bookkeeping of the training step: the non-finite check, the skip counts and the logged loss.

Everything is kept in 0-dim tensors on the training device and updated with tensor ops, so a training step never
waits for the device; the host reads the whole state in one transfer (:meth:`StepGuard.read`) at the log, hook and
checkpoint steps and at least every ``max_consecutive`` steps.

Semantics (as with a host-side check every step): an update is *applied* when the all-reduced loss and the gradient
norm are both finite; otherwise it is *skipped* and counted. When ``max_consecutive`` consecutive updates have been
skipped the guard *trips* at that step: from then on no update is applied (the weights, optimizer state and EMA stay
as they were at the trip) and nothing more is counted, so an abort raised at the next read reports, and leaves, the
state of the step where the limit was reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepGuard", "GuardState", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite (NaN/inf) losses or gradients."""


@dataclass(frozen=True)
class GuardState:
    """A host copy of the guard: counts, the trip step (-1: none), the loss and grad norm of the latest skipped
    update, the mean loss over the applied updates since the previous read (NaN: none), the last grad norm, and the
    float64 sum behind that mean (``window_sum`` / ``window_count``: what a checkpoint stores so that the first
    logged mean after a resume equals the uninterrupted run's)."""

    total: int
    consecutive: int
    tripped_at: int
    bad_loss: float
    bad_grad_norm: float
    window_loss: float
    window_count: int
    grad_norm: float
    window_sum: float = 0.0


class StepGuard:
    """Non-finite check and counters on ``device``; see the module docstring.

    Args:
        device: where the loss and gradients live.
        max_consecutive: trip after this many consecutive skipped updates.
        total, consecutive: initial counts (restored from a checkpoint).
        window_sum, window_count: the loss window to continue (restored from a checkpoint; float64 sum).
    """

    def __init__(self, device: torch.device, max_consecutive: int, *, total: int = 0, consecutive: int = 0,
                 window_sum: float = 0.0, window_count: int = 0):
        self.max_consecutive = int(max_consecutive)
        i64 = {"dtype": torch.int64, "device": device}
        f64 = {"dtype": torch.float64, "device": device}
        self.total = torch.tensor(total, **i64)
        self.consecutive = torch.tensor(consecutive, **i64)
        self.tripped_at = torch.tensor(-1, **i64)
        self.bad = torch.full((2,), math.nan, **f64)
        self.loss_sum = torch.tensor(float(window_sum), **f64)
        self.loss_count = torch.tensor(int(window_count), **i64)
        self.grad_norm = torch.full((), math.nan, **f64)

    @torch.no_grad()
    def update(self, step: int, loss: Tensor, grad_norm: Tensor) -> Tensor:
        """Record update ``step`` with its all-reduced ``loss`` and pre-clipping ``grad_norm`` (0-dim tensors on the
        device); return the 0-dim bool tensor "apply this update"."""
        loss, grad_norm = loss.detach().double(), grad_norm.detach().double()
        live = self.tripped_at < 0
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        apply = live & finite
        skipped = live & ~finite
        self.total += skipped
        self.consecutive = torch.where(apply, 0, self.consecutive + skipped)
        self.tripped_at = torch.where(live & (self.consecutive >= self.max_consecutive), step, self.tripped_at)
        self.bad = torch.where(skipped, torch.stack([loss, grad_norm]), self.bad)
        self.loss_sum += torch.where(apply, loss, 0.0)
        self.loss_count += apply
        self.grad_norm = grad_norm
        return apply

    def read(self, *, new_window: bool = False) -> GuardState:
        """One device -> host transfer of the state; ``new_window``: start a new loss window after reading."""
        packed = torch.cat([torch.stack([self.total, self.consecutive, self.tripped_at, self.loss_count]).double(),
                            self.bad, torch.stack([self.loss_sum, self.grad_norm])]).tolist()
        total, consecutive, tripped, count, bad_loss, bad_norm, loss_sum, grad_norm = packed
        if new_window:
            self.loss_sum.zero_()
            self.loss_count.zero_()
        return GuardState(total=int(total), consecutive=int(consecutive), tripped_at=int(tripped), bad_loss=bad_loss,
                          bad_grad_norm=bad_norm, window_loss=loss_sum / count if count else math.nan,
                          window_count=int(count), grad_norm=grad_norm, window_sum=loss_sum)
