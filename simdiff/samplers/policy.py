"""The default step-grid policy ("auto"): a closed-form rule in log-SNR, chosen by measurement.

``steps`` network calls = ``steps`` finite levels, then the final step to data (+inf, x_hat at the last level):

    lambda_k = mu + s logit(F_lo + k / (steps - 1) (F_end - F_lo)),   k = 0 .. steps - 1,
    F_x = sigmoid((x - mu) / s),  lo = schedule.logsnr_min,  end = min(schedule.logsnr_max, (1 + 2 steps) / 3)

(``lambda`` here is the log-SNR). The levels carry equal mass of a logistic density in log-SNR centred at
``mu = 2`` with scale ``s = 2.5``: dense where a data distribution's structure is decided (log-SNR about -3 to 7
for data of unit scale; below, x_hat is nearly the mean and an exponential integrator is nearly exact), and the
grid ends at a finite level that rises with the budget (3 at 4 calls, 7 at 10, 13.7 at 20): with few calls the
final x_hat step to data is taken early (the steps are spent where the trajectory is decided), with more calls
late. The rule depends on the schedule only through its range, so one rule serves every training schedule.

How it was chosen: on exact Gaussian-mixture denoisers (``simdiff.toy``) x four training schedules (diffusers'
linear, scaled_linear, squaredcos_cap_v2 and simdiff's shifted cosine), the "train" set of
``benchmarks/samplers.py`` (48 problems: dimensions 2, 16 and 64, component stds 0.03-0.3, 8 or 16 components,
two class-conditional mixtures with guidance 2 and 3), minimising the geometric-mean RMSE ratio to the best of
UniPC / DPM-Solver++(3M) on the "trailing" uniform-t grid at 4-15 calls. Tried: centres -1 to 3, scales 1.5 to
4.5, fixed ends 6-12 and ends ``c + steps / k``; ending at the schedule's logsnr_max was worse at every budget up to
20 calls; on this grid UniPC bh2 order 3 beat bh1, DPM-Solver++ 2M and 3M. The report on the held-out "heldout"
set (other seeds, component counts, widths and dimensions) is in BENCHMARKS.md.

Limits: on the shipped MNIST model (MNIST-FD of 500 samples, one seed) this grid was not better than UniPC on the
"uniform_t" or "uniform_logsnr" grids at 5-10 calls, and a lower, wider logistic (centre -2, scale 4, same end
rule) was better there while losing on the mixtures at 8+ calls: images decide their structure at lower log-SNR
than these mixtures, so the centre is data-dependent and the constants here are the mixtures' choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AUTO_MU", "AUTO_SCALE", "END_BASE", "END_SLOPE", "DEFAULT_SAMPLER", "logistic_levels",
           "auto_end", "auto_interior"]

AUTO_MU = 2.0
AUTO_SCALE = 2.5
END_BASE = 1.0 / 3.0
END_SLOPE = 2.0 / 3.0
#: the sampler the policy was chosen with (UniPC bh2, order 3).
DEFAULT_SAMPLER = "unipc"


def auto_end(schedule, steps: int) -> float:
    """The last finite level of the "auto" grid: ``min(logsnr_max, (1 + 2 steps) / 3)``."""
    return min(float(schedule.logsnr_max), END_BASE + END_SLOPE * steps)


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
