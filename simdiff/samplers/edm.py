"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the design space...", Algorithm 2) in log-SNR form.

Algorithm 2 works in the variance-exploding variables ``y = z / alpha`` and ``t = sigma_edm = exp(-logsnr / 2)``.
Per step i (N = number of steps):

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= t_i <= S_tmax else 0
    t_hat   = (1 + gamma_i) t_i                      (logsnr_hat = logsnr_i - 2 log(1 + gamma_i))
    y_hat   = y_i + sqrt(t_hat^2 - t_i^2) S_noise xi    ("churn": noise raises the level)
    Heun step from t_hat to t_(i+1) with d = (y - D(y; t)) / t; Euler (no correction) when t_(i+1) = 0.

Here the state is the VP ``z = alpha y``, so the Heun step is the one of :func:`simdiff.samplers.sample_heun`
between ``logsnr_hat`` and ``logsnr_(i+1)``, and a final +inf step returns ``x_hat`` (the Euler step to t = 0).
With ``churn = 0`` the sampler is exactly Heun (Alg. 1). Cost: 2 calls per finite step, 1 for the final step (as
Heun: ``2 steps - 1``). Verified against the authors' published sampler code (the gamma clamp, ``t_hat``, the
noise ``sqrt(t_hat^2 - t^2) S_noise``, the Euler step from ``t_hat`` and the correction skipped on the last step,
with N = the number of steps including the one to t = 0); the paper's PDF itself was not re-read here, nor its
per-dataset settings (S_churn, S_tmin, S_tmax, S_noise), which are therefore not defaults. Isotropic process only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.process import alpha_sigma
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import Callback, Net, land, prepare_grid, require_isotropic, to_state
from simdiff.samplers.noise import IIDNoise, NoiseSource

__all__ = ["sample_edm"]


def _heun_coefficients(lam_t: Tensor, lam_s: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_s / alpha_t, sigma_s - alpha_s sigma_t / alpha_t)`` for an EDM Euler step in VP coordinates."""
    a_t, s_t = alpha_sigma(lam_t)
    a_s, s_s = alpha_sigma(lam_s)
    ratio = a_s / a_t
    return ratio, s_s - ratio * s_t


def sample_edm(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: NoiseSource | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """EDM Algorithm 2 (stochastic Heun with churn); ``churn = 0`` is deterministic Heun.

    Args:
        churn: ``S_churn`` (>= 0); ``gamma = min(churn / N, sqrt(2) - 1)`` with N the number of steps.
        s_tmin, s_tmax: churn only where ``sigma_edm = exp(-logsnr / 2)`` is in ``[s_tmin, s_tmax]``.
        s_noise: ``S_noise`` (> 0), scales the added noise.
        noise: a noise source (:mod:`simdiff.samplers.noise`), called for step i's interval ``logsnr_i ->
            logsnr_(i+1)`` (the Brownian increments of a partition, so a Brownian tree gives the same path on every
            grid); default: i.i.d. draws from ``generator``.
        Other args as :func:`simdiff.samplers.sample_ddim` (increasing grids only).
    """
    require_isotropic(process, "edm")
    if churn < 0 or s_noise <= 0 or s_tmin < 0 or s_tmax < s_tmin:
        raise ValueError(f"edm: need churn >= 0, s_noise > 0, 0 <= s_tmin <= s_tmax; got {churn}, {s_noise}, "
                         f"{s_tmin}, {s_tmax}")
    grid = prepare_grid(logsnrs, name="edm", allow_decreasing=False)
    net = Net(denoise, z, grid, cond, process)
    source = IIDNoise(generator) if noise is None else noise
    lam = grid.lam
    n = grid.steps + int(grid.final_inf)
    gamma_max = min(churn / max(n, 1), math.sqrt(2) - 1)
    sig = torch.exp(-0.5 * lam.detach())
    gamma = torch.where((sig >= s_tmin) & (sig <= s_tmax), torch.full_like(sig, gamma_max), torch.zeros_like(sig))
    lam_hat = lam - 2 * torch.log1p(gamma)  # [M + 1]
    # churn: z_hat = (alpha_hat / alpha) z + alpha_hat sqrt(t_hat^2 - t^2) s_noise xi
    a_i, _ = alpha_sigma(lam)
    a_h, _ = alpha_sigma(lam_hat)
    t2 = torch.exp(-lam)
    add = a_h * torch.sqrt((t2 * ((1 + gamma) ** 2 - 1)).clamp_min(0)) * s_noise
    keep = a_h / a_i
    ratio, c = _heun_coefficients(lam_hat[:-1], lam[1:])
    keep, add, ratio, c = (to_state(t, z) for t in (keep, add, ratio, c))
    host_hat = lam_hat.detach()
    churned = [bool(g > 0) for g in gamma]

    def churn_at(u: Tensor, i: int) -> tuple[Tensor, Tensor]:
        if not churned[i]:
            return u, net.lam[i]
        xi = source(u, float(net.host_lam[i]), float(net.host_lam[i + 1]) if i < grid.steps else math.inf)
        return keep[i] * u + add[i] * xi, to_state(lam_hat[i], z).expand(())

    def x_at(u: Tensor, level: Tensor, i: int) -> Tensor:
        kw = {**net.cond, "host_level": float(host_hat[i])} if net.host_level else net.cond
        out = net.denoise(net.decode(u), level.expand(net.batch), **kw)
        return net.encode(out.x.to(net.dtype))

    u = net.encode(z)
    for i in range(grid.steps):
        u_hat, level = churn_at(u, i)
        x = x_at(u_hat, level, i) if churned[i] else net.x(u_hat, i)
        eps = (u_hat - to_state(alpha_sigma(lam_hat[i])[0], z) * x) / to_state(alpha_sigma(lam_hat[i])[1], z)
        u_next = ratio[i] * u_hat + c[i] * eps
        x2 = net.x(u_next, i + 1)
        a_s, s_s = (to_state(v, z) for v in alpha_sigma(lam[i + 1]))
        eps2 = (u_next - a_s * x2) / s_s
        u = ratio[i] * u_hat + c[i] * (0.5 * (eps + eps2))
        net.emit(callback, i, u, x, net.lam[i + 1])
    if grid.final_inf and churned[grid.steps]:
        u_hat, level = churn_at(u, grid.steps)
        return land(net, u_hat, grid, callback, x=x_at(u_hat, level, grid.steps))
    return land(net, u, grid, callback)
