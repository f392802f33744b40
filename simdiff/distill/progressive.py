"""Progressive distillation (Salimans & Ho, "Progressive distillation for fast sampling of diffusion models",
ICLR 2022).

A student with ``N`` uniform-in-t DDIM steps learns to match *two* DDIM steps of a teacher with ``2N`` steps::

    i ~ U{0..N-1};  t = (i+1)/N;  t' = t - 0.5/N;  t'' = t - 1/N;  z_t = alpha_t x + sigma_t eps
    x1 = teacher(z_t, t);   z_t'  = DDIM_{t->t'}(x1, z_t)
    x2 = teacher(z_t', t'); z_t'' = DDIM_{t'->t''}(x2, z_t')
    target = invDDIM_{t->t''}(z_t'', z_t)      (paper eq. 8; process.ddim_invert_x)   and  target = x2 if i == 0
    loss   = w(lambda_t) ||x_student(z_t) - target||^2 / d,   w = max(SNR, 1) ("snr_trunc", default) or SNR + 1 ("v")

Then ``teacher <- student`` and ``N <- N / 2`` (:func:`next_round`). The curriculum is a pure function of the trainer
step (:class:`ProgressiveSchedule`); :meth:`ProgressiveDistillation.set_step` calls :func:`next_round` when the
round advances. The student keeps training across rounds, i.e. each round's student starts from the last student
(= the new teacher), as in the paper. The student's parameterisation (v in the paper) is the network's business
(``simdiff.toy_nets.MLPDenoiser(pred="v")``); the loss is on its x-view.

Optional ``guidance_range=(w_min, w_max)``: draw ``w ~ U[w_min, w_max]`` per example and pass it as the
``guidance`` conditioning to teacher and student (stage two of guided distillation, :mod:`simdiff.distill.guided`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from simdiff.distill.base import (
    Denoise,
    DistillationLoss,
    check_steps,
    frozen_copy,
    rand,
    randint,
    randn,
    split_batch,
    teacher_call,
)
from simdiff.process import add_noise, ddim_invert_x, ddim_step, expand
from simdiff.schedules import Schedule

__all__ = ["ProgressiveSchedule", "ProgressiveDistillation", "next_round", "progressive_target"]


@dataclass(frozen=True)
class ProgressiveSchedule:
    """Curriculum ``step -> (round, student_steps)``: round ``r`` distils ``start_steps / 2^r`` teacher steps into
    ``start_steps / 2^(r+1)`` student steps for ``steps_per_round`` trainer steps, down to ``end_steps``.

    Raises:
        ValueError: when the rounds cannot halve from ``start_steps`` to ``end_steps`` (ratio not a power of 2,
            ``end_steps >= start_steps``, or counts < 1).
    """

    start_steps: int
    end_steps: int
    steps_per_round: int

    def __post_init__(self) -> None:
        check_steps(self.start_steps, "start_steps")
        check_steps(self.end_steps, "end_steps")
        check_steps(self.steps_per_round, "steps_per_round")
        ratio, rem = divmod(self.start_steps, self.end_steps)
        if self.end_steps >= self.start_steps or rem or ratio & (ratio - 1):
            raise ValueError(
                f"progressive rounds must halve: start_steps={self.start_steps} -> end_steps={self.end_steps} "
                "needs start_steps = end_steps * 2^k with k >= 1"
            )

    @property
    def num_rounds(self) -> int:
        return (self.start_steps // self.end_steps).bit_length() - 1

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round

    def __call__(self, step: int) -> tuple[int, int]:
        """``(round, student_steps)`` at trainer ``step`` (the last round continues past ``total_steps``)."""
        rnd = min(max(step, 0) // self.steps_per_round, self.num_rounds - 1)
        return rnd, self.start_steps >> (rnd + 1)


def progressive_target(
    teacher: Denoise, z_t: Tensor, *, logsnr_t: Tensor, logsnr_mid: Tensor, logsnr_s: Tensor, last: Tensor,
    cond: dict,
) -> Tensor:
    """The x target that makes one student DDIM step ``t -> s`` equal two teacher DDIM steps ``t -> mid -> s``.

    ``last`` ``[B]`` bool marks examples whose student step ends on data (``i == 0``): their target is ``x2``.
    """
    x1 = teacher_call(teacher, z_t, logsnr_t, cond).x
    z_mid = ddim_step(z_t=z_t, x=x1, logsnr_s=logsnr_mid, logsnr_t=logsnr_t)
    x2 = teacher_call(teacher, z_mid, logsnr_mid, cond).x
    z_s = ddim_step(z_t=z_mid, x=x2, logsnr_s=logsnr_s, logsnr_t=logsnr_mid)
    target = ddim_invert_x(z_s=z_s, z_t=z_t, logsnr_s=logsnr_s, logsnr_t=logsnr_t)
    return torch.where(expand(last, z_t), x2, target)


def next_round(method: ProgressiveDistillation, student: nn.Module | None = None) -> None:
    """``teacher <- frozen copy of the student``, ``N <- N / 2`` (Salimans & Ho 2022, Algorithm 2's outer loop).

    Raises:
        ValueError: when ``N`` cannot be halved (odd or 1) or there is no student module to copy.
    """
    student = method.student if student is None else student
    if not isinstance(student, nn.Module):
        raise ValueError("next_round needs the student nn.Module (pass student= or give it to the method)")
    n = method.student_steps
    if n < 2 or n % 2:
        raise ValueError(f"progressive rounds must halve: cannot go below {n} student steps to {n / 2}")
    method.teacher = frozen_copy(student)
    method.student_steps = n // 2
    method.round += 1


class ProgressiveDistillation(DistillationLoss):
    """Progressive distillation loss object (see module docstring).

    Args:
        student: the student module (used by :func:`next_round`; the trainer passes it as ``model``).
        teacher: frozen denoiser with ``2 * student_steps`` uniform-t DDIM steps in mind.
        schedule: the log-SNR schedule defining the uniform-t grids.
        student_steps: ``N`` for a single round (exclusive with ``curriculum``).
        curriculum: a :class:`ProgressiveSchedule` (rounds advance in :meth:`set_step`).
        weighting: "snr_trunc" (max(SNR, 1), the paper's) or "v" (SNR + 1) or any ``simdiff.weighting`` name.
        guidance_range: ``(w_min, w_max)`` to draw a per-example guidance weight input (guided distillation).
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: Denoise,
        schedule: Schedule,
        *,
        student_steps: int | None = None,
        curriculum: ProgressiveSchedule | None = None,
        weighting: str = "snr_trunc",
        guidance_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(student, teacher, schedule, weighting=weighting)
        if (student_steps is None) == (curriculum is None):
            raise ValueError("ProgressiveDistillation needs exactly one of student_steps= or curriculum=")
        self.curriculum = curriculum
        self.student_steps = curriculum(0)[1] if curriculum is not None else check_steps(student_steps, "student_steps")
        self.round = 0
        if guidance_range is not None:
            lo, hi = (float(v) for v in guidance_range)
            if not lo <= hi:
                raise ValueError(f"guidance_range must be (w_min, w_max) with w_min <= w_max, got {guidance_range}")
            guidance_range = (lo, hi)
        self.guidance_range = guidance_range

    @property
    def sample_steps(self) -> int:
        return self.student_steps

    def aux_state_dict(self) -> dict[str, Tensor]:
        """The round, the student's step count and (after round 0) the round's teacher weights, for checkpoints."""
        out = {"round": torch.tensor(self.round), "student_steps": torch.tensor(self.student_steps)}
        if self.round > 0 and isinstance(self.teacher, nn.Module):
            out.update({f"teacher.{k}": v.detach().clone() for k, v in self.teacher.state_dict().items()})
        return out

    def load_aux_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`aux_state_dict` (a resume mid-round gets that round's teacher back, not the student)."""
        rnd, steps = int(state["round"]), int(state["student_steps"])
        if rnd > 0:
            if not isinstance(self.student, nn.Module):
                raise ValueError("restoring a progressive round's teacher needs the student nn.Module")
            teacher = frozen_copy(self.student)
            teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
            self.teacher = teacher
        self.round, self.student_steps = rnd, steps

    def set_step(self, step: int) -> None:
        """Advance the curriculum; on a round change the current student becomes the teacher.

        A resume restores the round's teacher first (:meth:`load_aux_state_dict`), so it continues exactly.
        """
        super().set_step(step)
        if self.curriculum is None:
            return
        rnd, n = self.curriculum(step)
        if rnd < self.round:
            raise ValueError(f"progressive curriculum cannot go back from round {self.round} to {rnd} (step {step})")
        if rnd > self.round:
            self.student_steps = 2 * n  # next_round halves it to n, whatever round we jump from
            next_round(self)
            self.round = rnd

    def sample_guidance(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        lo, hi = self.guidance_range
        return lo + (hi - lo) * rand((x.shape[0],), like=x, generator=generator)

    def loss(self, model: Denoise, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        x, cond = split_batch(batch)
        if self.guidance_range is not None and "guidance" not in cond:
            cond["guidance"] = self.sample_guidance(x, generator)
        b, n = x.shape[0], self.student_steps
        i = randint(n, (b,), like=x, generator=generator)
        t = (i + 1) / n
        lam_t, lam_mid = self.times_to_logsnr(t), self.times_to_logsnr(t - 0.5 / n)
        lam_s = self.times_to_logsnr(t - 1 / n)
        z_t = add_noise(x, randn(tuple(x.shape), like=x, generator=generator), logsnr=lam_t)
        target = progressive_target(
            self.teacher, z_t, logsnr_t=lam_t, logsnr_mid=lam_mid, logsnr_s=lam_s, last=i == 0, cond=cond
        )
        x_hat = model(z_t, lam_t, **cond).x
        err = (x_hat - target).pow(2).reshape(b, -1).mean(1)
        return self.weighting(lam_t) * err

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(round={self.round}, student_steps={self.student_steps}, "
                f"weighting={self.weighting.name!r}, guidance_range={self.guidance_range})")
