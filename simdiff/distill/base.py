"""Shared plumbing for step-distillation losses: teacher/student handling, grids, random draws, the base class.

Every distillation method in :mod:`simdiff.distill` is a *loss object* returning per-example losses ``[B]``, like
every loss the trainer takes::

    loss = Method(student, teacher, schedule, **hparams)
    loss.set_step(step)                              # curriculum: a pure function of the trainer step
    per_example = loss(model, batch, generator)     # model = the student being trained; -> Tensor[B]
    samples = loss.sample(student, z, cond=cond)    # the student's few-step sampler (its distilled step count)
    loss.sampler_spec()                             # {"sampler": "ddim", "steps": K, "grid": "uniform_t"}

Teachers are frozen denoiser callables ``teacher(z, logsnr, **cond) -> DenoiserOutput`` (an exact
``GaussianMixture.denoise`` or a trained network); they are always called under ``torch.no_grad``. A teacher that
is an ``nn.Module`` is put in eval mode with gradients off (:func:`as_teacher`). Batches are dicts with ``"x"``
(``[B, ...]`` data) and optional conditioning keys (:data:`COND_KEYS`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.process import DenoiserOutput
from simdiff.samplers import make_grid, sample_ddim
from simdiff.schedules import Schedule
from simdiff.weighting import get_weighting

__all__ = [
    "COND_KEYS",
    "Denoise",
    "DistillationLoss",
    "as_teacher",
    "frozen_copy",
    "split_batch",
    "teacher_call",
    "check_steps",
    "uniform_t_grid",
    "rand",
    "randn",
    "randint",
]

#: Conditioning keywords a batch may carry (passed to teacher and student); ``guidance`` is the guidance weight
#: ``w`` ``[B]`` of guided-distillation students (Meng et al. 2023).
COND_KEYS: tuple[str, ...] = ("labels", "context", "context_mask", "guidance")

Denoise = Callable[..., DenoiserOutput]


def check_steps(value: Any, name: str) -> int:
    """A step count must be an int >= 1; returns it or raises a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def as_teacher(teacher: Denoise | None) -> Denoise | None:
    """Freeze an ``nn.Module`` teacher in place (eval mode, ``requires_grad=False``); plain callables and ``None``
    (methods without a teacher, e.g. consistency training) pass through."""
    if teacher is None:
        return None
    if isinstance(teacher, nn.Module):
        teacher.eval()
        teacher.requires_grad_(False)
    if not callable(teacher):
        raise ValueError(f"teacher must be a denoiser callable, got {type(teacher).__name__}")
    return teacher


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with gradients off (``teacher <- student``, target networks)."""
    out = copy.deepcopy(module)
    out.eval()
    out.requires_grad_(False)
    return out


def split_batch(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """``batch -> (x [B, ...], cond)``; ``cond`` holds the :data:`COND_KEYS` present in the batch."""
    if not isinstance(batch, dict) or "x" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch must be a dict with an 'x' entry; got {keys}")
    return batch["x"], {k: batch[k] for k in COND_KEYS if k in batch}


def teacher_call(teacher: Denoise, z: Tensor, logsnr: Tensor, cond: dict[str, Any]) -> DenoiserOutput:
    """Evaluate a frozen teacher without building a graph; outputs cast to ``z``'s dtype."""
    with torch.no_grad():
        out = teacher(z, logsnr, **cond)
    return DenoiserOutput(x=out.x.to(z.dtype), eps=out.eps.to(z.dtype), v=out.v.to(z.dtype))


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def rand(shape: tuple[int, ...], *, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``U[0, 1)`` drawn on the generator's device, returned on ``like``'s device and dtype."""
    g = _gen_device(generator, like.device)
    return torch.rand(shape, generator=generator, device=g, dtype=like.dtype).to(like.device)


def randn(shape: tuple[int, ...], *, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``N(0, 1)`` drawn on the generator's device, returned on ``like``'s device and dtype."""
    g = _gen_device(generator, like.device)
    return torch.randn(shape, generator=generator, device=g, dtype=like.dtype).to(like.device)


def randint(high: Tensor | int, shape: tuple[int, ...], *, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Integers uniform on ``{0, ..., high - 1}`` (``high`` may be a per-example tensor), as ``like``'s dtype."""
    u = rand(shape, like=like.double() if like.is_floating_point() else like, generator=generator).double()
    high_t = torch.as_tensor(high, dtype=torch.float64, device=u.device)
    return torch.minimum(torch.floor(u * high_t), high_t - 1).to(like.dtype)


def uniform_t_grid(schedule: Schedule, steps: int) -> Tensor:
    """``[steps + 1]`` float64 increasing log-SNRs at ``t = 1, 1 - 1/steps, ..., 1/steps`` then ``+inf``
    (``simdiff.samplers.make_grid(..., kind="uniform_t")``; the final ``+inf`` lands on data)."""
    return make_grid(schedule, check_steps(steps, "steps"), kind="uniform_t")


class DistillationLoss:
    """Base class of the distillation loss objects (see the module docstring for the contract).

    Subclasses implement :meth:`loss` and :attr:`sample_steps`; they may override :meth:`set_step` (curriculum)
    and :meth:`sample`. ``weighting`` names a ``simdiff.weighting`` weighting on ``||x - x_hat||^2`` ("snr_trunc" =
    max(SNR, 1), "v" = SNR + 1, ...).
    """

    def __init__(self, student: nn.Module | None, teacher: Denoise | None, schedule: Schedule, *, weighting: str = "v"):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a simdiff Schedule, got {type(schedule).__name__}")
        self.student = student
        self.teacher = as_teacher(teacher)
        self.schedule = schedule
        self.weighting = get_weighting(weighting)
        self.step = 0

    # -- curriculum -------------------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Set the trainer step (curriculum state is a pure function of it)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self.step = step

    # -- loss ---------------------------------------------------------------------------------------------------
    def loss(self, model: Denoise, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def __call__(
        self, model: Denoise, batch: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> Tensor:
        return self.loss(model, batch, generator)

    def times_to_logsnr(self, t: Tensor) -> Tensor:
        """Schedule log-SNR at ``t`` computed in float64, cast to ``t``'s dtype."""
        return self.schedule.logsnr(t.double()).to(t.dtype)

    # -- sampling -----------------------------------------------------------------------------------------------
    @property
    def sample_steps(self) -> int:
        """The step count the student is (currently) distilled for."""
        raise NotImplementedError

    def sampler_spec(self) -> dict[str, Any]:
        """How to sample the student, for checkpoints."""
        return {"sampler": "ddim", "steps": self.sample_steps, "grid": "uniform_t"}

    def sample(
        self, student: Denoise, z: Tensor, *, generator: torch.Generator | None = None, cond: dict | None = None
    ) -> Tensor:
        """Sample the student with deterministic DDIM at its distilled step count on the uniform-t grid."""
        return sample_ddim(student, z, uniform_t_grid(self.schedule, self.sample_steps), generator=generator,
                           cond=cond)
