"""Step grids: ``make_grid(schedule, steps, kind=...)`` -> float64 log-SNRs ``[steps + 1]``.

Layout (all kinds): ``[schedule.logsnr_min, steps - 1 interior points (increasing), +inf]``; the final +inf step
lands on data (x_hat at the last interior point). Kinds:

* "uniform_t": ``t_k = 1 - k / steps`` mapped through the schedule ("trailing" DDIM spacing, starts at t = 1;
  Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
* "quadratic_t": ``t_k = (1 - k / steps)^2`` (DDIM's quadratic spacing, Song et al. 2021 App. D.2), denser near data.
* "uniform_logsnr": ``logsnr_k = logsnr_min + k / steps (logsnr_max - logsnr_min)`` (DPM-Solver's "logSNR" spacing).
* "edm": Karras et al. 2022 eq. 5, ``sigma_k = (sigma_max^(1/rho) + k / (steps - 1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho`` in ``sigma_edm = exp(-logsnr / 2)`` between the schedule's ends; as in EDM the last
  finite point is sigma_min (logsnr_max) itself.
* "auto": the default policy of :mod:`simdiff.samplers.policy` (equal mass of a logistic density in log-SNR,
  ending at a finite level that rises with ``steps``), chosen by measurement on exact Gaussian-mixture denoisers.

Two grids depend on the model and so are not kinds here: "tuned" (fitted by ``simdiff tune-grid``,
:mod:`simdiff.samplers.tune_cli`) and "calibrated" (the "auto" logistic with its centre and width measured by a
pilot run of the model, :mod:`simdiff.samplers.calibrate`); :data:`MODEL_GRIDS` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.configuration import get_registered
from simdiff.samplers.policy import auto_interior

__all__ = ["GRID_KINDS", "MODEL_GRIDS", "make_grid"]

#: grids computed from the model (not from the schedule alone): they need the network or its run directory.
MODEL_GRIDS = ("tuned", "calibrated")


def _uniform_t(schedule, steps: int, rho: float) -> Tensor:
    t = 1 - torch.arange(1, steps, dtype=torch.float64) / steps
    return schedule.logsnr(t).to(torch.float64)


def _quadratic_t(schedule, steps: int, rho: float) -> Tensor:
    t = (1 - torch.arange(1, steps, dtype=torch.float64) / steps) ** 2
    return schedule.logsnr(t).to(torch.float64)


def _uniform_logsnr(schedule, steps: int, rho: float) -> Tensor:
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    return lo + (hi - lo) * torch.arange(1, steps, dtype=torch.float64) / steps


def _edm(schedule, steps: int, rho: float) -> Tensor:
    if steps < 2:
        return torch.zeros(0, dtype=torch.float64)
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    a, b = math.exp(-lo / (2 * rho)), math.exp(-hi / (2 * rho))  # sigma_max^(1/rho), sigma_min^(1/rho)
    frac = torch.arange(1, steps, dtype=torch.float64) / (steps - 1)
    return -2 * rho * torch.log(a + frac * (b - a))


GRID_KINDS: dict[str, Callable[..., Tensor]] = {
    "uniform_t": _uniform_t,
    "quadratic_t": _quadratic_t,
    "uniform_logsnr": _uniform_logsnr,
    "edm": _edm,
    "auto": auto_interior,
}


def make_grid(schedule, steps: int, *, kind: str = "uniform_t", rho: float = 7.0) -> Tensor:
    """Sampling grid ``[logsnr_min, interior..., +inf]`` of ``steps + 1`` float64 log-SNRs (see module doc).

    Args:
        schedule: a :class:`simdiff.schedules.Schedule` (``logsnr(t)``, ``logsnr_min``, ``logsnr_max``).
        steps: number of sampler steps (>= 1).
        kind: one of :data:`GRID_KINDS`.
        rho: EDM's rho (kind "edm" only).

    Raises:
        ValueError: unknown kind (lists valid ones), ``steps < 1``, ``rho <= 0``.
    """
    fn = get_registered(GRID_KINDS, kind, "grid kind")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"make_grid: steps must be an integer >= 1, got {steps}")
    if rho <= 0:
        raise ValueError(f"make_grid: rho must be > 0, got {rho}")
    steps = int(steps)
    interior = fn(schedule, steps, rho).reshape(-1)
    start = torch.tensor([float(schedule.logsnr_min)], dtype=torch.float64)
    return torch.cat([start, interior, torch.tensor([math.inf], dtype=torch.float64)])
