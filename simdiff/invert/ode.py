"""Exact inversion of the probability-flow ODE (the reference the discretised inversions are measured against).

The PF-ODE of a diagonal process in basis coordinates ``u = encode(z)``, with the level ``lam`` as time, is

    du/dlam = (dlog sigma/dlam) u + alpha (dlog alpha/dlam - dlog sigma/dlam) x_hat(z, lam)

(for the isotropic VP process ``0.5 alpha (x_hat - alpha u)``; Song et al. 2021, score SDE, eq. 13, in log-SNR
time). :func:`ode_invert` solves the landing equation ``x_hat(z_M, lam_M) = x`` by the fixed-point iteration of
:func:`simdiff.invert.ddim.land_invert` to a tolerance, then integrates the ODE from ``lam_M`` down to ``grid[0]``
with DOP853 (scipy, float64); :func:`ode_reconstruct` integrates back up with
:func:`simdiff.samplers.solve_reference`. Both are deterministic and invert each other up to the solver tolerances.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from simdiff.invert.ddim import split_grid
from simdiff.processes import GaussianProcess
from simdiff.samplers import solve_reference
from simdiff.samplers._common import resolve_process
from simdiff.samplers.ode import _level_derivatives

__all__ = ["ode_invert", "ode_reconstruct", "ode_land", "Float64"]


class Float64:
    """A float64 view of a denoiser whose parameters are in another dtype: inputs are cast to the parameters' dtype
    and the outputs back to float64 (so the DOP853 solves can drive a float32 network). Other attributes are the
    wrapped denoiser's."""

    def __init__(self, denoise: Callable) -> None:
        self.inner = denoise
        params = getattr(denoise, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        self.dtype = first.dtype if first is not None else torch.float64

    def __call__(self, z: Tensor, lam: Tensor, **cond):
        out = self.inner(z.to(self.dtype), lam, **cond)
        return type(out)(x=out.x.to(torch.float64), eps=out.eps.to(torch.float64), v=out.v.to(torch.float64))

    def __getattr__(self, name: str):
        if name in ("inner", "dtype"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def ode_land(
    denoise: Callable,
    x: Tensor,
    level: float,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    tol: float = 1e-12,
    max_iters: int = 200,
    strict: bool = True,
) -> tuple[Tensor, int]:
    """Solve ``x_hat(z, level) = x`` for ``z`` (float64) by fixed-point iteration until the largest residual is
    below ``tol``. Returns ``(z, network calls)``. With ``strict=False`` the iterate after ``max_iters`` is returned
    without complaint (a trained network at a moderate level converges slowly: the iteration's rate is
    ``sigma^2 / (alpha^2 s^2 + sigma^2)`` along data directions of variance ``s^2``).

    Raises:
        ValueError: not converged after ``max_iters`` (the denoiser is not close to the identity map at ``level``;
            choose a grid whose last finite level is higher, i.e. more steps).
    """
    proc = resolve_process(process)
    xf = x.detach().to(device="cpu", dtype=torch.float64)
    lam = torch.tensor(float(level), dtype=torch.float64)
    la, _ = proc.log_alpha_sigma(lam)
    alpha = proc.fit(la.exp(), lam=lam, like=xf)
    ux = proc.encode(xf)
    u = alpha * ux
    cond = dict(cond or {})
    for n in range(1, max_iters + 1):
        with torch.no_grad():
            x_hat = denoise(proc.decode(u), lam.expand(xf.shape[0]), **cond).x.to(torch.float64)
        r = ux - proc.encode(x_hat)
        u = u + alpha * r
        if float(r.abs().max()) < tol:
            return proc.decode(u).to(x.device), n
    if not strict:
        return proc.decode(u).to(x.device), max_iters
    raise ValueError(f"ode_land: the landing fixed point did not reach {tol:g} in {max_iters} iterations at level "
                     f"{float(level):g}; use more steps (a higher last level) or a larger tolerance")


def ode_invert(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    land_tol: float = 1e-12,
    land_max_iters: int = 200,
    land_strict: bool = True,
    return_nfe: bool = False,
) -> Tensor | tuple[Tensor, int]:
    """Exact PF-ODE inversion of ``x`` to the latent at ``grid[0]`` (only ``grid[0]`` and the last finite level of
    ``grid`` are used). ``land_tol`` / ``land_max_iters`` / ``land_strict``: the landing solve (:func:`ode_land`; a
    float32 network cannot reach the float64 default). Returns a float64 ``[B, ...]`` on ``x``'s device (and the
    network calls with ``return_nfe``)."""
    lam, final_inf = split_grid(grid, name="ode_invert")
    proc = resolve_process(process)
    cond = dict(cond or {})
    nfe = 0
    if final_inf:
        z, nfe = ode_land(denoise, x, float(lam[-1]), cond=cond, process=process, tol=land_tol,
                          max_iters=land_max_iters, strict=land_strict)
    else:
        z = x
    z = z.detach().to(device="cpu", dtype=torch.float64)
    if lam.shape[0] > 1:
        shape, batch = z.shape, z.shape[0]
        u0 = proc.encode(z)

        def rhs(level: float, y: np.ndarray) -> np.ndarray:
            u = torch.from_numpy(y).view(shape)
            with torch.inference_mode(False):  # the coefficients' level derivatives need autograd
                lv = torch.tensor(level, dtype=torch.float64)
                (la, _), (dla, dls) = _level_derivatives(proc.log_alpha_sigma, lv)
            with torch.no_grad():
                xh = denoise(proc.decode(u), lv.expand(batch), **cond).x.to(torch.float64)
            drift = proc.fit(dls, lam=lv, like=u) * u + proc.fit(la.exp() * (dla - dls), lam=lv, like=u) * \
                proc.encode(xh)
            return drift.reshape(-1).numpy()

        sol = solve_ivp(rhs, (float(lam[-1]), float(lam[0])), u0.reshape(-1).numpy(), method="DOP853", rtol=rtol,
                        atol=atol)
        if not sol.success:
            raise RuntimeError(f"ode_invert: DOP853 failed: {sol.message}")
        nfe += int(sol.nfev)
        z = proc.decode(torch.from_numpy(sol.y[:, -1].copy()).view(shape))
    z = z.to(x.device)
    return (z, nfe) if return_nfe else z


def ode_reconstruct(
    denoise: Callable,
    z: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> Tensor:
    """Integrate the PF-ODE from ``grid[0]`` to the last finite level and return the x-prediction there (float64):
    the exact counterpart of sampling on ``grid`` (:func:`simdiff.samplers.solve_reference`)."""
    lam, _ = split_grid(grid, name="ode_reconstruct")
    if lam.shape[0] < 2:
        with torch.no_grad():
            return denoise(z, lam.to(z.device).expand(z.shape[0]), **dict(cond or {})).x.to(torch.float64)
    return solve_reference(denoise, z, logsnr_start=float(lam[0]), logsnr_end=float(lam[-1]), rtol=rtol, atol=atol,
                           cond=cond, process=process)
