"""Stochastic sampler: DPM-Solver++(2M) SDE (Lu et al. 2022, DPM-Solver++, sec. 5 / App. "SDE solvers"; the
second-order "midpoint" form popularised by k-diffusion's ``sample_dpmpp_2m_sde``), written in log-SNR form.

With ``h = lambda_s - lambda_t`` (``lambda = logsnr / 2``) and stochasticity ``eta`` in [0, 1]:

    z_s = (sigma_s / sigma_t) e^(-eta h) z_t + alpha_s (1 - e^-((1 + eta) h)) D + sigma_s sqrt(1 - e^(-2 eta h)) xi,

``D = (1 + 1/(2r)) x_i - 1/(2r) x_(i-1)`` (``r = h_(i-1) / h_i``; first step ``D = x_i``). ``eta = 1`` is the
SDE solver (its first-order form is exactly the ancestral small-variance step), ``eta = 0`` is DPM-Solver++(2M).
A final +inf step returns x_hat (no noise). Isotropic process only. ``noise=`` takes a noise source
(:class:`simdiff.samplers.noise.BrownianTreeNoise`: the same Brownian path on every grid, so runs converge as the
grid is refined; with its SNR clock the eta = 1 first-order noise term is the exact Ito integral).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.process import alpha_sigma, sigma_ratio
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import Callback, Net, prepare_grid, require_isotropic, to_state
from simdiff.samplers.dpm_solver import dpmpp_2m_weights, multistep_loop
from simdiff.samplers.noise import NoiseSource

__all__ = ["sample_dpmpp_2m_sde"]


def sample_dpmpp_2m_sde(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    eta: float = 1.0,
    noise: NoiseSource | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE; one network call per step. Signature as :func:`simdiff.samplers.sample_ddim`
    (increasing grids only when ``eta > 0``); isotropic process only."""
    require_isotropic(process, "sde")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"sde: eta must be in [0, 1], got {eta}")
    grid = prepare_grid(logsnrs, name="sde", allow_decreasing=eta == 0.0)
    net = Net(denoise, z, grid, cond, process)
    lam = grid.lam
    h = 0.5 * torch.diff(lam)
    a_s, s_s = alpha_sigma(lam[1:])
    ratio = sigma_ratio(logsnr_s=lam[1:], logsnr_t=lam[:-1]) * torch.exp(-eta * h)
    scale = s_s * (-torch.expm1(-2 * eta * h)).clamp_min(0).sqrt()
    weights = dpmpp_2m_weights(h, scale=-torch.expm1(-(1 + eta) * h))
    return multistep_loop(
        net,
        net.encode(z),
        grid,
        ratio=to_state(ratio, z),
        alpha_next=to_state(a_s, z),
        weights=[to_state(w, z) for w in weights],
        noise=to_state(scale, z) if eta > 0 else None,
        generator=generator,
        source=noise,
        callback=callback,
    )
