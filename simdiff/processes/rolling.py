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

Per-frame levels. A level with at least two dims whose last dim is ``W`` (``[B, W]``) is read as the per-frame
log-SNRs themselves (``frame_logsnr`` and ``net_cond`` return it unchanged, the coefficients are the isotropic VP
ones per frame); a global level is a scalar or ``[B]``. So a :class:`~simdiff.nets.DiffusionModel` built with this
process is also a denoiser of the per-frame contract ``denoise(z [B, W, ...], logsnr [B, W])`` that
:func:`~simdiff.samplers.rolling.sample_rolling` and the training objective use, whatever the phase.

Training (:meth:`RollingDiffusion.objective`, :class:`RollingObjective`). Per window: a global time
``t ~ U(0, 1)`` (stratified over the batch), the phase "init" with probability ``init_fraction`` and the process's
own phase otherwise ("rolling"; "uniform" never mixes), per-frame local times ``t_k`` and log-SNRs
``lam_k = logsnr(t_k)``, ``z_k = alpha_k x_k + sigma_k eps_k``, and the loss

    L = mean_{k >= c} [ w(lam_k) * J(t_k) * mean_pixels (x_k - x_hat_k)^2 ]

over the ``R`` rolling frames (context frames, ``k < c``, are inputs only), with ``w`` the configured weighting
(``diffusion.weighting``, default sigmoid) at each frame's own log-SNR and ``J(t_k) = -dlogsnr/dt`` at the frame's
local time when ``diffusion.jacobian`` (each frame is weighted like a standard-diffusion example at its local time;
the factor ``dt_k / dt`` of the phase is left out). With the phase "uniform" and no context this is exactly the
standard per-example loss of :func:`simdiff.losses.diffusion_loss`. We understand the paper to train on a mixture of
the rolling and init schedules with a fraction it calls beta (sec. 3.4; appendix H searches over beta); that reading
is not verified against its text, and ``init_fraction = 0.1`` is our default, not checked against the paper's value.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.processes.base import GaussianProcess
from simdiff.processes.times import rand_on, sample_t

