"""Backbone + parameterisation -> denoiser, and the backbone registry / builders.

A backbone maps ``(z, logsnr, labels, context, context_mask)`` to a tensor shaped like ``z`` and never knows what
it predicts; :class:`DiffusionModel` names the prediction ("eps", "x" or "v") and returns all three views through
:func:`simdiff.process.to_output` (the one parameterisation layer; the preconditioner/backbone split of EDM, Karras
et al. 2022, sec. 5), or through ``process.to_output`` for a model built with a :mod:`simdiff.processes` process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..configuration import ConfigError, from_dict, get_registered
from ..discrete.transformer import TokenTransformer, TokenTransformerConfig
from ..process import PARAMETERISATIONS, DenoiserOutput, to_output
from ..processes import GaussianProcess
from .text_uvit import TextUViT, TextUViTConfig
from .unet import UNet, UNetConfig
from .uvit import ResidualUViTConfig, UViT, UViTConfig
from .video import VideoUViT, VideoUViTConfig

__all__ = ["BACKBONES", "DiffusionModel", "build_backbone", "build_model", "count_parameters"]

#: name -> (config dataclass, backbone class taking ``(cfg, *, image_channels, image_size, num_classes)``)
BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "uvit": (UViTConfig, UViT),
    "residual_uvit": (ResidualUViTConfig, UViT),
    "text_uvit": (TextUViTConfig, TextUViT),  # cross-attention + pooled text in adaLN (simdiff.text)
    "video_uvit": (VideoUViTConfig, VideoUViT),  # frame windows; data arguments from RollingDiffusion.network_kwargs
    "token_transformer": (TokenTransformerConfig, TokenTransformer),  # tokens; data arguments from MaskedDiffusion
}


def build_backbone(name: str, cfg: dict[str, Any] | None, **data: Any) -> nn.Module:
    """Build backbone ``name`` from a plain dict of its config fields (unknown keys / names raise ConfigError).

    ``data`` are the constructor's data arguments: ``image_channels``, ``image_size``, ``num_classes`` for the image
    backbones; a discrete process names its own (``DiscreteProcess.network_kwargs``, e.g. a vocabulary size).
    """
    cfg_cls, net_cls = get_registered(BACKBONES, name, "backbone")
    config = cfg if isinstance(cfg, cfg_cls) else from_dict(cfg_cls, cfg, where=name)
    return net_cls(config, **data)


class DiffusionModel(nn.Module):
    """A denoiser ``model(z, logsnr, **cond) -> DenoiserOutput(x, eps, v)`` around a backbone.

    Args:
        backbone: module with ``backbone(z, logsnr, labels=, context=, context_mask=) -> Tensor`` like ``z``.
        parameterisation: what the backbone output estimates: "eps", "x" or "v" (Salimans & Ho 2022).
        autocast_dtype: run the backbone under ``torch.autocast(device_type, dtype)`` (e.g. ``torch.bfloat16``);
            the prediction is cast back to ``z.dtype`` and the x/eps/v conversion runs in ``z``'s precision.
        process: the noising process (``None``: isotropic VP). With one, the second argument of ``forward`` is the
            process's level, the backbone sees ``process.net_cond(level)``, and the views come from
            ``process.to_output``. The process holds no parameters (nothing of it is in the state dict).
    """

    def __init__(
        self,
        backbone: nn.Module,
        parameterisation: str = "v",
        *,
        autocast_dtype: torch.dtype | None = None,
        process: GaussianProcess | None = None,
    ):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise ConfigError(f"unknown parameterisation {parameterisation!r}; valid: {', '.join(PARAMETERISATIONS)}")
        self.backbone = backbone
        self.parameterisation = parameterisation
        self.autocast_dtype = autocast_dtype
        self.process = process

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.backbone.image_shape

    def predict(self, z: Tensor, logsnr: Tensor, **cond) -> Tensor:
        """The raw backbone output (the ``parameterisation`` view), in ``z.dtype``."""
        if self.autocast_dtype is None:
            return self.backbone(z, logsnr, **cond).to(z.dtype)
        with torch.autocast(device_type=z.device.type, dtype=self.autocast_dtype):
            pred = self.backbone(z, logsnr, **cond)
        return pred.to(z.dtype)

    def forward(
        self,
        z: Tensor,
        logsnr: Tensor,
        labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        extra_emb: Tensor | None = None,
    ) -> DenoiserOutput:
        """``z`` ``[B, C, H, W]``, ``logsnr`` ``[B]`` or scalar (the level) -> :class:`DenoiserOutput` like ``z``.

        ``extra_emb`` ``[B, emb_dim]`` (optional) is added to the backbone's log-SNR embedding (e.g. the guidance
        weight's embedding of a guided student); ``None`` passes nothing extra.
        """
        cond = dict(labels=labels, context=context, context_mask=context_mask)
        if extra_emb is not None:
            cond["extra_emb"] = extra_emb
        if self.process is None:
            pred = self.predict(z, logsnr, **cond)
            out = to_output(self.parameterisation, pred, z=z, logsnr=torch.as_tensor(logsnr, device=z.device))
        else:
            lam = torch.as_tensor(logsnr, device=z.device)
            pred = self.predict(z, self.process.net_cond(lam), **cond)
            out = self.process.to_output(self.parameterisation, pred, z=z, lam=lam)
        if out.x.dtype == z.dtype:
            return out
        return DenoiserOutput(x=out.x.to(z.dtype), eps=out.eps.to(z.dtype), v=out.v.to(z.dtype))


def build_model(
    arch: str,
    parameterisation: str,
    options: dict[str, Any] | None = None,
    *,
    image_channels: int,
    image_size: int | tuple[int, int],
    num_classes: int,
    autocast_dtype: torch.dtype | None = None,
    process: GaussianProcess | None = None,
) -> DiffusionModel:
    """``build_backbone(arch, options, ...)`` wrapped in a :class:`DiffusionModel` predicting ``parameterisation``
    (under ``process``; ``None`` = isotropic VP)."""
    if parameterisation not in PARAMETERISATIONS:
        raise ConfigError(f"unknown parameterisation {parameterisation!r}; valid: {', '.join(PARAMETERISATIONS)}")
    backbone = build_backbone(
        arch, options, image_channels=image_channels, image_size=image_size, num_classes=num_classes
    )
    return DiffusionModel(backbone, parameterisation, autocast_dtype=autocast_dtype, process=process)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
