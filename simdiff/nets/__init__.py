"""Denoiser backbones (U-Net, U-ViT, residual U-ViT) and the parameterisation wrapper.

Backbones: ``backbone(z, logsnr, labels=None, context=None, context_mask=None, extra_emb=None) -> Tensor`` shaped
like ``z``. :class:`DiffusionModel` turns one into a denoiser returning ``DenoiserOutput(x, eps, v)``. Distilled
students wrap one (:mod:`simdiff.nets.students`).
"""

from .denoiser import BACKBONES, DiffusionModel, build_backbone, build_model, count_parameters
from .students import DenoiserGenerator, GuidanceConditioned, wrap_student
from .unet import UNet, UNetConfig
from .uvit import ResidualUViTConfig, UViT, UViTConfig
from .video import VideoUViT, VideoUViTConfig
from .wavelets import Wavelet53, dwt53, idwt53

__all__ = [
    "BACKBONES",
    "DiffusionModel",
    "build_backbone",
    "build_model",
    "count_parameters",
    "DenoiserGenerator",
    "GuidanceConditioned",
    "wrap_student",
    "UNet",
    "UNetConfig",
    "UViT",
    "UViTConfig",
    "ResidualUViTConfig",
    "VideoUViT",
    "VideoUViTConfig",
    "Wavelet53",
    "dwt53",
    "idwt53",
]
