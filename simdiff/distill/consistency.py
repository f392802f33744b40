"""Multistep consistency models (Heek, Hoogeboom & Salimans 2024, arXiv 2403.06807).

Diffusion time is split into ``K`` equal segments; within each segment the student is a consistency model whose
target is the segment's lower boundary ``z_{t_step}`` (Algorithm 1)::

    N = round(N_teacher(i) / K) * K;   step ~ U{0..K-1};  n_rel ~ U{1..N/K};  t_step = step/K
    t = t_step + n_rel/N;  s = t - 1/N;  z_t = alpha_t x + sigma_t eps
    x_teacher = teacher(z_t, t)  (distillation, CD)      or  x  (training, CT)
    x_var     = xvar_frac * ||x_teacher - x||^2 / d  (CD; 0 for CT)
    z_s   = aDDIM_{t->s}(x_teacher, z_t, x_var)   (or plain DDIM)          -- no grad
    x_ref = f_target(z_s, s);  z_ref = DDIM_{s->t_step}(x_ref, z_s)        -- no grad
    loss  = w(t) * pseudo_huber( invDDIM_{t->t_step}(z_ref, z_t) - f(z_t, t) ),   w = SNR + 1 ("v")

``pseudo_huber(d) = sqrt(||d||^2 + c^2) - c`` on the whole per-example vector (one unofficial port applies it
element-wise: a different loss). ``N_teacher(i) = exp(log n0 + clip(i / anneal_steps, 0, 1) (log n1 - log n0))``
(paper: 64 -> 1280 over 100k steps) is a pure function of the trainer step. Target network: ``"stopgrad"``
(default) = the student's own current weights without gradient, the paper's ``nograd f``; ``"ema"`` = an EMA copy
of the student updated in :meth:`MultistepConsistency.set_step` (ports' choice). ``K = 1`` is a classic
consistency model. Sampling (Algorithm 2): ``K`` DDIM steps on the uniform-t grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.distill.base import (
    Denoise,
    DistillationLoss,
    check_steps,
    frozen_copy,
    randint,
    randn,
    split_batch,
    teacher_call,
)
from simdiff.process import add_noise, ddim_invert_x, ddim_step
from simdiff.samplers.addim import addim_step, estimated_x_var
from simdiff.schedules import Schedule

__all__ = ["MultistepConsistency", "pseudo_huber", "teacher_steps_at"]

MODES = ("distillation", "training")
TEACHER_SAMPLERS = ("addim", "ddim")
TARGETS = ("stopgrad", "ema")


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """Per-example ``sqrt(||diff||^2 + c^2) - c`` over all non-batch dims ``[B, ...] -> [B]``."""
    sq = diff.pow(2).reshape(diff.shape[0], -1).sum(1)
    return torch.sqrt(sq + c * c) - c


def teacher_steps_at(step: int, *, start: int, end: int, anneal_steps: int) -> float:
    """``N_teacher(i) = exp(log start + clip(i / anneal_steps, 0, 1) (log end - log start))`` (Algorithm 1)."""
    frac = min(max(step / anneal_steps, 0.0), 1.0) if anneal_steps > 0 else 1.0
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))


def _choice(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


class MultistepConsistency(DistillationLoss):
    """Multistep consistency distillation / training loss object (see module docstring).

    Args:
        student: the student module (needed for ``target="ema"``).
        teacher: frozen teacher denoiser (``mode="distillation"``); ``None`` for ``mode="training"``.
        schedule: log-SNR schedule (segments are uniform in t).
        segments: ``K`` student steps (>= 1; 1 = consistency model).
        mode: "distillation" (CD, teacher step) or "training" (CT, ``x_teacher = x``).
        teacher_steps: fixed teacher grid size (must be divisible by ``K``) or ``(start, end)`` annealed over
            ``anneal_steps`` (paper: (64, 1280), 100k).
        teacher_sampler: "addim" (paper) or "ddim" for the teacher step.
        xvar_frac: eta in ``x_var = eta ||x_teacher - x||^2 / d`` (paper 0.75; unused in CT).
        huber_c: pseudo-Huber constant (paper: 1e-4 ImageNet, 1 for T2I).
        weighting: ``simdiff.weighting`` name for ``w(t)`` (default "v" = SNR + 1).
        target: "stopgrad" (paper) or "ema"; ema_decay: EMA rate for "ema".
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: Denoise | None,
        schedule: Schedule,
        *,
        segments: int,
        mode: str = "distillation",
        teacher_steps: int | tuple[int, int] = (64, 1280),
        anneal_steps: int = 100_000,
        teacher_sampler: str = "addim",
        xvar_frac: float = 0.75,
        huber_c: float = 1e-4,
        weighting: str = "v",
        target: str = "stopgrad",
        ema_decay: float = 0.999,
    ) -> None:
        self.mode = _choice(mode, MODES, "consistency mode")
        if self.mode == "distillation" and teacher is None:
            raise ValueError("consistency distillation needs a teacher (use mode='training' without one)")
        super().__init__(student, teacher, schedule, weighting=weighting)
        self.segments = check_steps(segments, "segments (K)")
        if isinstance(teacher_steps, int):
            check_steps(teacher_steps, "teacher_steps")
            if teacher_steps % self.segments:
                raise ValueError(f"teacher_steps={teacher_steps} is not divisible by K={self.segments} segments")
            self.teacher_steps: tuple[int, int] = (teacher_steps, teacher_steps)
        else:
            lo, hi = teacher_steps
            self.teacher_steps = (check_steps(lo, "teacher_steps start"), check_steps(hi, "teacher_steps end"))
        self.anneal_steps = int(anneal_steps)
        self.teacher_sampler = _choice(teacher_sampler, TEACHER_SAMPLERS, "teacher sampler")
        self.target = _choice(target, TARGETS, "consistency target")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if self.target == "ema" and not isinstance(student, nn.Module):
            raise ValueError("target='ema' needs the student nn.Module")
        self.xvar_frac, self.huber_c, self.ema_decay = float(xvar_frac), float(huber_c), float(ema_decay)
        self.ema: nn.Module | None = frozen_copy(student) if self.target == "ema" else None

    @property
    def sample_steps(self) -> int:
        return self.segments

    def grid_size(self, step: int | None = None) -> int:
        """Teacher grid size ``N`` (a multiple of ``K``) at trainer ``step`` (default: the current step)."""
        n = teacher_steps_at(self.step if step is None else step, start=self.teacher_steps[0],
                             end=self.teacher_steps[1], anneal_steps=self.anneal_steps)
        return max(1, round(n / self.segments)) * self.segments

    def set_step(self, step: int) -> None:
        """Set the step (teacher-grid annealing); with ``target="ema"`` also update the EMA from the student."""
        super().set_step(step)
        if self.ema is not None:
            with torch.no_grad():
                for pe, ps in zip(self.ema.parameters(), self.student.parameters()):
                    pe.lerp_(ps.detach(), 1.0 - self.ema_decay)

    def aux_state_dict(self) -> dict[str, Tensor]:
        """The EMA target's weights (``target="ema"``; empty for "stopgrad"), for checkpoints."""
        if self.ema is None:
            return {}
        return {f"ema.{k}": v.detach().clone() for k, v in self.ema.state_dict().items()}

    def load_aux_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.ema is not None and state:
            self.ema.load_state_dict({k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")})

    def loss(self, model: Denoise, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        x, cond = split_batch(batch)
        b, k = x.shape[0], self.segments
        n = self.grid_size()
        per_seg = n // k
        seg = randint(k, (b,), like=x, generator=generator)
        n_rel = randint(per_seg, (b,), like=x, generator=generator) + 1
        t_step = seg / k
        t = t_step + n_rel / n
        lam_t, lam_s, lam_step = (self.times_to_logsnr(u) for u in (t, t - 1.0 / n, t_step))
        z_t = add_noise(x, randn(tuple(x.shape), like=x, generator=generator), logsnr=lam_t)
        with torch.no_grad():
            if self.mode == "distillation":
                x_teacher = teacher_call(self.teacher, z_t, lam_t, cond).x
                x_var = estimated_x_var(x, x_teacher, eta=self.xvar_frac)
            else:
                x_teacher, x_var = x, torch.zeros(b, dtype=x.dtype, device=x.device)
            if self.teacher_sampler == "addim":
                z_s = addim_step(z_t=z_t, x=x_teacher, logsnr_s=lam_s, logsnr_t=lam_t, x_var=x_var)
            else:
                z_s = ddim_step(z_t=z_t, x=x_teacher, logsnr_s=lam_s, logsnr_t=lam_t)
            target_net = self.ema if self.ema is not None else model
            x_ref = target_net(z_s, lam_s, **cond).x.to(x.dtype)
            z_ref = ddim_step(z_t=z_s, x=x_ref, logsnr_s=lam_step, logsnr_t=lam_s)
            x_target = ddim_invert_x(z_s=z_ref, z_t=z_t, logsnr_s=lam_step, logsnr_t=lam_t)
        x_hat = model(z_t, lam_t, **cond).x
        return self.weighting(lam_t) * pseudo_huber(x_hat - x_target, self.huber_c)

    def sampler_spec(self) -> dict[str, Any]:
        return {"sampler": "ddim", "steps": self.segments, "grid": "uniform_t"}

    def __repr__(self) -> str:
        return (f"MultistepConsistency(K={self.segments}, mode={self.mode!r}, teacher_steps={self.teacher_steps}, "
                f"teacher_sampler={self.teacher_sampler!r}, target={self.target!r})")