__all__ = ["RollingDiffusion", "RollingObjective", "local_times"]

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
        init_fraction: training only: the probability that a window is trained in the "init" phase instead of
            "rolling" (ignored for "init" and "uniform"; see the module docstring).
    """

    name = "rolling"

    def __init__(self, schedule: Any, *, window: int, context: int = 0, phase: str = "rolling",
                 init_fraction: float = 0.1) -> None:
        if schedule is None:
            raise ConfigError("rolling: needs a base schedule")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"rolling: window must be an integer >= 1, got {window!r}")
        if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context < window:
            raise ConfigError(f"rolling: context must be an integer in [0, window), got {context!r}")
        if phase not in PHASES:
            raise ConfigError(f"rolling: unknown phase {phase!r}; valid: {', '.join(PHASES)}")
        if isinstance(init_fraction, bool) or not isinstance(init_fraction, (int, float)) \
                or not 0 <= init_fraction <= 1:
            raise ConfigError(f"rolling: init_fraction must be a number in [0, 1], got {init_fraction!r}")
        super().__init__(schedule)
        self.window, self.context, self.phase = window, context, phase
        self.init_fraction = float(init_fraction)
        self.coef_shape = (window, 1, 1, 1)

    def with_phase(self, phase: str) -> RollingDiffusion:
        """The same process in the other phase (the sampler's start-up sweep uses "init")."""
        out = RollingDiffusion(self.schedule, window=self.window, context=self.context, phase=phase,
                               init_fraction=self.init_fraction)
        if getattr(self, "spec", None):
            out.spec = {**self.spec, "phase": phase}
        return out

    def is_per_frame(self, lam: Tensor) -> bool:
        """True when ``lam`` holds per-frame log-SNRs ``[..., W]`` (at least 2 dims) rather than global levels."""
        return torch.is_tensor(lam) and lam.dim() >= 2 and lam.shape[-1] == self.window

    def frame_logsnr(self, lam: Tensor) -> Tensor:
        """Per-frame log-SNR ``[*lam.shape, W]`` at global level ``lam`` (per-frame levels are returned as given)."""
        if self.is_per_frame(lam):
            return lam
        t = self.schedule.t_from_logsnr(lam.to(torch.float64)).clamp(0, 1)
        tk = local_times(t, window=self.window, context=self.context, phase=self.phase)
        return self.schedule.logsnr(tk).to(lam.dtype)

    def net_cond(self, lam: Tensor) -> Tensor:
        """The per-frame log-SNR ``[*lam.shape, W]``: what a video backbone is conditioned on."""
        return self.frame_logsnr(lam)

    def log_alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``(log alpha, log sigma)`` per frame, each ``[*lam.shape, W, 1, 1, 1]`` (``[B, W, 1, 1, 1]`` for per-frame
        levels ``[B, W]``)."""
        lead = lam.shape[:-1] if self.is_per_frame(lam) else lam.shape
        per_frame = self.frame_logsnr(lam).reshape(lead + self.coef_shape)
        return 0.5 * F.logsigmoid(per_frame), 0.5 * F.logsigmoid(-per_frame)

    def to_dict(self) -> dict[str, Any]:
        spec = getattr(self, "spec", None)
        if spec:
            return dict(spec)
        return {"name": self.name, "window": self.window, "context": self.context, "phase": self.phase,
                "init_fraction": self.init_fraction}

    # ----------------------------------------------------------------------------------------- video models
    def network_kwargs(self, data_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """Backbone data arguments for windows ``data_shape = (W, C, H, W')``: frames, channels, size, classes."""
        self.check_data_shape(data_shape)
        w, c, h, w2 = data_shape
        return {"frames": w, "channels": c, "size": (h, w2) if h != w2 else h, "num_classes": num_classes}

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        """Refuse data that are not windows of this process's ``W`` frames (one-line ConfigError)."""
        if len(data_shape) != 4 or data_shape[0] != self.window:
            raise ConfigError(f"rolling: data must be windows (W={self.window}, C, H, W'); got example shape "
                              f"{tuple(data_shape)} (set data.options.window to diffusion.process.window)")

    def objective(self, loss_cfg: Any) -> RollingObjective:
        """The training loss ``loss(model, batch, generator) -> [B]`` (see the module docstring)."""
        from simdiff.weighting import get_weighting

        if getattr(loss_cfg, "multiscale_base", None) is not None:
            raise ConfigError("rolling: diffusion.multiscale_base is not supported for frame windows")
        if getattr(loss_cfg, "cond_drop_prob", 0.0):
            raise ConfigError("rolling: diffusion.cond_drop_prob is not supported (video models are unconditional)")
        weighting = get_weighting(loss_cfg.weighting, **loss_cfg.weighting_params)
        return RollingObjective(self, weighting, jacobian=loss_cfg.jacobian, stratified=loss_cfg.stratified)

    def preview(self, model: Any, sample_cfg: Any, *, shape: tuple[int, ...], num_classes: int, out: Any,
                num: int, device: Any = "cpu") -> Any:
        """A rollout strip PNG of ``min(num, 4)`` rollouts of ``2 W`` frames (the training run's sample picture).
        Context frames, which a training hook has no data for, are zeros (:func:`simdiff.video.preview_rollout`)."""
        from simdiff.video import preview_rollout

        return preview_rollout(model, self, sample_cfg, shape=shape, out=out, num=num, device=device)

    def __repr__(self) -> str:
        return (f"RollingDiffusion(window={self.window}, context={self.context}, phase={self.phase!r}, "
                f"schedule={self.schedule!r})")



class RollingObjective:
    """The rolling-diffusion training loss ``loss(model, batch, generator=None) -> [B]`` (module docstring).

    ``model(z [B, W, ...], logsnr [B, W])`` is called with per-frame log-SNRs (a :class:`simdiff.nets.DiffusionModel`
    built with a :class:`RollingDiffusion` process reads them as such). ``batch["x"]`` is ``[B, W, C, H, W']``.
    """

    def __init__(self, process: RollingDiffusion, weighting: Any, *, jacobian: bool = True,
                 stratified: bool = True) -> None:
        self.process, self.weighting, self.jacobian, self.stratified = process, weighting, jacobian, stratified

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Global times ``t [B]``, the init-phase mask ``[B]`` (bool) and noise like ``x``, in that order of draws."""
        b = x.shape[0]
        t = sample_t(b, generator=generator, stratified=self.stratified, device=x.device, dtype=x.dtype)
        p = self.process.init_fraction if self.process.phase == "rolling" else 0.0
        init = rand_on((b,), generator, x.device, x.dtype) < p
        gen_device = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        return t, init, eps

    def frame_times(self, t: Tensor, init: Tensor) -> Tensor:
        """Local times ``[B, W]``: the init schedule where ``init``, else the process's phase."""
        proc = self.process
        own = local_times(t, window=proc.window, context=proc.context, phase=proc.phase)
        start = local_times(t, window=proc.window, context=proc.context, phase="init")
        return torch.where(init[:, None], start, own)

    def frame_weights(self, tk: Tensor) -> Tensor:
        """Per-frame loss weights ``[B, W]``: ``w(logsnr(t_k)) [* -dlogsnr/dt(t_k)]``, zero on context frames."""
        sched = self.process.schedule
        w = self.weighting(sched.logsnr(tk))
        if self.jacobian:
            w = w * -sched.dlogsnr_dt(tk)
        keep = torch.arange(self.process.window, device=tk.device) >= self.process.context
        return torch.where(keep, w, torch.zeros_like(w))

    def loss(self, model: Any, x: Tensor, *, t: Tensor, init: Tensor, eps: Tensor, cond: dict | None = None) -> Tensor:
        """Per-window losses ``[B]`` for given times, init mask and noise."""
        if x.dim() != 5 or x.shape[1] != self.process.window:
            raise ValueError(f"rolling loss: x must be [B, {self.process.window}, C, H, W], got {tuple(x.shape)}")
        tk = self.frame_times(t, init)
        lam = self.process.schedule.logsnr(tk)  # [B, W]
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        z = a[..., None, None, None] * x + s[..., None, None, None] * eps
        out = model(z, lam, **(cond or {}))
        sq = (x - out.x).pow(2).mean(dim=(2, 3, 4))  # [B, W]
        rolling = self.process.window - self.process.context
        return (self.frame_weights(tk) * sq).sum(1) / rolling

    def __call__(self, model: Any, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        x = batch["x"]
        t, init, eps = self.draw(x, generator)
        cond = {k: v for k, v in batch.items() if k != "x"}
        return self.loss(model, x, t=t, init=init, eps=eps, cond=cond)
