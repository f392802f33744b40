"""First-order samplers: ancestral DDPM and DDIM with stochasticity ``eta``.

DDPM: Ho et al. 2020, Alg. 2, written as the posterior q(z_s | z_t, x = x_hat) of Kingma et al. 2021 (VDM) eq. 26
(``simdiff.process.ddpm_step``). DDIM: Song et al. 2021 eq. 12 / 16 in log-SNR form; with ``r = SNR_t / SNR_s``
the added noise has variance ``eta^2 (1 - r) sigma_s^2`` (eq. 16's sigma_t(eta)) and the rest of ``sigma_s^2``
goes to the predicted-eps direction, so ``eta = 1`` is exactly the small-variance ancestral step.

Both run on any diagonal process (``process=``): the same updates hold per basis coordinate with the process's
coefficients (:meth:`simdiff.processes.GaussianProcess.ddim_coefficients`, ``.ddpm_step``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.processes import GaussianProcess
from simdiff.processes.isotropic import vp_ddim_coefficients as ddim_coefficients
from simdiff.samplers._common import Callback, Net, land, prepare_grid, to_state

__all__ = ["sample_ddpm", "sample_ddim", "ddim_coefficients"]


def _randn(z: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)


def sample_ddim(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12; eta as in eq. 16). One network call per step.

    Args:
        denoise: ``denoise(z, logsnr[B], **cond) -> DenoiserOutput``.
        z: ``[B, ...]`` state at ``logsnrs[0]`` (initial noise when sampling, data when inverting).
        logsnrs: ``[N + 1]`` strictly increasing (sampling; last may be +inf, which returns x_hat) or, with
            ``eta = 0``, strictly decreasing (DDIM inversion, finite).
        eta: 0 deterministic ... 1 = ancestral small-variance DDPM (same random draws as :func:`sample_ddpm`).
        generator, callback, cond: injectable randomness, per-step ``dict(i, z, x, logsnr)``, conditioning kwargs.
        process: the noising process (``None``: isotropic VP; then ``logsnrs`` are log-SNRs, else levels).

    Returns:
        ``[B, ...]`` in ``z.dtype``: the state at the last grid point (x_hat when it is +inf).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim: eta must be in [0, 1], got {eta}")
    grid = prepare_grid(logsnrs, name="ddim", allow_decreasing=eta == 0.0)
    net = Net(denoise, z, grid, cond, process)
    c_z, c_x, c_n = (to_state(c, z) for c in net.process.ddim_coefficients(grid.lam, eta))
    u = net.encode(z)
    for i in range(grid.steps):
        x = net.x(u, i)
        u = c_z[i] * u + c_x[i] * x
        if eta > 0:
            u = u + c_n[i] * net.encode(_randn(u, generator))  # white noise drawn in data space
        net.emit(callback, i, u, x, net.lam[i + 1])
    return land(net, u, grid, callback)


def sample_ddpm(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    variance: str = "small",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2): ``z_s ~ q(z_s | z_t, x = x_hat)``, VDM eq. 26-27.

    ``variance``: "small" (true posterior, (1 - r) sigma_s^2) or "large" ((1 - r) sigma_t^2, DDPM's beta_t). A final
    +inf step returns x_hat without noise (as DDPM's t = 1 step). Other args as :func:`sample_ddim`.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm: unknown variance {variance!r}; valid: small, large")
    grid = prepare_grid(logsnrs, name="ddpm", allow_decreasing=False)
    net = Net(denoise, z, grid, cond, process)
    u = net.encode(z)
    for i in range(grid.steps):
        x = net.x(u, i)
        noise = net.encode(_randn(u, generator))  # drawn in data space: the same draws in every basis
        u = net.process.ddpm_step(
            z_t=u, x=x, lam_s=net.lam[i + 1], lam_t=net.lam[i], noise=noise, variance=variance, encoded=True
        ).to(u.dtype)
        net.emit(callback, i, u, x, net.lam[i + 1])
    return land(net, u, grid, callback)
