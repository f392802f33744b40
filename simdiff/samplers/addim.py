"""aDDIM, adjusted DDIM (Heek, Hoogeboom & Salimans 2024, "Multistep Consistency Models", Algorithm 3, eqs. 12-13).

DDIM driven by the posterior mean ``x_hat = E[x | z_t]`` under-estimates the norm of ``z_s``: the discarded part
``(alpha_s - alpha_t sigma_s / sigma_t) (x - x_hat)`` has trace-variance ``(alpha_s - alpha_t sigma_s/sigma_t)^2
tr Var[x | z_t]``. aDDIM puts that variance back, deterministically, along the predicted-noise direction::

    eps_hat = (z_t - alpha_t x_hat) / sigma_t
    z_s_var = (alpha_s - alpha_t sigma_s / sigma_t)^2 * x_var          (x_var = per-dimension Var[x | z_t])
    z_s     = alpha_s x_hat + sqrt(sigma_s^2 + d * z_s_var / ||eps_hat||^2) * eps_hat

so ``||z_s - alpha_s x_hat||^2`` grows by exactly ``d * z_s_var`` over DDIM. ``||eps_hat||^2`` is per example
(hackable_diffusion's ``AdjustedDDIMStep`` normalises over the whole batch and scales x by alpha_t; we follow the
paper). ``x_var`` is either estimated, ``eta * ||x - x_hat||^2 / d`` (eta = 0.75, "xvar_frac"), or the paper's
analytic fallback ``0.1 / (2 + alpha_t^2 / sigma_t^2)`` (10% of the posterior variance under a N(0, 0.5) prior).
With ``x_var = 0`` or ``s -> t`` aDDIM is DDIM. Isotropic process only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.process import alpha_sigma, expand, sigma_ratio
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import Callback, Net, land, prepare_grid, require_isotropic, to_state

__all__ = ["addim_step", "analytic_x_var", "estimated_x_var", "sample_addim"]


def analytic_x_var(logsnr_t: Tensor) -> Tensor:
    """``0.1 / (2 + alpha_t^2 / sigma_t^2)`` = ``0.1 / (2 + exp(logsnr_t))`` (MCM Algorithm 3's default)."""
    return 0.1 / (2.0 + torch.exp(logsnr_t))


def estimated_x_var(x: Tensor, x_hat: Tensor, *, eta: float = 0.75) -> Tensor:
    """Per-example ``eta * ||x - x_hat||^2 / d`` ``[B]`` (MCM Algorithm 1, ``xvar_frac`` = eta)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"estimated_x_var: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ")
    return eta * (x - x_hat).pow(2).reshape(x.shape[0], -1).mean(1)


def addim_step(*, z_t: Tensor, x: Tensor, logsnr_s: Tensor, logsnr_t: Tensor, x_var: Tensor | float) -> Tensor:
    """One aDDIM step ``t -> s`` (``logsnr_s > logsnr_t``), MCM Algorithm 3.

    Args:
        z_t: ``[B, ...]`` current state.
        x: ``[B, ...]`` the denoiser's x-prediction at ``z_t``.
        logsnr_s, logsnr_t: ``[B]`` (or scalar) log-SNRs of the target and current levels.
        x_var: per-dimension variance of ``x`` given ``z_t``: scalar or ``[B]``.

    Returns:
        ``z_s`` ``[B, ...]``. A final ``logsnr_s = +inf`` returns ``x`` (the last step lands on data).
    """
    if z_t.shape != x.shape:
        raise ValueError(f"addim_step: z_t {tuple(z_t.shape)} and x {tuple(x.shape)} differ")
    ls, lt = expand(logsnr_s, z_t), expand(logsnr_t, z_t)
    xv = x_var if torch.is_tensor(x_var) else torch.tensor(float(x_var), dtype=z_t.dtype, device=z_t.device)
    xv = expand(xv.to(z_t.dtype), z_t)
    a_s, s_s = alpha_sigma(ls)
    a_t, s_t = alpha_sigma(lt)
    ratio = sigma_ratio(logsnr_s=ls, logsnr_t=lt)
    d = z_t[0].numel()
    eps_hat = (z_t - a_t * x) / s_t
    eps_sq = eps_hat.pow(2).reshape(z_t.shape[0], -1).sum(1)
    eps_sq = expand(eps_sq.clamp_min(torch.finfo(z_t.dtype).tiny), z_t)
    z_s_var = (a_s - a_t * ratio).pow(2) * xv
    z_s = a_s * x + torch.sqrt(s_s.pow(2) + d * z_s_var / eps_sq) * eps_hat
    return torch.where(torch.isinf(ls) & (ls > 0), x, z_s)


def sample_addim(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    x_var_fn: Callable[[Tensor], Tensor] = analytic_x_var,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """aDDIM over an increasing log-SNR grid (the shared sampler signature; one network call per step).

    Args:
        denoise: ``denoise(z, logsnr[B], **cond) -> DenoiserOutput``.
        z: ``[B, ...]`` noise at ``logsnrs[0]``.
        logsnrs: ``[N + 1]`` strictly increasing; a final ``+inf`` returns the last x-prediction.
        x_var_fn: ``logsnr_t [B] -> x_var`` (scalar or ``[B]``); default :func:`analytic_x_var`.
        generator: unused (deterministic sampler), kept for the shared signature.
        process: ``None`` or an isotropic process (no per-coordinate form).
    """
    require_isotropic(process, "addim")
    grid = prepare_grid(logsnrs, name="addim", allow_decreasing=False)
    net = Net(denoise, z, grid, cond, process)
    lam = to_state(grid.lam, z)
    b = z.shape[0]
    for i in range(grid.steps):
        x = net.x(z, i)
        lt, ls = lam[i].expand(b), lam[i + 1].expand(b)
        z = addim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, x_var=x_var_fn(lt))
        net.emit(callback, i, z, x, net.lam[i + 1])
    return land(net, z, grid, callback)
