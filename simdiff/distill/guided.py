"""Distillation of classifier-free-guided diffusion models (Meng et al., "On distillation of guided diffusion
models", CVPR 2023).

Stage one (:class:`GuidanceDistillation`): a student that takes the guidance weight ``w`` as an input
(``student(z, logsnr, guidance=w, **cond)``) regresses the CFG teacher (Ho & Salimans 2022)::

    x_w = (1 + w) x_teacher(z_t, c) - w x_teacher(z_t, null),    w ~ U[w_min, w_max],  t ~ U[0, 1]
    loss = weight(lambda_t) ||x_student(z_t, w) - x_w||^2 / d

Stage two (:class:`GuidedProgressiveDistillation`): progressive distillation (:mod:`simdiff.distill.progressive`)
of the stage-one student, keeping ``w`` as an input (drawn per example from ``[w_min, w_max]``). Its students
sample deterministically (DDIM) or with the paper's stochastic N-step sampler (the registered sampler
``guided_stochastic``, :func:`simdiff.samplers.students.sample_guided_stochastic`): from ``t`` one deterministic
DDIM step of length ``2/N`` to ``t - 2/N``, then fresh noise back up to ``t - 1/N``.

The unconditional teacher call replaces the keys of ``null_cond`` in the conditioning with
:func:`simdiff.conditioners.null_conditioning`: a value ``None`` passes ``None`` (e.g.
``GaussianMixture.denoise(labels=None)`` is the exact unconditional denoiser), any other value is broadcast to the
conditioning's ``[B, ...]`` shape (``{"labels": num_classes}`` for a network trained with label dropout).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.conditioners import null_conditioning
from simdiff.distill.base import (
    Denoise,
    DistillationLoss,
    check_steps,
    rand,
    randn,
    split_batch,
    teacher_call,
)
from simdiff.distill.progressive import ProgressiveDistillation, ProgressiveSchedule
from simdiff.process import add_noise
from simdiff.samplers import make_grid
from simdiff.samplers.students import sample_guided_stochastic
from simdiff.schedules import Schedule

__all__ = ["GuidanceDistillation", "GuidedProgressiveDistillation", "cfg_teacher_x", "sample_stochastic"]


def cfg_teacher_x(
    teacher: Denoise, z: Tensor, logsnr: Tensor, *, w: Tensor, cond: dict[str, Any], null_cond: dict[str, Any]
) -> Tensor:
    """Guided teacher x-prediction ``(1 + w) x(z, c) - w x(z, null)`` with per-example ``w`` ``[B]`` (no grad)."""
    xc = teacher_call(teacher, z, logsnr, cond).x
    xu = teacher_call(teacher, z, logsnr, null_conditioning(cond, null_cond, batch=z.shape[0])).x
    wb = w.reshape((-1,) + (1,) * (z.dim() - 1)).to(z.dtype)
    return (1 + wb) * xc - wb * xu


def _check_range(w_min: float, w_max: float) -> tuple[float, float]:
    if not (math.isfinite(w_min) and math.isfinite(w_max) and w_min <= w_max):
        raise ValueError(f"guidance range needs finite w_min <= w_max, got w_min={w_min}, w_max={w_max}")
    return float(w_min), float(w_max)


class GuidanceDistillation(DistillationLoss):
    """Stage one of Meng et al. 2023: a ``w``-conditioned student matches the CFG teacher for ``w ~ U[w_min, w_max]``.

    Args:
        student: the w-conditioned student (``guidance=`` keyword).
        teacher: the conditional teacher denoiser (called twice: with ``cond`` and with ``null_cond``).
        schedule: log-SNR schedule; ``t ~ U[0, 1]``.
        w_min, w_max: the guidance range (paper: [0, 4] pixel space ImageNet-64).
        null_cond: conditioning meaning "unconditional" (see module docstring).
        weighting: loss weighting on ``||x - x_hat||^2`` (default "v" = SNR + 1).
        sample_steps: DDIM steps used by :meth:`sample` (the stage-one student is a full diffusion model).
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: Denoise,
        schedule: Schedule,
        *,
        w_min: float = 0.0,
        w_max: float = 4.0,
        null_cond: dict[str, Any] | None = None,
        weighting: str = "v",
        sample_steps: int = 64,
    ) -> None:
        super().__init__(student, teacher, schedule, weighting=weighting)
        self.w_min, self.w_max = _check_range(w_min, w_max)
        self.null_cond = {"labels": None} if null_cond is None else dict(null_cond)
        if not self.null_cond:
            raise ValueError("guided distillation needs a non-empty null_cond, e.g. {'labels': num_classes}")
        self._sample_steps = check_steps(sample_steps, "sample_steps")

    @property
    def sample_steps(self) -> int:
        return self._sample_steps

    def loss(self, model: Denoise, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        x, cond = split_batch(batch)
        b = x.shape[0]
        w = cond.pop("guidance", None)
        if w is None:
            w = self.w_min + (self.w_max - self.w_min) * rand((b,), like=x, generator=generator)
        lam = self.times_to_logsnr(rand((b,), like=x, generator=generator))
        z = add_noise(x, randn(tuple(x.shape), like=x, generator=generator), logsnr=lam)
        target = cfg_teacher_x(self.teacher, z, lam, w=w, cond=cond, null_cond=self.null_cond)
        x_hat = model(z, lam, guidance=w, **cond).x
        return self.weighting(lam) * (x_hat - target).pow(2).reshape(b, -1).mean(1)


def sample_stochastic(
    denoise: Denoise,
    z: Tensor,
    schedule: Schedule,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
) -> Tensor:
    """Meng et al. 2023's stochastic ``N``-step sampler on the uniform-t grid (``N`` network calls).

    The registered sampler ``guided_stochastic`` on ``make_grid(schedule, steps, kind="uniform_t")``; see
    :func:`simdiff.samplers.students.sample_guided_stochastic`.
    """
    steps = check_steps(steps, "steps")
    return sample_guided_stochastic(denoise, z, make_grid(schedule, steps, kind="uniform_t"), generator=generator,
                                    cond=cond)


class GuidedProgressiveDistillation(ProgressiveDistillation):
    """Stage two of Meng et al. 2023: progressive distillation of the w-conditioned student, ``w`` kept as input.

    Same arguments as :class:`ProgressiveDistillation` with ``w_min``/``w_max`` instead of ``guidance_range``, plus
    ``stochastic`` selecting the sampler used by :meth:`sample` (``cond`` must then carry ``guidance``).
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: Denoise,
        schedule: Schedule,
        *,
        w_min: float = 0.0,
        w_max: float = 4.0,
        student_steps: int | None = None,
        curriculum: ProgressiveSchedule | None = None,
        weighting: str = "snr_trunc",
        stochastic: bool = False,
    ) -> None:
        super().__init__(student, teacher, schedule, student_steps=student_steps, curriculum=curriculum,
                         weighting=weighting, guidance_range=_check_range(w_min, w_max))
        self.stochastic = bool(stochastic)

    def sampler_spec(self) -> dict[str, Any]:
        spec = super().sampler_spec()
        if self.stochastic:
            spec["sampler"] = "guided_stochastic"
        return spec

    def sample(
        self, student: Denoise, z: Tensor, *, generator: torch.Generator | None = None, cond: dict | None = None
    ) -> Tensor:
        if not cond or "guidance" not in cond:
            raise ValueError("guided students need cond={'guidance': w [B], ...} to sample")
        if self.stochastic:
            return sample_stochastic(student, z, self.schedule, self.sample_steps, generator=generator, cond=cond)
        return super().sample(student, z, generator=generator, cond=cond)

