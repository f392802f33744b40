"""Samplers of distilled students, with the signature of every other sampler in :mod:`simdiff.samplers`.

* ``moment_matching`` / ``moment_matching_large``: the stochastic ``k``-step sampler of moment matching distillation
  (Salimans, Mensink, Heek & Hoogeboom 2024): ``x = g(z_t)``, then ``z_s ~ q(z_s | z_t, x)`` down the
  grid, returning the last ``x``. That is ancestral sampling with the student as the x-predictor, so both names
  run :func:`simdiff.samplers.sample_ddpm` with the "small" (true posterior) or "large" posterior variance.
* ``generator``: a one-step generator student (EMD, Xie et al. 2024), ``x = g(z, **cond)``; the grid is not used.
* ``guided_stochastic``: the stochastic ``N``-step sampler of guided distillation (Meng et al. 2023, "On
  distillation of guided diffusion models"); the two-down-one-up form is read from the paper's text and not checked
  against reference code.

The students are denoiser callables like any other (the generator: ``g(z, **cond) -> Tensor``); the samplers need
nothing from :mod:`simdiff.distill`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from simdiff.process import ddim_step, forward_step
from simdiff.samplers._common import Callback, Net, emit, prepare_grid
from simdiff.samplers.first_order import sample_ddpm

__all__ = ["STUDENT_SAMPLERS", "sample_moment_matching", "sample_moment_matching_large", "sample_generator",
           "sample_guided_stochastic"]


def sample_moment_matching(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: Any = None,
) -> Tensor:
    """Moment matching student sampler (Salimans et al. 2024), small posterior variance.

    On a grid ``[lambda_0, ..., lambda_(M-1), +inf]`` (``make_grid(schedule, M, kind="uniform_t")`` for a student
    distilled for ``M`` steps): ``x_i = g(z_i, lambda_i)``, ``z_(i+1) ~ q(z_(i+1) | z_i, x = x_i)`` for ``i < M - 1``,
    and the result is ``x_(M-1)`` (``M`` network calls, ``M - 1`` noise draws). On a grid with a finite end the
    state at the last point is returned, as :func:`~simdiff.samplers.sample_ddpm` does.

    Args:
        denoise: the student ``g(z, logsnr[B], **cond) -> DenoiserOutput`` (its ``.x`` is the sample ``x_tilde``).
        z: ``[B, ...]`` starting noise at ``logsnrs[0]``.
        logsnrs: ``[M + 1]`` strictly increasing float64 log-SNRs.
        generator, callback, cond: as for every sampler.

    Returns:
        ``[B, ...]`` in ``z.dtype``.
    """
    return sample_ddpm(denoise, z, logsnrs, variance="small", generator=generator, callback=callback, cond=cond,
                       process=process)


def sample_moment_matching_large(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: Any = None,
) -> Tensor:
    """:func:`sample_moment_matching` with the "large" posterior variance ``(1 - SNR_t / SNR_s) sigma_t^2``."""
    return sample_ddpm(denoise, z, logsnrs, variance="large", generator=generator, callback=callback, cond=cond,
                       process=process)


def sample_generator(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: Any = None,
) -> Tensor:
    """One-step generator student: ``x = g(z, **cond)`` (one network call; ``logsnrs`` and ``generator`` unused).

    Args:
        denoise: ``g(z, **cond) -> Tensor [B, ...]`` (e.g. EMD's ``DenoiserGenerator``).
        z: ``[B, ...]`` standard normal input.

    Returns:
        ``[B, ...]`` in ``z.dtype``.
    """
    x = denoise(z, **dict(cond or {}))
    if not torch.is_tensor(x) or x.shape != z.shape:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"generator: the student must return a tensor shaped like z {tuple(z.shape)}, got {got}")
    x = x.to(z.dtype)
    emit(callback, 0, x, x, torch.full((), math.inf, dtype=z.dtype, device=z.device))
    return x


def _randn(z: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, I)`` shaped like ``z``, drawn on the generator's device (a CPU generator also serves a GPU state)."""
    device = z.device if generator is None else generator.device
    return torch.randn(tuple(z.shape), generator=generator, device=device, dtype=z.dtype).to(z.device)


def sample_guided_stochastic(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: Any = None,
) -> Tensor:
    """Stochastic sampler of guided distillation (Meng et al. 2023): two steps down by DDIM, one step up by noise.

    The step count is the grid's: on ``[lambda_0, ..., lambda_(N-1), +inf]`` (for the paper's sampler the
    uniform-t grid, ``lambda_i = logsnr(1 - i / N)``, built by ``make_grid(schedule, N, kind="uniform_t")``), at
    ``lambda_i``: ``x = f(z_i)``; a deterministic DDIM step to ``lambda_(i+2)`` (``z = x`` when that is +inf),
    then the forward process back up to ``lambda_(i+1)``::

        z_(i+1) = (alpha_(i+1) / alpha_(i+2)) z_(i+2) + sigma_(i+1) sqrt(1 - SNR_(i+1) / SNR_(i+2)) n

    The call at ``lambda_(N-1)`` returns ``x``; ``N`` network calls in all.

    Args:
        denoise: the guided student ``f(z, logsnr[B], guidance=w[B], **cond) -> DenoiserOutput``.
        z: ``[B, ...]`` starting noise at ``logsnrs[0]``.
        logsnrs: ``[N + 1]`` strictly increasing float64 log-SNRs ending at +inf.
        generator, callback, cond: as for every sampler (``cond`` carries ``guidance``).
        process: ``None`` or a process whose ``isotropic`` attribute is True (the variance-preserving process with
            one log-SNR per example); the two-down-one-up step has no per-coordinate form here.

    Raises:
        ValueError: a grid that does not end at +inf, or a non-isotropic ``process``.
    """
    if process is not None and not getattr(process, "isotropic", False):
        raise ValueError(f"guided_stochastic supports only the isotropic variance-preserving process, got {process!r}")
    grid = prepare_grid(logsnrs, name="guided_stochastic", allow_decreasing=False)
    if not grid.final_inf:
        raise ValueError("guided_stochastic: the grid must end at +inf (the last step returns the x prediction)")
    net = Net(denoise, z, grid, cond)
    b, n = z.shape[0], grid.steps + 1  # n finite levels = network calls

    def level(k: int) -> Tensor:
        return net.lam[k].to(z.dtype).expand(b)

    for k in range(n):
        lt = level(k)
        x = net.x(z, k)
        if k == n - 1:
            emit(callback, k, x, x, torch.full_like(net.lam[0], math.inf))
            return x
        lu = level(k + 1)
        if k == n - 2:
            z_r = x
            lr = torch.full_like(lt, math.inf)
        else:
            lr = level(k + 2)
            z_r = ddim_step(z_t=z, x=x, logsnr_s=lr, logsnr_t=lt)
        z = forward_step(z_s=z_r, logsnr_s=lr, logsnr_t=lu, noise=_randn(z, generator))
        emit(callback, k, z, x, net.lam[k + 1])
    return z  # not reached: the loop returns at its last level


#: name -> sampler, merged into :data:`simdiff.samplers.SAMPLERS`.
STUDENT_SAMPLERS: dict[str, Callable] = {
    "moment_matching": sample_moment_matching,
    "moment_matching_large": sample_moment_matching_large,
    "generator": sample_generator,
    "guided_stochastic": sample_guided_stochastic,
}
