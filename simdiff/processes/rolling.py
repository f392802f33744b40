"""Rolling diffusion (Ruhe, Heek, Salimans & Hoogeboom, ICML 2024, "Rolling Diffusion Models", arXiv 2402.09470).

A window of ``W`` consecutive frames ``z [B, W, C, H, W']`` is noised frame by frame: frame ``k`` has its own *local
time* ``t_k`` and the usual variance-preserving coefficients of the base schedule at ``t_k``
(``alpha_k^2 = sigmoid(logsnr(t_k))``). With ``c`` clean context frames first (local time 0 throughout) and
``R = W - c`` rolling frames, a global time ``t`` in ``[0, 1]`` gives

    rolling:  t_k = clip((k - c + t) / R, 0, 1)        later frames noisier; t: 1 -> 0 lowers every t_k by 1 / R
    init:     t_k = clip((k - c) / R + t, 0, 1)        from an all-noise window (t = 1) to the rolling state at t = 0
    uniform:  t_k = t                                  every rolling frame at one level: standard video diffusion

(context frames: ``t_k = 0``). After one sweep of ``t`` from 1 to 0 the first rolling frame is at local time 0
(clean) and is emitted; the window drops its first frame and appends a pure-noise frame, which is again the rolling
state at ``t = 1`` (:func:`simdiff.samplers.rolling.sample_rolling`).

As a :class:`~simdiff.processes.base.GaussianProcess` the level ``lam`` is the base schedule's log-SNR of the
*global* time, ``t = schedule.t_from_logsnr(lam)``, and the coefficients are per frame, ``coef_shape = (W, 1, 1, 1)``
(identity basis), so DDIM and DDPM steps act frame by frame through the seam; ``net_cond(lam)`` is the per-frame
log-SNR ``[*lam.shape, W]`` a video backbone is conditioned on. Local time 0 is the schedule's ``logsnr_max``
(finite), so a context frame sits at that level and DDIM leaves a frame whose level does not change untouched.
The init schedule's form and the handling of context frames are our reading of the paper (not verified against its
text; see docs/DECISIONS.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.processes.base import GaussianProcess

__all__ = ["RollingDiffusion", "local_times"]

PHASES = ("rolling", "init", "uniform")


def local_times(t: Tensor, *, window: int, context: int = 0, phase: str = "rolling") -> Tensor:
    """Per-frame local times ``[*t.shape, window]`` for global times ``t`` (see the module docstring)."""
    rolling = window - context
    k = torch.arange(window, dtype=t.dtype, device=t.device) - context
    t = t[..., None]
    if phase == "rolling":
        tk = (k + t) / rolling
    elif phase == "init":
        tk = k / rolling + t
    elif phase == "uniform":
        tk = t.expand(t.shape[:-1] + (window,))
    else:
        raise ValueError(f"unknown rolling phase {phase!r}; valid: {', '.join(PHASES)}")
    return torch.where(k < 0, torch.zeros_like(tk), tk.clamp(0, 1))


class RollingDiffusion(GaussianProcess):
    """Per-frame local times in a sliding window (see the module docstring).

    Args:
        schedule: the base log-SNR schedule (local time -> per-frame log-SNR; global level -> global time).
        window: frames in the window ``W`` (context included).
        context: clean context frames at the start of the window (``0 <= context < window``).
        phase: "rolling" (the sliding state), "init" (the start-up from an all-noise window) or "uniform" (all
            rolling frames at the global time: the standard-diffusion baseline over a window).
    """

    name = "rolling"

    def __init__(self, schedule: Any, *, window: int, context: int = 0, phase: str = "rolling") -> None:
        if schedule is None:
            raise ConfigError("rolling: needs a base schedule")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"rolling: window must be an integer >= 1, got {window!r}")
        if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context < window:
            raise ConfigError(f"rolling: context must be an integer in [0, window), got {context!r}")
        if phase not in PHASES:
            raise ConfigError(f"rolling: unknown phase {phase!r}; valid: {', '.join(PHASES)}")
        super().__init__(schedule)
        self.window, self.context, self.phase = window, context, phase
        self.coef_shape = (window, 1, 1, 1)

    def with_phase(self, phase: str) -> RollingDiffusion:
        """The same process in the other phase (the sampler's start-up sweep uses "init")."""
        out = RollingDiffusion(self.schedule, window=self.window, context=self.context, phase=phase)
        if getattr(self, "spec", None):
            out.spec = {**self.spec, "phase": phase}
        return out

    def frame_logsnr(self, lam: Tensor) -> Tensor:
        """Per-frame log-SNR ``[*lam.shape, W]`` at global level ``lam``."""
        t = self.schedule.t_from_logsnr(lam.to(torch.float64)).clamp(0, 1)
        tk = local_times(t, window=self.window, context=self.context, phase=self.phase)
        return self.schedule.logsnr(tk).to(lam.dtype)

    def net_cond(self, lam: Tensor) -> Tensor:
        """The per-frame log-SNR ``[*lam.shape, W]``: what a video backbone is conditioned on."""
        return self.frame_logsnr(lam)

    def log_alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``(log alpha, log sigma)`` per frame, each ``[*lam.shape, W, 1, 1, 1]``."""
        per_frame = self.frame_logsnr(lam).reshape(lam.shape + self.coef_shape)
        return 0.5 * F.logsigmoid(per_frame), 0.5 * F.logsigmoid(-per_frame)

    def to_dict(self) -> dict[str, Any]:
        spec = getattr(self, "spec", None)
        if spec:
            return dict(spec)
        return {"name": self.name, "window": self.window, "context": self.context, "phase": self.phase}

    def __repr__(self) -> str:
        return (f"RollingDiffusion(window={self.window}, context={self.context}, phase={self.phase!r}, "
                f"schedule={self.schedule!r})")

