"""Deterministic (DDIM) inversion: run a sampler grid backwards from data to a noisy latent, and back.

Sampling on an increasing grid ``[lam_0, ..., lam_M, +inf]`` takes ``M`` finite steps and then *lands*: it returns
the x-prediction at ``lam_M``. Inversion undoes both parts:

* **landing**: find ``z_M`` with ``x_hat(z_M, lam_M) = x``. The fixed-point iteration
  ``z <- z + alpha_M (x - x_hat(z, lam_M))`` from ``z = alpha_M x`` is, after one iteration, the usual first DDIM
  inversion step ``z_M = alpha_M x + sigma_M eps_hat(alpha_M x, lam_M)`` (the network evaluated at the clean image,
  as DDIM inversion implementations do). Per coordinate its Jacobian is ``1 - alpha dx_hat/dz``, which is
  ``sigma^2 / (alpha^2 s^2 + sigma^2)`` for data of variance ``s^2``: at a high ``lam_M`` a few iterations solve
  the landing equation to round-off (``land_iters``).
* **finite steps**: the grid's finite part run in reverse (decreasing levels) with the deterministic sampler of the
  requested order: DDIM (Song et al. 2021, eq. 12 with eta = 0; first order), DPM-Solver++(2M) (Lu et al. 2022,
  Alg. 2; second-order multistep exponential integrator in ``lambda = logsnr / 2``) or the third-order exponential
  Adams multistep of :func:`simdiff.samplers.sample_dpmpp_3m`. Each step evaluates the network at the state it
  starts from (the explicit method in the inverse direction), so inversion followed by sampling reconstructs the
  input up to the discretisation error of both runs: ``O(h^order)`` on a smooth denoiser.

``lookahead=True`` (first order) evaluates the network for the step ``s -> t`` at the state ``z_s`` but at the target
level ``t`` and steps in eps form, ``z_t = (alpha_t / alpha_s) z_s + (sigma_t - alpha_t sigma_s / alpha_s)
eps_hat(z_s, t)``: the sampler's step ``t -> s`` uses ``eps_hat(z_t, t)``, so only the state is approximated, not
the level (the convention of diffusers' ``DDIMInverseScheduler``, which evaluates the model at the next timestep).

Network calls: ``land_iters + M`` for inversion, ``M + 1`` for :func:`reconstruct`.
A grid whose last level is finite starts from a latent ``x`` already at that level (no landing): a partial
inversion, e.g. for editing at a given strength.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from simdiff.guidance import classifier_free_guidance
from simdiff.processes import GaussianProcess
from simdiff.samplers import sample_ddim, sample_dpmpp_2m, sample_dpmpp_3m
from simdiff.samplers._common import resolve_process

__all__ = ["ddim_invert", "reconstruct", "invert_trajectory", "land_invert", "guided", "split_grid", "ORDERS"]

#: deterministic sampler of each order (forward: sampling; on a decreasing finite grid: inversion).
ORDERS: dict[int, Callable[..., Tensor]] = {1: sample_ddim, 2: sample_dpmpp_2m, 3: sample_dpmpp_3m}


def _sampler(order: int) -> Callable[..., Tensor]:
    if order not in ORDERS:
        raise ValueError(f"inversion order must be one of {sorted(ORDERS)}, got {order!r}")
    return ORDERS[order]


def split_grid(grid: Tensor, *, name: str = "ddim_invert") -> tuple[Tensor, bool]:
    """``grid`` (1-D, strictly increasing, optionally ending at +inf) -> (finite float64 levels, ends at +inf).

    Raises:
        ValueError: one line, for a grid that is not 1-D, too short, not strictly increasing or holds NaN / -inf.
    """
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if g.dim() != 1 or g.shape[0] < 2:
        raise ValueError(f"{name}: grid must be a 1-D tensor of >= 2 levels, got shape {tuple(g.shape)}")
    if bool(torch.isnan(g).any()) or bool((g == -math.inf).any()) or bool(torch.isinf(g[:-1]).any()):
        raise ValueError(f"{name}: grid levels must be finite (a final +inf allowed), got {g.tolist()}")
    final_inf = bool(g[-1] == math.inf)
    lam = g[:-1] if final_inf else g
    if lam.shape[0] < 1 or (lam.shape[0] > 1 and not bool((torch.diff(lam) > 0).all())):
        raise ValueError(f"{name}: grid must be strictly increasing (noise -> data), got {g.tolist()}")
    return lam, final_inf


def guided(
    denoise: Callable,
    guidance: float | None,
    *,
    null_cond: dict[str, Any] | None = None,
    process: GaussianProcess | None = None,
) -> Callable:
    """``denoise`` with classifier-free guidance of weight ``guidance`` (simdiff's ``w``: 0 or None = unguided).

    ``null_cond`` defaults to the null class row ``{"labels": denoise.num_classes}`` of a class-conditional simdiff
    network.

    Raises:
        ValueError: guidance asked for and no null conditioning known.
    """
    if guidance is None or float(guidance) == 0.0:
        return denoise
    if null_cond is None:
        n = getattr(denoise, "num_classes", None)
        if not isinstance(n, int) or n <= 0:
            raise ValueError("guidance needs null_cond (the denoiser has no class count to build the null label)")
        null_cond = {"labels": n}
    return classifier_free_guidance(denoise, weight=float(guidance), null_cond=null_cond, process=process)


def land_invert(
    denoise: Callable,
    x: Tensor,
    level: Tensor | float,
    *,
    iters: int = 1,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """The latent ``z`` at ``level`` whose x-prediction is ``x`` (inverse of the final step to +inf).

    Fixed-point iteration ``u <- u + alpha (encode(x) - encode(x_hat(decode(u))))`` from ``u = alpha encode(x)``, in
    basis coordinates (module docstring). ``iters`` network calls; ``iters = 0`` returns ``alpha x``.

    Args:
        x: ``[B, ...]`` data. level: the grid's last finite level (a float or 0-d tensor).
    """
    if int(iters) != iters or iters < 0:
        raise ValueError(f"land_iters must be an integer >= 0, got {iters!r}")
    proc = resolve_process(process)
    lam = torch.as_tensor(float(level), dtype=torch.float64)
    la, _ = proc.log_alpha_sigma(lam)
    alpha = proc.fit(la.exp(), lam=lam, like=x).to(device=x.device, dtype=x.dtype)
    ux = proc.encode(x)
    u = alpha * ux
    lam_b = lam.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)).expand(x.shape[0])
    for _ in range(int(iters)):
        x_hat = denoise(proc.decode(u), lam_b, **dict(cond or {})).x.to(x.dtype)
        u = u + alpha * (ux - proc.encode(x_hat))
    return proc.decode(u)


def invert_trajectory(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    order: int = 1,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
    land_iters: int = 1,
    lookahead: bool = False,
) -> list[Tensor]:
    """DDIM inversion keeping every state: ``[z at grid[0], z at grid[1], ..., z at the last finite level]``.

    Same arguments as :func:`ddim_invert`. Returns ``M + 1`` tensors like ``x`` (the pivot trajectory of null-text
    inversion).
    """
    lam, final_inf = split_grid(grid)
    den = guided(denoise, guidance, null_cond=null_cond, process=process)
    sampler = _sampler(order)
    if lookahead and order != 1:
        raise ValueError(f"lookahead inversion is first order; got order={order}")
    z = land_invert(den, x, lam[-1], iters=land_iters, cond=cond, process=process) if final_inf else x
    states = [z]
    if lookahead:
        states += _lookahead_steps(den, z, lam, cond, process)
    elif lam.shape[0] > 1:
        def keep(info: dict) -> None:
            states.append(info["z"])

        sampler(den, z, lam.flip(0), cond=cond, process=process, callback=keep)
    return states[::-1]


def _lookahead_steps(denoise: Callable, z: Tensor, lam: Tensor, cond: dict | None, process) -> list[Tensor]:
    """First-order inversion steps ``s -> t`` (``t`` noisier) in eps form with the network at the target level:
    ``z_t = (alpha_t / alpha_s) z_s + (sigma_t - alpha_t sigma_s / alpha_s) eps_hat(z_s, t)``, the exact inverse
    of the DDIM step ``t -> s`` with ``eps_hat(z_t, t)`` replaced by ``eps_hat(z_s, t)``. Returns the states from
    ``lam[-2]`` down to ``lam[0]``."""
    proc = resolve_process(process)
    la, ls = proc.log_alpha_sigma(lam)
    lam_dev = lam.to(device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
    u, out = proc.encode(z), []
    for i in range(lam.shape[0] - 2, -1, -1):  # from level i + 1 (less noisy) to level i
        a = proc.fit(torch.exp(la[i] - la[i + 1]), lam=lam[0], like=z).to(z)
        b = proc.fit(ls[i].exp() - torch.exp(la[i] - la[i + 1] + ls[i + 1]), lam=lam[0], like=z).to(z)
        eps = denoise(proc.decode(u), lam_dev[i].expand(z.shape[0]), **dict(cond or {})).eps.to(z.dtype)
        u = a * u + b * proc.encode(eps)
        out.append(proc.decode(u))
    return out


def ddim_invert(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    order: int = 1,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
    land_iters: int = 1,
    lookahead: bool = False,
) -> Tensor:
    """Invert ``x`` (data at the grid's +inf end) to the latent at ``grid[0]`` by running the grid backwards.

    Args:
        denoise: ``denoise(z, lam[B], **cond) -> DenoiserOutput``.
        x: ``[B, ...]`` data (or, for a grid ending at a finite level, the latent at that level).
        grid: the increasing float64 level grid a sampler takes (:func:`simdiff.samplers.make_grid`), usually
            ending at +inf.
        cond: conditioning keywords (e.g. ``{"labels": y}``).
        process: the noising process (``None``: isotropic VP).
        order: 1 (DDIM), 2 (DPM-Solver++(2M)) or 3 (third-order exponential Adams; isotropic process only).
        guidance: classifier-free guidance weight ``w`` (0 / None: the conditional model), see :func:`guided`.
        null_cond: the unconditional conditioning for guidance (default: the null class row).
        land_iters: fixed-point iterations of the landing inversion (module docstring); 1 is standard DDIM
            inversion, more solve ``x_hat(z_M) = x`` more exactly at one network call each.
        lookahead: first order only: evaluate the network at the level being stepped to (eps form), as diffusers'
            ``DDIMInverseScheduler`` does, instead of at the state's own level (module docstring).

    Returns:
        ``[B, ...]`` latent at ``grid[0]``, dtype of ``x``. ``land_iters + M`` network calls (``M`` finite steps).
    """
    states = invert_trajectory(denoise, x, grid, cond=cond, process=process, order=order, guidance=guidance,
                               null_cond=null_cond, land_iters=land_iters, lookahead=lookahead)
    return states[0]


def reconstruct(
    denoise: Callable,
    z: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    order: int = 1,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
) -> Tensor:
    """Sample deterministically from the latent ``z`` at ``grid[0]`` along ``grid`` (DDIM with eta = 0 for
    ``order = 1``; the multistep samplers for 2 and 3), so that ``reconstruct(ddim_invert(x)) ~ x``.

    Args as :func:`ddim_invert`. Returns ``[B, ...]`` (x-prediction at the last finite level for a grid ending at
    +inf, else the state at ``grid[-1]``).
    """
    split_grid(grid, name="reconstruct")
    den = guided(denoise, guidance, null_cond=null_cond, process=process)
    return _sampler(order)(den, z, torch.as_tensor(grid, dtype=torch.float64), cond=cond, process=process)
