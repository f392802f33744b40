"""The denoising diffusion loss over any denoiser, time sampling and condition dropout.

Per example (returned as ``[B]``; the trainer reduces)::

    t ~ U(0, 1) (stratified by default),  logsnr = schedule.logsnr(t),  z = alpha x + sigma eps
    out = denoiser(z, logsnr, **cond)                      (DenoiserOutput: x, eps, v views)
    loss = w(logsnr) * mean_pixels (x - out.x)^2          [ * (-dlogsnr/dt(t))  if jacobian ]

Every weighting is a weight on the x-space error (``simdiff.weighting``), so the loss works for any prediction head.
With ``jacobian=True`` the expectation over ``t`` becomes an integral over log-SNR (Kingma & Gao 2023, VDM++ eq. 5;
SiD2, Hoogeboom et al. 2024 sec. 3), so the time schedule only acts as an importance distribution.

The noising process (:mod:`simdiff.processes`, default isotropic) supplies the times, levels, noised input, the
weight and the Jacobian. A process with per-element coefficients gets a per-element weight in its basis::

    loss = mean_elements( w(logsnr_d) * encode(x - x_hat)_d^2 )   [ * (-dlam/dt(t))  if jacobian ]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError, from_dict
from simdiff.process import Denoiser
from simdiff.processes import DEFAULT_PROCESS, GaussianProcess, IsotropicGaussian, build_process
from simdiff.processes.times import rand_on as _rand
from simdiff.processes.times import sample_t
from simdiff.schedules import Schedule, schedule_from_dict
from simdiff.weighting import Weighting, get_weighting

__all__ = ["sample_t", "drop_labels", "diffusion_loss", "multiscale_sq_error", "LossConfig", "DiffusionLoss"]


def drop_labels(
    labels: Tensor, *, prob: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by ``null_label`` independently with probability ``prob`` (CFG training, Ho & Salimans
    2022 Alg. 1). Returns a new LongTensor shaped like ``labels``."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {prob}")
    drop = _rand(tuple(labels.shape), generator, labels.device, torch.float32) < prob
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def _check_multiscale(shape: torch.Size, base: int) -> None:
    h, w = shape[-2], shape[-1]
    ok = base >= 1 and h % base == 0 and w % (h // base) == 0 and ((h // base) & (h // base - 1)) == 0
    if not ok:
        raise ValueError(
            f"multiscale_base={base} needs image height {h} = base * 2^k and width {w} divisible by 2^k "
            f"(x of shape {tuple(shape)})"
        )


def multiscale_sq_error(err: Tensor, *, base: int) -> Tensor:
    """Multiscale squared error of simple diffusion (Hoogeboom et al. 2023, sec. 3.3).

    ``sum_{s = d, d/2, ..., base} (d / s) * mean_pixels( D_s[err]^2 )`` with ``D_s`` repeated 2x2 average pooling
    to side ``s`` and ``d`` the image height. The paper weights scale ``s`` by ``1/s``; here every term is multiplied
    by the constant ``d`` so the full-resolution term has weight 1 (``base = d`` reproduces the plain per-pixel
    mean; the optimum is unchanged).

    Args:
        err: ``[B, C, H, W]`` error (e.g. ``x - x_hat``).
        base: the smallest side length included.

    Returns:
        ``[B]``.
    """
    if err.dim() != 4:
        raise ValueError(f"multiscale error needs [B, C, H, W], got shape {tuple(err.shape)}")
    _check_multiscale(err.shape, base)
    d = s = err.shape[-2]
    total = err.pow(2).mean(dim=(1, 2, 3))
    while s // 2 >= base:
        err, s = F.avg_pool2d(err, 2), s // 2
        total = total + (d / s) * err.pow(2).mean(dim=(1, 2, 3))
    return total


def diffusion_loss(
    denoiser: Denoiser,
    x: Tensor,
    *,
    schedule: Schedule | None = None,
    weighting: Weighting,
    t: Tensor | None = None,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
    jacobian: bool = False,
    multiscale_base: int | None = None,
    stratified: bool = True,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Per-example weighted denoising loss ``w(logsnr) * mean (x - x_hat)^2`` (times ``-dlogsnr/dt`` if jacobian).

    Multiscale (``multiscale_base``): simple diffusion's loss is on pooled *eps* errors. Because
    ``eps - eps_hat = (alpha / sigma)(x_hat - x)`` with per-example scalars and pooling is linear,
    ``||D_s(eps - eps_hat)||^2 = SNR * ||D_s(x - x_hat)||^2`` exactly at every scale. So the pooled *x* error with the
    usual x-space weight is exact and consistent for every weighting: with ``weighting="eps"`` this is the paper's
    loss (times the constant ``d``, see :func:`multiscale_sq_error`), with any other weighting the same multiscale
    sum re-weighted like the single-scale loss.

    Args:
        denoiser: ``denoiser(z, logsnr, **cond) -> DenoiserOutput``.
        x: ``[B, C, H, W]`` clean data.
        schedule: ``logsnr(t)`` / ``dlogsnr_dt(t)`` (``simdiff.schedules``).
        weighting: ``w(logsnr)`` on the x-error (``simdiff.weighting``).
        t: ``[B]`` times; sampled with :func:`sample_t` (``stratified``) if omitted.
        eps: noise like ``x``; standard normal if omitted.
        generator: randomness for ``t`` and ``eps``.
        cond: conditioning keywords passed to the denoiser (``labels``, ``context``, ...).
        jacobian: multiply by ``-dlogsnr/dt(t)`` (VDM++ / SiD2 integral over log-SNR).
        multiscale_base: smallest side of the multiscale loss; ``None`` = single scale (isotropic process only).
        process: the noising process; ``None`` = :class:`~simdiff.processes.IsotropicGaussian` on ``schedule``.

    Returns:
        ``[B]`` losses, dtype of ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"diffusion_loss expects x of shape [B, C, H, W], got {tuple(x.shape)}")
    if process is None:
        if schedule is None:
            raise ValueError("diffusion_loss needs a schedule or a process")
        process = IsotropicGaussian(schedule)
    b = x.shape[0]
    if t is None:
        t = process.sample_times(b, generator=generator, stratified=stratified, device=x.device, dtype=x.dtype)
    if t.shape != (b,):
        raise ValueError(f"t must have shape [{b}] for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if eps is None:
        gen_device = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    elif eps.shape != x.shape:
        raise ValueError(f"eps of shape {tuple(eps.shape)} does not match x of shape {tuple(x.shape)}")
    logsnr = process.level(t)
    z = process.add_noise(x, eps, lam=logsnr)
    out = denoiser(z, logsnr, **(cond or {}))
    err = x - out.x
    weight = process.loss_weight(logsnr, weighting)
    if weight.dim() == logsnr.dim():  # one weight per example
        if multiscale_base is None:
            sq = err.pow(2).mean(dim=(1, 2, 3))
        else:
            sq = multiscale_sq_error(err, base=multiscale_base)
        loss = weight * sq
    else:
        if multiscale_base is not None:
            raise ValueError(f"multiscale_base needs one weight per example; process {process.name!r} has "
                             f"per-element weights of shape {tuple(weight.shape)}")
        loss = (process.fit(weight, lam=logsnr, like=x) * process.encode(err).pow(2)).mean(dim=(1, 2, 3))
    if jacobian:
        loss = loss * process.jacobian(t)
    return loss


@dataclass(frozen=True)
class LossConfig:
    """Serialisable config of :class:`DiffusionLoss` (validate with ``configuration.from_dict``).

    Defaults are the SiD2 recipe: sigmoid weighting with ``-dlogsnr/dt`` (VDM++ form) on a cosine schedule.
    ``process`` names a registered process (:func:`simdiff.processes.build_process`); configs without the key get
    the isotropic one.
    ``null_label`` is required when ``cond_drop_prob > 0`` and labels are used (the null / unconditional label is
    ``num_classes``); dropped ``context`` tokens are replaced by zeros (so guidance must use a zero null context).
    """

    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "cosine"})
    weighting: str = "sigmoid"
    weighting_params: dict[str, Any] = field(default_factory=dict)
    jacobian: bool = True
    stratified: bool = True
    cond_drop_prob: float = 0.0
    null_label: int | None = None
    multiscale_base: int | None = None
    process: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PROCESS))


class DiffusionLoss:
    """The training loss as a plain callable: ``loss(model, batch, generator=None) -> [B]``.

    ``batch`` holds ``"x"`` ``[B, C, H, W]`` and optionally ``"labels"`` ``[B]`` (long), ``"context"`` ``[B, L, C]``,
    ``"context_mask"`` ``[B, L]``. With ``cond_drop_prob > 0`` each example's condition is dropped independently:
    labels become ``null_label``, context becomes zeros (mask unchanged), the same examples for both.
    ``process`` defaults to the isotropic process on ``schedule``.
    """

    def __init__(
        self,
        schedule: Schedule,
        weighting: Weighting | str,
        *,
        jacobian: bool = False,
        stratified: bool = True,
        cond_drop_prob: float = 0.0,
        null_label: int | None = None,
        multiscale_base: int | None = None,
        process: GaussianProcess | None = None,
    ) -> None:
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.schedule = schedule
        self.process = IsotropicGaussian(schedule) if process is None else process
        self.weighting = get_weighting(weighting) if isinstance(weighting, str) else weighting
        self.jacobian = jacobian
        self.stratified = stratified
        self.cond_drop_prob = cond_drop_prob
        self.null_label = null_label
        self.multiscale_base = multiscale_base

    @classmethod
    def from_config(cls, cfg: LossConfig | dict[str, Any]) -> DiffusionLoss:
        """Build from a :class:`LossConfig` or a plain dict (unknown keys rejected by name)."""
        if isinstance(cfg, dict):
            cfg = from_dict(LossConfig, cfg, where="loss")
        schedule = schedule_from_dict(cfg.schedule)
        return cls(
            schedule,
            get_weighting(cfg.weighting, **cfg.weighting_params),
            jacobian=cfg.jacobian,
            stratified=cfg.stratified,
            cond_drop_prob=cfg.cond_drop_prob,
            null_label=cfg.null_label,
            multiscale_base=cfg.multiscale_base,
            process=build_process(cfg.process, schedule),
        )

    def config(self) -> LossConfig:
        """The :class:`LossConfig` that rebuilds this loss."""
        w = self.weighting.to_dict()
        return LossConfig(
            schedule=self.schedule.to_dict(),
            weighting=w.pop("name"),
            weighting_params=w,
            jacobian=self.jacobian,
            stratified=self.stratified,
            cond_drop_prob=self.cond_drop_prob,
            null_label=self.null_label,
            multiscale_base=self.multiscale_base,
            process=self.process.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.config())

    def _cond(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
        cond = {k: batch[k] for k in ("labels", "context", "context_mask") if k in batch}
        if self.cond_drop_prob == 0.0 or not ({"labels", "context"} & cond.keys()):
            return cond
        b = batch["x"].shape[0]
        drop = _rand((b,), generator, batch["x"].device, torch.float32) < self.cond_drop_prob
        if "labels" in cond:
            if self.null_label is None:
                raise ConfigError("DiffusionLoss: cond_drop_prob > 0 with labels needs null_label (= num_classes)")
            labels = cond["labels"]
            cond["labels"] = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        if "context" in cond:
            ctx = cond["context"]
            cond["context"] = torch.where(drop.reshape((b,) + (1,) * (ctx.dim() - 1)), torch.zeros_like(ctx), ctx)
        return cond

    def __call__(self, model: Denoiser, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        if "x" not in batch:
            raise ValueError(f"batch needs an 'x' entry; got keys {sorted(batch)}")
        return diffusion_loss(
            model,
            batch["x"],
            schedule=self.schedule,
            weighting=self.weighting,
            generator=generator,
            cond=self._cond(batch, generator),
            jacobian=self.jacobian,
            multiscale_base=self.multiscale_base,
            stratified=self.stratified,
            process=self.process,
        )

    def __repr__(self) -> str:
        return f"DiffusionLoss({self.to_dict()})"
