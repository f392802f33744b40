"""The sliding-window sampler of rolling diffusion (Ruhe et al. 2024, "Rolling Diffusion Models", sec. 3).

Each sweep runs the global time of the window from 1 to 0 in ``steps`` DDIM or DDPM steps of the
:class:`~simdiff.processes.rolling.RollingDiffusion` process (per-frame coefficients through the process seam); the
first rolling frame is then at local time 0 and is emitted, the window drops its first frame and appends a fresh
noise frame. A frame therefore gets ``R x steps`` updates over its life (``R`` rolling frames). An optional start-up
sweep with the "init" phase turns an all-noise window into the rolling state. Memory is that of one window whatever
the rollout length; emitted frames go to ``on_frame`` and (unless ``keep=False``) to the returned CPU tensor.

The denoiser of a video model takes per-frame log-SNRs: ``denoise(z [B, W, ...], logsnr [B, W], **cond)``, the
isotropic per-frame contract (``simdiff.process`` broadcasts ``[B, W]`` over the trailing dims). The sampler turns the
sweep's global level into them with ``process.frame_logsnr``.

The appended frame is white noise, i.e. the state at local time 1 up to the schedule's ``alpha`` at ``logsnr_min``
(``sqrt(sigmoid(-15)) ~ 5.5e-4`` for the clipped cosine): the signal it should carry is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from simdiff.processes.rolling import RollingDiffusion

__all__ = ["sample_rolling", "sweep_grid"]

_STEPPERS = ("ddim", "ddpm")


def sweep_grid(process: RollingDiffusion, steps: int) -> Tensor:
    """``[steps + 1]`` float64 levels of one sweep: the base schedule's log-SNR at global ``t = 1, ..., 0`` (uniform
    in t; finite at both ends, so the sampler returns the state, not an x-prediction)."""
    if steps < 1:
        raise ValueError(f"rolling: steps per sweep must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return process.schedule.logsnr(t)


def sample_rolling(
    denoise: Callable,
    window: Tensor,
    process: RollingDiffusion,
    *,
    frames: int,
    steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    init: bool = True,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
    on_frame: Callable[[int, Tensor], None] | None = None,
    keep: bool = True,
    progress: bool = False,
) -> Tensor | None:
    """Roll out ``frames`` frames.

    Args:
        denoise: ``denoise(z [B, W, ...], logsnr [B, W], **cond) -> DenoiserOutput``.
        window: ``[B, W, ...]`` the starting window: context frames (clean) first, then the rolling frames — pure
            noise when ``init`` (the start-up sweep runs first), else a window already in the rolling state at t = 1.
        process: the rolling process (its ``phase`` is ignored: the sampler uses "init" then "rolling").
        frames: how many frames to emit (any number; memory stays one window).
        steps: DDIM / DDPM steps per sweep.
        sampler: "ddim" (with ``eta``) or "ddpm" (ancestral, small variance).
        generator: randomness of the appended noise frames and of stochastic steps.
        on_frame: called as ``on_frame(n, frame [B, ...])`` for each emitted frame.
        keep: return the emitted frames as one ``[B, frames, ...]`` CPU tensor (``False``: return ``None``).
        progress: a progress bar over emitted frames.
    """
    from simdiff.samplers import get_sampler  # the package imports this module

    if sampler not in _STEPPERS:
        raise ValueError(f"rolling: sampler {sampler!r} has no step for frames at constant level; valid: "
                         f"{', '.join(_STEPPERS)}")
    if window.dim() < 3 or window.shape[1] != process.window:
        raise ValueError(f"rolling: window must be [B, {process.window}, ...], got {tuple(window.shape)}")
    if frames < 1:
        raise ValueError(f"rolling: frames must be >= 1, got {frames}")
    step = get_sampler(sampler)
    options = {"eta": eta} if sampler == "ddim" else {}
    grid = sweep_grid(process, steps)
    c = process.context

    def sweep(z: Tensor, proc: RollingDiffusion) -> Tensor:
        def per_frame(zz: Tensor, lam: Tensor, **kw: Any):
            return denoise(zz, proc.frame_logsnr(lam), **kw)

        return step(per_frame, z, grid, process=proc, generator=generator, cond=cond, **options)

    rolling = process.with_phase("rolling")
    z = sweep(window, process.with_phase("init")) if init else sweep(window, rolling)
    out: list[Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=frames, desc=f"rolling out ({sampler}, {steps} steps / frame)", unit="frame")
    for n in range(frames):
        if n > 0:
            z = sweep(z, rolling)
        frame = z[:, c]
        if on_frame is not None:
            on_frame(n, frame)
        if keep:
            out.append(frame.detach().cpu())
        noise = torch.randn(z[:, :1].shape, generator=generator, dtype=z.dtype,
                            device=z.device if generator is None else generator.device).to(z.device)
        z = torch.cat([z[:, 1:], noise], dim=1)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.stack(out, dim=1) if keep else None
