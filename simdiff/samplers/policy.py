"""The default step-grid policy ("auto"): a closed-form rule in log-SNR, chosen by measurement.

``steps`` network calls = ``steps`` finite levels, then the final step to data (+inf, x_hat at the last level):

    lambda_k = mu + s logit(F_lo + k / (steps - 1) (F_end - F_lo)),   k = 0 .. steps - 1,
    F_x = sigmoid((x - mu) / s),  lo = schedule.logsnr_min,  end = min(schedule.logsnr_max, END_BASE + steps / 3)

(``lambda`` here is the log-SNR). The levels carry equal mass of a logistic density in log-SNR centred at
``mu = 2`` with scale ``s = 2.5``: dense where a data distribution's structure is decided (log-SNR about -3 to 7
for data of unit scale; nothing changes below, where x_hat is the mean, and an exponential integrator is exact
there), and the grid ends at a finite level that rises with the budget (6 at 4 calls, 10 at 20), so the final
x_hat step to data is taken from where the remaining ODE path is short. The rule depends on the schedule only
through its range, so one rule serves every training schedule.

How it was chosen: on exact Gaussian-mixture denoisers (``simdiff.toy``; 2-D and 64-D, component stds 0.03-0.3,
8 components, one class-conditional mixture with guidance 3) and four training schedules (diffusers' linear,
scaled_linear, squaredcos_cap_v2 and simdiff's shifted cosine), the geometric-mean RMSE ratio to the best of
DPM-Solver++(2M/3M) / UniPC on the "trailing" uniform-t grid was minimised over mu, s and the end rule at 4-20
calls (end rules ``c + steps / k`` and fixed ends 6-12 tried; UniPC bh2 order 3 beat bh1, DPM-Solver++ 2M and 3M
on this grid). The held-out report (other seeds, 16 components, other stds and dimension 16, guidance 2) is in
BENCHMARKS.md; see ``benchmarks/samplers.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AUTO_MU", "AUTO_SCALE", "END_BASE", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "logistic_levels", "auto_end",
           "auto_interior"]

AUTO_MU = 2.0
AUTO_SCALE = 2.5
END_BASE = 4.0
#: the sampler the policy was chosen with (UniPC bh2, order 3).
DEFAULT_SAMPLER = "unipc"
DEFAULT_STEPS = 10


def auto_end(schedule, steps: int) -> float:
    """The last finite level of the "auto" grid: ``min(logsnr_max, END_BASE + steps / 3)``."""
    return min(float(schedule.logsnr_max), END_BASE + steps / 3)


def logistic_levels(lo: float, end: float, count: int, *, mu: float = AUTO_MU, scale: float = AUTO_SCALE) -> Tensor:
    """``count`` float64 levels from ``lo`` to ``end`` (both included) at equal mass of logistic(mu, scale).

    Raises:
        ValueError: ``count < 2``, ``lo >= end`` or ``scale <= 0``.
    """
    if count < 2 or not lo < end or scale <= 0:
        raise ValueError(f"logistic_levels: need count >= 2, lo < end, scale > 0; got {count}, {lo}, {end}, {scale}")
    f_lo, f_end = torch.sigmoid(torch.tensor([(lo - mu) / scale, (end - mu) / scale], dtype=torch.float64))
    q = f_lo + (f_end - f_lo) * torch.arange(count, dtype=torch.float64) / (count - 1)
    lam = mu + scale * torch.logit(q)
    lam[0], lam[-1] = lo, end
    return lam


def auto_interior(schedule, steps: int, rho: float = 7.0) -> Tensor:
    """The ``steps - 1`` interior levels of the "auto" grid (the :data:`GRID_KINDS` entry; ``rho`` unused)."""
    if steps < 2:
        return torch.zeros(0, dtype=torch.float64)
    lo = float(schedule.logsnr_min)
    end = auto_end(schedule, steps)
    if not end > lo:  # a schedule whose whole range lies above the rule's end: uniform in log-SNR to logsnr_max
        end = float(schedule.logsnr_max)
        return lo + (end - lo) * torch.arange(1, steps, dtype=torch.float64) / (steps - 1)
    return logistic_levels(lo, end, steps)[1:]
