"""EDICT: exact diffusion inversion via coupled transformations (Wallace, Gokul & Naik 2023, CVPR).

Two sequences ``x`` and ``y`` start equal. One denoising step from level ``t`` to the less noisy ``s`` (paper
eq. 14, written with the DDIM coefficients ``a = alpha_s / alpha_t``, ``b = sigma_s - a sigma_t`` of the update
``z_s = a z_t + b eps_hat(z_t, t)``, per basis coordinate for a diagonal process):

    x_i = a x + b eps(y, t)            y_i = a y + b eps(x_i, t)
    x'  = p x_i + (1 - p) y_i          y'  = p y_i + (1 - p) x'

Every line is an affine coupling (one sequence updated from the other), so it inverts exactly (paper eq. 15):

    y_i = (y' - (1 - p) x') / p        x_i = (x' - (1 - p) y_i) / p
    y = (y_i - b eps(x_i, t)) / a      x = (x_i - b eps(y, t)) / a

whatever the network is: inversion followed by sampling reconstructs the input to floating-point round-off (the
mixing inverse divides by ``p``, so the round-off grows by about ``1 / p`` per step). ``p = 0.93`` is the paper's
default. Two network calls per step. The last step to +inf (``alpha_s = 1``, ``sigma_s = 0``) has
``a = 1 / alpha_t``, ``b = -sigma_t / alpha_t``: ``x_i`` is then the x-prediction of ``y``, and the step stays
exactly invertible. The sample is the ``x`` sequence; both sequences are returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from simdiff.invert.ddim import guided, split_grid
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import resolve_process

__all__ = ["EdictState", "edict_invert", "edict_sample", "edict_coefficients", "DEFAULT_MIXING"]

#: the mixing weight p of Wallace et al. 2023 (their default 0.93).
DEFAULT_MIXING = 0.93


class EdictState(NamedTuple):
    """The two coupled EDICT sequences at one level, each ``[B, ...]``."""

    x: Tensor
    y: Tensor


def edict_coefficients(lam: Tensor, final_inf: bool, process: GaussianProcess | None = None) -> tuple[Tensor, Tensor]:
    """Per-step ``(a, b)``, each ``[M, *coef_shape]`` (``M`` = steps including a final one to +inf), for
    ``z_s = a z_t + b eps``: ``a = alpha_s / alpha_t``, ``b = sigma_s - a sigma_t``."""
    proc = resolve_process(process)
    la, ls = proc.log_alpha_sigma(lam)
    a = torch.exp(la[1:] - la[:-1])
    b = ls[1:].exp() - a * ls[:-1].exp()
    if final_inf:
        a = torch.cat([a, torch.exp(-la[-1:])])
        b = torch.cat([b, -torch.exp(ls[-1:] - la[-1:])])
    return a, b


def _check_mixing(p: float) -> float:
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"EDICT mixing p must be in (0, 1], got {p}")
    return float(p)


class _Eps:
    """``eps(u, i)``: the denoiser's eps at grid level ``i``, state and output in basis coordinates."""

    def __init__(self, denoise, lam: Tensor, like: Tensor, cond: dict | None, process) -> None:
        self.denoise, self.cond, self.proc = denoise, dict(cond or {}), resolve_process(process)
        self.lam = lam.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
        self.batch, self.dtype = like.shape[0], like.dtype

    def __call__(self, u: Tensor, i: int) -> Tensor:
        out = self.denoise(self.proc.decode(u), self.lam[i].expand(self.batch), **self.cond)
        return self.proc.encode(out.eps.to(self.dtype))


def _setup(denoise, like, grid, cond, process, guidance, null_cond, name):
    lam, final_inf = split_grid(grid, name=name)
    proc = resolve_process(process)
    a, b = edict_coefficients(lam, final_inf, process)
    a = [proc.fit(c, lam=lam[0], like=like).to(device=like.device, dtype=like.dtype) for c in a]
    b = [proc.fit(c, lam=lam[0], like=like).to(device=like.device, dtype=like.dtype) for c in b]
    eps = _Eps(guided(denoise, guidance, null_cond=null_cond, process=process), lam, like, cond, process)
    return proc, a, b, eps


def edict_sample(
    denoise: Callable,
    state: EdictState,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    mixing: float = DEFAULT_MIXING,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
) -> EdictState:
    """Run the EDICT denoising steps along ``grid`` (increasing; ``grid[0]`` is the level of ``state``).

    Args:
        denoise: ``denoise(z, lam[B], **cond) -> DenoiserOutput``.
        state: the two sequences at ``grid[0]`` (e.g. ``EdictState(z, z)`` from noise, or :func:`edict_invert`).
        grid: increasing levels, usually ending at +inf.
        mixing: ``p`` in (0, 1].
        guidance, null_cond: classifier-free guidance weight ``w`` and null conditioning
            (:func:`simdiff.invert.ddim.guided`).

    Returns:
        :class:`EdictState` at the last level (the sample is ``.x``). ``2 M`` network calls for ``M`` steps.
    """
    p = _check_mixing(mixing)
    proc, a, b, eps = _setup(denoise, state.x, grid, cond, process, guidance, null_cond, "edict_sample")
    x, y = proc.encode(state.x), proc.encode(state.y)
    for i in range(len(a)):
        xi = a[i] * x + b[i] * eps(y, i)
        yi = a[i] * y + b[i] * eps(xi, i)
        x = p * xi + (1 - p) * yi
        y = p * yi + (1 - p) * x
    return EdictState(proc.decode(x), proc.decode(y))


def edict_invert(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    mixing: float = DEFAULT_MIXING,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
    state: EdictState | None = None,
) -> EdictState:
    """Invert ``x`` (at the last level of ``grid``) to the two EDICT latents at ``grid[0]`` (paper eq. 15).

    ``state`` (optional) gives both sequences at the last level instead of ``EdictState(x, x)``. Same other
    arguments as :func:`edict_sample`, which maps the result back to ``(x, x)`` up to round-off.
    """
    p = _check_mixing(mixing)
    start = EdictState(x, x) if state is None else state
    proc, a, b, eps = _setup(denoise, start.x, grid, cond, process, guidance, null_cond, "edict_invert")
    xs, ys = proc.encode(start.x), proc.encode(start.y)
    for i in reversed(range(len(a))):
        yi = (ys - (1 - p) * xs) / p
        xi = (xs - (1 - p) * yi) / p
        ys = (yi - b[i] * eps(xi, i)) / a[i]
        xs = (xi - b[i] * eps(ys, i)) / a[i]
    return EdictState(proc.decode(xs), proc.decode(ys))
