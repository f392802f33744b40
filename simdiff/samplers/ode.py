"""Probability-flow ODE samplers (Euler, Heun) and a high-accuracy reference solver.

Euler and Heun follow Karras et al. 2022 (EDM) Alg. 1: the ODE is integrated in the well-conditioned variables
``y = z / alpha`` and ``sigma_edm = sigma / alpha = exp(-logsnr / 2)``, where it reads
``dy / dsigma_edm = (y - x_hat) / sigma_edm = eps_hat``. Mapped back to z (``z = alpha y``) an Euler step is
``z_s = (alpha_s / alpha_t) z_t + (sigma_s - alpha_s sigma_t / alpha_t) eps_hat``, which is algebraically the
DDIM step (EDM sec. 3 notes DDIM is Euler in these variables). Heun averages ``eps_hat`` at both ends (2 calls
per step); its final step to +inf is an Euler step, i.e. x_hat (EDM Alg. 1 line 8 skips the correction at 0).

:func:`solve_reference` integrates ``dz / dlambda = alpha (x_hat - alpha z)`` with ``lambda = logsnr / 2`` by
scipy's DOP853 in float64: z stays O(1) and the right-hand side is bounded over the whole range. With a diagonal
``process`` it integrates, per basis coordinate ``u = encode(z)``, the PF-ODE in the level ``lam``:

    du/dlam = (dlog sigma/dlam) u + alpha (dlambda/dlam) x_hat,     lambda = log alpha - log sigma,

the expectation over x given u of the velocity of ``u = alpha x + sigma eps`` at fixed (x, eps); coefficient
derivatives by autograd in float64. Euler and Heun need the isotropic process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from simdiff.process import alpha_sigma, expand, log_alpha_sigma
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import Callback, Net, land, prepare_grid, require_isotropic, to_state

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


def _ode_sampler(denoise, z, logsnrs, *, heun: bool, callback, cond, name: str, process) -> Tensor:
    require_isotropic(process, name)
    grid = prepare_grid(logsnrs, name=name, allow_decreasing=True)
    net = Net(denoise, z, grid, cond, process)
    ratio, c = (to_state(t, z) for t in _edm_coefficients(grid.lam))
    for i in range(grid.steps):
        out = net(z, i)
        eps = out.eps.to(z.dtype)
        z_next = ratio[i] * z + c[i] * eps
        if heun:
            eps2 = net(z_next, i + 1).eps.to(z.dtype)
            z_next = ratio[i] * z + c[i] * (0.5 * (eps + eps2))
        z = z_next
        net.emit(callback, i, z, out.x.to(z.dtype), net.lam[i + 1])
    return land(net, z, grid, callback)


def sample_euler(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Euler on the PF-ODE in (y, sigma_edm) (EDM Alg. 1 without the correction); 1 call per step.

    Same signature and grid rules as :func:`simdiff.samplers.sample_ddim` (decreasing grids invert);
    ``generator`` is unused; isotropic process only.
    """
    return _ode_sampler(denoise, z, logsnrs, heun=False, callback=callback, cond=cond, name="euler", process=process)


def sample_heun(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Heun's 2nd-order method on the PF-ODE (EDM Alg. 1, S_churn = 0): 2 calls per finite step, 1 for the
    final step to +inf (``2 N - 1`` for an N-step grid ending at +inf). ``generator`` is unused; isotropic
    process only."""
    return _ode_sampler(denoise, z, logsnrs, heun=True, callback=callback, cond=cond, name="heun", process=process)


def solve_reference(
    denoise: Callable,
    z: Tensor,
    *,
    logsnr_start: float,
    logsnr_end: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Reference PF-ODE solution: DOP853 (scipy ``solve_ivp``) in float64, returns x_hat at ``logsnr_end``.

    The ODE ``dz / dlambda = alpha (x_hat(z, 2 lambda) - alpha z)``, ``lambda = logsnr / 2``, is the PF-ODE of the
    VP process (Song et al. 2021, score SDE, eq. 13) in log-SNR time; it is integrated from ``logsnr_start`` to
    ``logsnr_end`` (either direction, both finite) and the x-prediction there is returned. A sampler grid whose last
    finite point is ``logsnr_end`` followed by +inf returns the same quantity, so the two compare directly; for a
    large ``logsnr_end`` (e.g. the schedule's ``logsnr_max``) it is the sample up to a negligible O(sigma^2) term.

    Args:
        z: ``[B, ...]`` state at ``logsnr_start`` (any dtype/device; solved in float64 on the CPU).
        process: a diagonal process (then ``logsnr_start``/``logsnr_end`` are its levels); ``None`` = isotropic.

    Returns:
        ``[B, ...]`` float64 on ``z``'s device.
    """
    if not (np.isfinite(logsnr_start) and np.isfinite(logsnr_end)) or logsnr_start == logsnr_end:
        raise ValueError(f"solve_reference: need finite, distinct logsnr_start/end, got {logsnr_start}, {logsnr_end}")
    if process is not None and not process.isotropic:
        return _solve_reference_process(denoise, z, process, logsnr_start, logsnr_end, rtol, atol, dict(cond or {}))
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


def _level_derivatives(fn: Callable, lam: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Values and element-wise derivatives ``d fn(lam) / d lam`` of a tuple-valued ``fn`` of a 0-d ``lam``.

    Reverse mode twice (the vector-Jacobian product with a dummy ``v`` is linear in ``v``; its gradient in ``v`` is the
    Jacobian column), so no forward-mode machinery is needed.
    """
    with torch.enable_grad():
        lam = lam.detach().requires_grad_(True)
        outs = fn(lam)
        derivs = []
        for y in outs:
            v = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, lam, grad_outputs=v, create_graph=True)
            derivs.append(torch.autograd.grad(g, v)[0])
    return [y.detach() for y in outs], derivs


def _solve_reference_process(denoise, z, process, lam_start, lam_end, rtol, atol, cond) -> Tensor:
    """:func:`solve_reference` for a diagonal process: DOP853 on ``u = encode(z)`` in the level (module doc)."""
    shape, batch = z.shape, z.shape[0]
    u0 = process.encode(z.detach().to(device="cpu", dtype=torch.float64))

    def coefficients(lam: Tensor) -> tuple[Tensor, Tensor]:
        (la, _), (dla, dls) = _level_derivatives(process.log_alpha_sigma, lam)
        return process.fit(dls, lam=lam, like=u0), process.fit(la.exp() * (dla - dls), lam=lam, like=u0)

    def rhs(level: float, y: np.ndarray) -> np.ndarray:
        u = torch.from_numpy(y).view(shape)
        lam = torch.tensor(level, dtype=torch.float64)
        dls, gain = coefficients(lam)
        with torch.no_grad():
            x = denoise(process.decode(u), lam.expand(batch), **cond).x.to(torch.float64)
        return (dls * u + gain * process.encode(x)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (lam_start, lam_end), u0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_reference: DOP853 failed: {sol.message}")
    u_end = torch.from_numpy(sol.y[:, -1].copy()).view(shape)
    with torch.no_grad():
        x = denoise(process.decode(u_end), torch.full((batch,), float(lam_end), dtype=torch.float64), **cond).x
    return x.to(dtype=torch.float64).to(z.device)
