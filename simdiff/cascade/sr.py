"""Super-resolution denoiser conditioned on an upsampled low-resolution image, with noise-conditioning augmentation.

The super-resolution stage of a cascade (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image
Generation", sec. 3 and 4.3; Saharia et al. 2022, Imagen, sec. 2.5): the low-resolution image ``[B, C, h, w]`` is
upsampled (bilinear or nearest) to the target size ``H x W`` and concatenated to the noisy input ``z`` on the channel
axis, together with a presence flag (1 = a low-resolution input is given, 0 = the null condition of classifier-free
guidance, whose low-resolution channels are zeros). So the backbone sees ``2C + 1`` channels and predicts ``2C + 1``;
the first ``C`` are the denoiser's prediction (``x``, ``eps`` and ``v`` are per-element, so the other channels are
simply not used).

Noise-conditioning augmentation: at training time the low-resolution input is corrupted by the forward process at a
log-SNR ``lam_aug`` drawn per example, ``y = alpha(lam_aug) low_res + sigma(lam_aug) e`` (variance preserving), and
``lam_aug`` is given to the network through its own Fourier-feature embedding, added to the backbone's log-SNR
embedding (the backbones' ``extra_emb`` input). At sampling the level is fixed (``aug_logsnr``; ``None`` = no
corruption, embedded as the clamp value ``+20``). The draw used here is uniform in log-SNR over
``[aug_min, aug_max]`` plus a fraction ``clean_prob`` of uncorrupted inputs; Ho et al. draw the augmentation level as
a time ``s`` uniform on ``[0, s_max]`` of the forward process (their "non-truncated conditioning augmentation"), and
Imagen draws it uniformly in ``[0, 1]``; the log-SNR form is this library's choice (not from either paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simdiff.configuration import ConfigError
from simdiff.losses import DiffusionLoss, LossConfig, diffusion_loss, drop_labels
from simdiff.nets import DiffusionModel
from simdiff.nets.conditioning import LogSNREmbedding
from simdiff.process import DenoiserOutput
from simdiff.processes.times import rand_on

__all__ = ["SRConfig", "SuperResolution", "LowResolution", "SRLoss", "downsample", "upsample", "augment",
           "low_res_pairs", "LOW_RES_NULL"]

#: the null (unconditional) low-resolution conditioning for classifier-free guidance: zeros and a 0 presence flag.
LOW_RES_NULL: dict[str, Any] = {"low_res": 0.0, "low_res_mask": 0.0}


@dataclass(frozen=True)
class SRConfig:
    """The super-resolution settings of a run (the ``sr:`` section of its YAML).

    Attributes:
        low_res_size: side of the low-resolution input (e.g. 14 for 14 -> 28).
        upsample: "bilinear" or "nearest": how the low-resolution input is brought to the target size.
        downsample: how training pairs are made from the data: "area" (average pooling) or "antialias"
            (antialiased bilinear, the resize ``data.image_size`` uses, i.e. what a base model was trained on).
        aug_min, aug_max: training augmentation log-SNR range (uniform).
        clean_prob: fraction of training examples whose low-resolution input is not corrupted (level ``+inf``).
        aug_logsnr: the fixed augmentation level used at sampling by default (``None``: no corruption).
        cond_drop_prob: probability of dropping the low-resolution input (CFG training; zeros + flag 0).
    """

    low_res_size: int = 14
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    downsample: Literal["area", "antialias"] = "area"
    aug_min: float = -2.0
    aug_max: float = 8.0
    clean_prob: float = 0.1
    aug_logsnr: float | None = 4.0
    cond_drop_prob: float = 0.0

    def __post_init__(self):
        if isinstance(self.low_res_size, bool) or not isinstance(self.low_res_size, int) or self.low_res_size < 1:
            raise ConfigError(f"sr.low_res_size must be a positive integer, got {self.low_res_size!r}")
        if self.upsample not in ("bilinear", "nearest"):
            raise ConfigError(f"sr.upsample must be 'bilinear' or 'nearest', got {self.upsample!r}")
        if self.downsample not in ("area", "antialias"):
            raise ConfigError(f"sr.downsample must be 'area' or 'antialias', got {self.downsample!r}")
        if not (math.isfinite(self.aug_min) and math.isfinite(self.aug_max)) or self.aug_min > self.aug_max:
            raise ConfigError(f"sr.aug_min <= sr.aug_max (finite) needed, got {self.aug_min}, {self.aug_max}")
        for name in ("clean_prob", "cond_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"sr.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.aug_logsnr is not None and math.isnan(self.aug_logsnr):
            raise ConfigError("sr.aug_logsnr must be a number or null")


def downsample(x: Tensor, size: int, *, mode: str = "area") -> Tensor:
    """``[B, C, H, W]`` -> ``[B, C, size, size]`` by area averaging or antialiased bilinear resizing."""
    if x.dim() != 4:
        raise ValueError(f"downsample expects [B, C, H, W], got {tuple(x.shape)}")
    if mode == "area":
        return F.interpolate(x, size=(size, size), mode="area")
    if mode == "antialias":
        from simdiff.data.transforms import resize_images

        return resize_images(x, size)
    raise ValueError(f"unknown downsample mode {mode!r}; valid: area, antialias")


def upsample(low_res: Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, *size]`` (bilinear with ``align_corners=False``, or nearest)."""
    if mode == "nearest":
        return F.interpolate(low_res, size=size, mode="nearest")
    return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)


