"""Probability-flow ODE samplers (Euler, Heun) and a high-accuracy reference solver.

Euler and Heun follow Karras et al. 2022 (EDM) Alg. 1: the ODE is integrated in the well-conditioned variables
``y = z / alpha`` and ``sigma_edm = sigma / alpha = exp(-logsnr / 2)``, where it reads
``dy / dsigma_edm = (y - x_hat) / sigma_edm = eps_hat``. Mapped back to z (``z = alpha y``) an Euler step is
``z_s = (alpha_s / alpha_t) z_t + (sigma_s - alpha_s sigma_t / alpha_t) eps_hat``, which is algebraically the
DDIM step (EDM sec. 3 notes DDIM is Euler in these variables). Heun averages ``eps_hat`` at both ends (2 calls
per step); its final step to +inf is an Euler step, i.e. x_hat (EDM Alg. 1 line 8 skips the correction at 0).

:func:`solve_reference` integrates ``dz / dlambda = alpha (x_hat - alpha z)`` with ``lambda = logsnr / 2`` by
scipy's DOP853 in float64: z stays O(1) and the right-hand side is bounded over the whole range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from simdiff.process import alpha_sigma, expand, log_alpha_sigma
from simdiff.samplers._common import Callback, Net, emit, prepare_grid, to_state

__all__ = ["sample_euler", "sample_heun", "solve_reference"]


def _edm_coefficients(lam: Tensor) -> tuple[Tensor, Tensor]:
    """Per-step ``(alpha_s / alpha_t, sigma_s - alpha_s sigma_t / alpha_t)``, each ``[M]``."""
    ls, lt = lam[1:], lam[:-1]
    la_s, _ = log_alpha_sigma(ls)
    la_t, _ = log_alpha_sigma(lt)
    ratio = torch.exp(la_s - la_t)
    _, s_s = alpha_sigma(ls)
    _, s_t = alpha_sigma(lt)
    return ratio, s_s - ratio * s_t


def _ode_sampler(denoise, z, logsnrs, *, heun: bool, callback, cond, name: str) -> Tensor:
    grid = prepare_grid(logsnrs, name=name, allow_decreasing=True)
    net = Net(denoise, z, grid, cond)
    ratio, c = (to_state(t, z) for t in _edm_coefficients(grid.lam))
    for i in range(grid.steps):
        out = net(z, i)
        eps = out.eps.to(z.dtype)
        z_next = ratio[i] * z + c[i] * eps
        if heun:
            eps2 = net(z_next, i + 1).eps.to(z.dtype)
            z_next = ratio[i] * z + c[i] * (0.5 * (eps + eps2))
        z = z_next
        emit(callback, i, z, out.x.to(z.dtype), net.lam[i + 1])
    if grid.final_inf:
        z = net.x(z, grid.steps)
        emit(callback, grid.steps, z, z, torch.full_like(net.lam[0], float("inf")))
    return z


def sample_euler(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
) -> Tensor:
    """Euler on the PF-ODE in (y, sigma_edm) (EDM Alg. 1 without the correction); 1 call per step.

    Same signature and grid rules as :func:`simdiff.samplers.sample_ddim` (decreasing grids invert);
    ``generator`` is unused.
    """
    return _ode_sampler(denoise, z, logsnrs, heun=False, callback=callback, cond=cond, name="euler")


def sample_heun(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
) -> Tensor:
    """Heun's 2nd-order method on the PF-ODE (EDM Alg. 1, S_churn = 0): 2 calls per finite step, 1 for the
    final step to +inf (``2 N - 1`` for an N-step grid ending at +inf). ``generator`` is unused."""
    return _ode_sampler(denoise, z, logsnrs, heun=True, callback=callback, cond=cond, name="heun")


def solve_reference(
    denoise: Callable,
    z: Tensor,
    *,
    logsnr_start: float,
    logsnr_end: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    cond: dict | None = None,
) -> Tensor:
    """Reference PF-ODE solution: DOP853 (scipy ``solve_ivp``) in float64, returns x_hat at ``logsnr_end``.

    The ODE ``dz / dlambda = alpha (x_hat(z, 2 lambda) - alpha z)``, ``lambda = logsnr / 2``, is the PF-ODE of the
    VP process (Song et al. 2021, score SDE, eq. 13) in log-SNR time; it is integrated from ``logsnr_start`` to
    ``logsnr_end`` (either direction, both finite) and the x-prediction there is returned. A sampler grid whose last
    finite point is ``logsnr_end`` followed by +inf returns the same quantity, so the two compare directly; for a
    large ``logsnr_end`` (e.g. the schedule's ``logsnr_max``) it is the sample up to a negligible O(sigma^2) term.

    Args:
        z: ``[B, ...]`` state at ``logsnr_start`` (any dtype/device; solved in float64 on the CPU).

    Returns:
        ``[B, ...]`` float64 on ``z``'s device.
    """
    if not (np.isfinite(logsnr_start) and np.isfinite(logsnr_end)) or logsnr_start == logsnr_end:
        raise ValueError(f"solve_reference: need finite, distinct logsnr_start/end, got {logsnr_start}, {logsnr_end}")
    cond = dict(cond or {})
    shape, batch = z.shape, z.shape[0]
    z0 = z.detach().to(device="cpu", dtype=torch.float64)

    def rhs(lam_half: float, y: np.ndarray) -> np.ndarray:
        zt = torch.from_numpy(y).view(shape)
        logsnr = torch.full((batch,), 2.0 * lam_half, dtype=torch.float64)
        with torch.no_grad():
            x = denoise(zt, logsnr, **cond).x.to(torch.float64)
        a, _ = alpha_sigma(expand(logsnr, zt))
        return (a * (x - a * zt)).reshape(-1).numpy()

    sol = solve_ivp(
        rhs, (0.5 * logsnr_start, 0.5 * logsnr_end), z0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol
    )
    if not sol.success:
        raise RuntimeError(f"solve_reference: DOP853 failed: {sol.message}")
    z_end = torch.from_numpy(sol.y[:, -1].copy()).view(shape)
    with torch.no_grad():
        x = denoise(z_end, torch.full((batch,), float(logsnr_end), dtype=torch.float64), **cond).x
    return x.to(dtype=torch.float64).to(z.device)
