"""Student networks of the distillation methods: wrappers around a teacher-architecture denoiser.

* :class:`GuidanceConditioned` (Meng et al. 2023, sec. 4.1): the guidance weight ``w`` becomes an input;
* :class:`DenoiserGenerator` (EMD, Xie et al. 2024): a one-step generator ``g(z) = x_hat(z, lambda*)``;
* :func:`wrap_student` rebuilds either from the ``student`` entry a distilled checkpoint records.

They live with the nets (not with the distillation losses) so that loading a distilled student for sampling needs
no part of :mod:`simdiff.distill` or :mod:`simdiff.train`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.nets.conditioning import LogSNREmbedding
from simdiff.process import DenoiserOutput

__all__ = ["GuidanceConditioned", "DenoiserGenerator", "wrap_student", "WRAPPERS"]

#: the ``student["wrapper"]`` names a checkpoint may record.
WRAPPERS = ("none", "guidance", "generator")


class GuidanceConditioned(nn.Module):
    """A denoiser that takes the guidance weight ``w`` ``[B]`` as an input (Meng et al. 2023, sec. 4.1).

    ``emb(w)`` (Fourier features + MLP, last layer zero-initialised) is passed to the wrapped network's backbone as
    ``extra_emb``, which adds it to the log-SNR embedding; with ``w``'s embedding at zero the student is exactly the
    teacher. ``model(z, logsnr, guidance=None, **cond)``; ``guidance=None`` means ``w = 0``.

    Args:
        model: a :class:`~simdiff.nets.DiffusionModel` (its backbone accepts ``extra_emb``).
        max_guidance: the clamp of the w-embedding's Fourier features (w beyond it embeds like ``max_guidance``).
    """

    guidance_input = True

    def __init__(self, model: nn.Module, *, max_guidance: float = 8.0) -> None:
        super().__init__()
        target = getattr(getattr(getattr(model, "backbone", None), "cond", None), "logsnr", None)
        if not isinstance(target, LogSNREmbedding):
            raise ValueError(f"guided students need a simdiff DiffusionModel (backbone.cond.logsnr), got "
                             f"{type(model).__name__}")
        self.model = model
        self.w_embed = LogSNREmbedding(target.mlp[-1].out_features, clamp=max_guidance)
        nn.init.zeros_(self.w_embed.mlp[-1].weight)
        nn.init.zeros_(self.w_embed.mlp[-1].bias)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, z: Tensor, logsnr: Tensor, guidance: Tensor | None = None, **cond: Any) -> DenoiserOutput:
        """``z`` ``[B, C, H, W]``, ``logsnr`` ``[B]`` or scalar, ``guidance`` ``[B]``, scalar or None (``w = 0``)."""
        b = z.shape[0]
        w = torch.zeros(b, device=z.device) if guidance is None else torch.as_tensor(guidance, device=z.device)
        w = w.float().reshape(-1).expand(b)
        return self.model(z, logsnr, extra_emb=self.w_embed(w), **cond)


class DenoiserGenerator(nn.Module):
    """One-step generator ``g(z) = denoiser(z, lambda*).x`` (EMD's teacher initialisation at a fixed log-SNR).

    Args:
        denoiser: a trainable denoiser module (e.g. a copy of an ``MLPDenoiser`` fitted to the teacher).
        logsnr_star: the fixed log-SNR ``lambda*`` at which ``z ~ N(0, I)`` is read as a noisy input.
    """

    def __init__(self, denoiser: nn.Module, logsnr_star: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(logsnr_star):
            raise ValueError(f"logsnr_star must be finite, got {logsnr_star}")
        self.denoiser = denoiser
        self.logsnr_star = float(logsnr_star)

    def forward(self, z: Tensor, **cond: Any) -> Tensor:
        """``z`` ``[B, ...]`` -> ``x`` ``[B, ...]``."""
        lam = torch.full((z.shape[0],), self.logsnr_star, dtype=z.dtype, device=z.device)
        return self.denoiser(z, lam, **cond).x


def wrap_student(net: nn.Module, student: dict[str, Any] | None) -> nn.Module:
    """Rewrap a rebuilt teacher-architecture network as the student recorded in a checkpoint's ``student`` entry
    (``{"wrapper": "none" | "guidance" | "generator", "logsnr_star": ...}``; ``None`` means "none")."""
    kind = (student or {}).get("wrapper", "none")
    if kind == "none":
        return net
    if kind == "guidance":
        return GuidanceConditioned(net)
    if kind == "generator":
        return DenoiserGenerator(net, float(student.get("logsnr_star", 0.0)))
    raise ValueError(f"unknown student wrapper {kind!r}; valid: {', '.join(WRAPPERS)}")