def augment(low_res: Tensor, logsnr: Tensor, noise: Tensor) -> Tensor:
    """Forward-process corruption ``alpha low_res + sigma noise`` at per-example ``logsnr`` ``[B]`` (VP:
    ``alpha^2 = sigmoid(lam)``, ``sigma^2 = sigmoid(-lam)``); examples at ``+inf`` are returned unchanged."""
    lam = logsnr.to(device=low_res.device, dtype=torch.float64).reshape(-1, *([1] * (low_res.dim() - 1)))
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    out = (alpha * low_res.double() + sigma * noise.double()).to(low_res.dtype)
    return torch.where(torch.isinf(lam) & (lam > 0), low_res, out)


class SuperResolution(nn.Module):
    """``model(z, logsnr, low_res=, aug_logsnr=, low_res_mask=, labels=) -> DenoiserOutput`` of shape ``z``.

    Args:
        net: a :class:`~simdiff.nets.DiffusionModel` whose backbone was built for ``2C + 1`` image channels at the
            target size (see :func:`simdiff.cascade.train.build_sr_network`).
        channels: ``C``, the image channels.
        low_res_size: side ``h = w`` of the low-resolution input.
        upsample: "bilinear" or "nearest".
    """

    def __init__(self, net: DiffusionModel, *, channels: int, low_res_size: int, upsample: str = "bilinear"):
        super().__init__()
        c_in = net.backbone.image_shape[0]
        if c_in != 2 * channels + 1:
            raise ValueError(f"the backbone takes {c_in} channels; a super-resolution net for {channels}-channel "
                             f"images needs {2 * channels + 1} (z, upsampled low-res, flag)")
        self.net, self.channels, self.low_res_size, self.upsample = net, channels, low_res_size, upsample
        emb_dim = net.backbone.cond.logsnr.mlp[-1].out_features
        self.aug_embed = LogSNREmbedding(emb_dim)
        nn.init.zeros_(self.aug_embed.mlp[-1].weight)  # starts as a plain model: the level embedding adds 0
        nn.init.zeros_(self.aug_embed.mlp[-1].bias)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, h, w = self.net.image_shape
        return (self.channels, h, w)

    @property
    def low_res_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.low_res_size, self.low_res_size)

    def forward(
        self,
        z: Tensor,
        logsnr: Tensor,
        low_res: Tensor | None = None,
        aug_logsnr: Tensor | float | None = None,
        low_res_mask: Tensor | None = None,
        labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> DenoiserOutput:
        """``z`` ``[B, C, H, W]``; ``low_res`` ``[B, C, h, w]`` (already augmented) or ``None`` (unconditional);
        ``aug_logsnr`` ``[B]`` / scalar / ``None`` (= ``+inf``, no augmentation); ``low_res_mask`` ``[B]`` (1 keep,
        0 null; default 1 when ``low_res`` is given)."""
        b, c, h, w = z.shape
        if c != self.channels:
            raise ValueError(f"z has {c} channels, this super-resolution model {self.channels}")
        if low_res is None:
            up = z.new_zeros(b, c, h, w)
            mask = z.new_zeros(b)
        else:
            want = (b, *self.low_res_shape)
            if tuple(low_res.shape) != want:
                raise ValueError(f"low_res must be {list(want)}, got {list(low_res.shape)}")
            up = upsample(low_res.to(z.dtype), (h, w), mode=self.upsample)
            mask = z.new_ones(b) if low_res_mask is None else low_res_mask.to(device=z.device, dtype=z.dtype)
            up = torch.where(mask.reshape(b, 1, 1, 1) > 0, up, torch.zeros_like(up))
        level = torch.full((b,), math.inf, device=z.device) if aug_logsnr is None else \
            torch.as_tensor(aug_logsnr, device=z.device, dtype=torch.float32).reshape(-1).expand(b)
        extra = self.aug_embed(level.float()).to(z.dtype)
        joint = torch.cat([z, up, mask.reshape(b, 1, 1, 1).expand(b, 1, h, w)], dim=1)
        out = self.net(joint, logsnr, labels=labels, context=context, context_mask=context_mask, extra_emb=extra)
        return DenoiserOutput(x=out.x[:, :c], eps=out.eps[:, :c], v=out.v[:, :c])


class LowResolution:
    """Conditioner: a batch -> ``{"low_res": [B, C, h, w], "low_res_mask": [B]}``.

    Uses ``batch["low_res"]`` when the batch has it (e.g. made by :func:`low_res_pairs`), else downsamples
    ``batch["x"]``. The null conditioning is zeros with flag 0 (:data:`LOW_RES_NULL`).
    """

    null_cond: dict[str, Any] = LOW_RES_NULL

    def __init__(self, size: int, *, channels: int = 1, mode: str = "area") -> None:
        if mode not in ("area", "antialias"):
            raise ValueError(f"unknown downsample mode {mode!r}; valid: area, antialias")
        self.size, self.channels, self.mode = int(size), int(channels), mode

    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        if "low_res" in batch:
            low = torch.as_tensor(batch["low_res"])
        elif "x" in batch:
            low = downsample(torch.as_tensor(batch["x"]), self.size, mode=self.mode)
        else:
            raise ValueError(f"LowResolution: the batch has neither 'low_res' nor 'x' (keys: {sorted(batch)})")
        if low.dim() != 4 or tuple(low.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"LowResolution: low_res must be [B, {self.channels}, {self.size}, {self.size}], "
                             f"got {list(low.shape)}")
        return {"low_res": low.to(device), "low_res_mask": torch.ones(low.shape[0], device=device or low.device)}

    def null(self, n: int, device: torch.device | str | None = None) -> dict[str, Any]:
        return {"low_res": torch.zeros(n, self.channels, self.size, self.size, device=device),
                "low_res_mask": torch.zeros(n, device=device)}

    def identity(self) -> dict[str, Any]:
        return {"name": "low_resolution", "version": 1, "size": self.size, "channels": self.channels,
                "downsample": self.mode}

    def __repr__(self) -> str:
        return f"LowResolution(size={self.size}, channels={self.channels}, mode={self.mode!r})"


def low_res_pairs(size: int, *, mode: str = "area", hflip: bool = False):
    """Batch transform ``(batch, generator) -> batch`` adding ``"low_res"`` = the downsampled ``"x"`` (after an
    optional random flip, so the pair stays aligned); for :class:`~simdiff.train.BatchIterator`."""
    from simdiff.data import random_hflip

    def transform(batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        out = dict(batch)
        if hflip:
            out["x"] = random_hflip(batch["x"], generator=generator)
        out["low_res"] = downsample(out["x"], size, mode=mode)
        return out

    return transform


class SRLoss:
    """The training loss of a super-resolution model: ``loss(model, batch, generator) -> [B]``.

    Per example: the conditioner gives ``low_res``; a level ``lam_aug ~ U[aug_min, aug_max]`` (``+inf`` with
    probability ``clean_prob``) corrupts it (:func:`augment`); with probability ``cond_drop_prob`` the low-res input
    is dropped (flag 0); then the diffusion loss of ``loss_cfg`` (isotropic process only) on ``batch["x"]``.
    Class labels, if in the batch, are passed on (and dropped with ``loss_cfg.cond_drop_prob``).
    """

    def __init__(self, loss_cfg: LossConfig | dict[str, Any], sr: SRConfig, conditioner: LowResolution) -> None:
        self.base = DiffusionLoss.from_config(loss_cfg)
        if not getattr(self.base.process, "isotropic", False):
            raise ConfigError(f"super-resolution supports the isotropic process only, got "
                              f"diffusion.process={self.base.process.name!r}")
        self.sr, self.conditioner = sr, conditioner

    def __call__(self, model, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        x = batch["x"]
        b, dev = x.shape[0], x.device
        cond = self.conditioner(batch, device=dev)
        u = rand_on((3, b), generator, dev, torch.float64)
        lam = self.sr.aug_min + u[0] * (self.sr.aug_max - self.sr.aug_min)
        lam = torch.where(u[1] < self.sr.clean_prob, torch.full_like(lam, math.inf), lam)
        gen_device = generator.device if generator is not None else dev
        noise = torch.randn(cond["low_res"].shape, generator=generator, device=gen_device).to(dev)
        cond["low_res"] = augment(cond["low_res"].to(x.dtype), lam, noise.to(x.dtype))
        cond["aug_logsnr"] = lam.float()
        cond["low_res_mask"] = (u[2] >= self.sr.cond_drop_prob).to(x.dtype)
        if "labels" in batch:
            labels = batch["labels"]
            if self.base.cond_drop_prob > 0:
                labels = drop_labels(labels, prob=self.base.cond_drop_prob, null_label=self.base.null_label,
                                     generator=generator)
            cond["labels"] = labels
        base = self.base
        return diffusion_loss(model, x, schedule=base.schedule, weighting=base.weighting, generator=generator,
                              cond=cond, jacobian=base.jacobian, multiscale_base=base.multiscale_base,
                              stratified=base.stratified, process=base.process)
