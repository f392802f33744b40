"""Masking schedules ``alpha(t)`` of absorbing-state (masked) diffusion: the probability that a token is still
unmasked at time ``t in [0, 1]``, decreasing from ``alpha(0) = 1`` to ``alpha(1)`` (0, or ``eps`` for log-linear).

* ``linear``: ``alpha(t) = 1 - t`` (Shi et al. 2024, MD4; Sahoo et al. 2024, MDLM).
* ``cosine``: ``alpha(t) = 1 - cos(pi/2 (1 - t))`` (MD4).
* ``log_linear``: MDLM's "log-linear" noise ``sigma(t) = -log(1 - (1 - eps) t)`` with ``alpha = exp(-sigma)``, i.e.
  ``alpha(t) = 1 - (1 - eps) t`` with ``eps = 1e-3`` (the value of MDLM's released code; not checked against the
  paper text). Its ``alpha(1) = eps > 0``: the prior term of the bound at ``t = 1`` is left out, as in MDLM.

The formulas follow the papers' definitions but were not checked against their text here (no equation or table
numbers are given for that reason).

Each schedule gives ``alpha``, its derivative ``dalpha`` and the inverse ``inverse(a)`` (the first-hitting sampler's
``alpha^{-1}``), all elementwise on tensors of any float dtype (use float64 for the bound and the sampler times).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from simdiff.configuration import ConfigError

__all__ = ["MaskSchedule", "LinearMask", "CosineMask", "LogLinearMask", "MASK_SCHEDULES", "get_mask_schedule"]


class MaskSchedule:
    """``alpha(t)``: keep-probability of a token at time ``t``; ``dalpha = d alpha / dt <= 0``."""

    name = "base"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dalpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, a: Tensor) -> Tensor:
        """``t`` with ``alpha(t) = a`` (``a`` clamped into the schedule's range)."""
        raise NotImplementedError

    def weight(self, t: Tensor) -> Tensor:
        """``-alpha'(t) / (1 - alpha(t))``: the weight of the masked-token cross-entropy in the continuous-time ELBO
        (MD4; MDLM). The tests check the bound it gives against its closed form."""
        return -self.dalpha(t) / (1 - self.alpha(t))


@dataclass(frozen=True)
class LinearMask(MaskSchedule):
    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def dalpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def inverse(self, a: Tensor) -> Tensor:
        return 1 - a.clamp(0, 1)


@dataclass(frozen=True)
class CosineMask(MaskSchedule):
    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - torch.cos(0.5 * math.pi * (1 - t))

    def dalpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def inverse(self, a: Tensor) -> Tensor:
        return 1 - torch.arccos(1 - a.clamp(0, 1)) * (2 / math.pi)


@dataclass(frozen=True)
class LogLinearMask(MaskSchedule):
    eps: float = 1e-3
    name = "log_linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1 - self.eps))

    def inverse(self, a: Tensor) -> Tensor:
        return ((1 - a) / (1 - self.eps)).clamp(0, 1)


MASK_SCHEDULES: dict[str, type[MaskSchedule]] = {"linear": LinearMask, "cosine": CosineMask,
                                                   "log_linear": LogLinearMask}


def get_mask_schedule(name: str) -> MaskSchedule:
    """The schedule called ``name`` (one of :data:`MASK_SCHEDULES`); unknown names raise a one-line ConfigError."""
    if name not in MASK_SCHEDULES:
        raise ConfigError(f"unknown mask schedule {name!r}; valid: {', '.join(sorted(MASK_SCHEDULES))}")
    return MASK_SCHEDULES[name]()
