"""Lossy image compression with a diffusion decoder (Hoogeboom et al. 2023, "High-Fidelity Image Compression with
Score-based Generative Models"): a base layer (a learned MSE codec with a hyperprior, or a standard codec through
Pillow), the ``.sdc`` container, distortion measures (PSNR, MS-SSIM), and the diffusion decoder
(:mod:`simdiff.compress.diffusion`) that refines a base reconstruction. Commands: :mod:`simdiff.compress.cli`.
"""

from .format import CODECS, FORMAT_VERSION, Header, pack, read_container, unpack, write_atomic
from .learned import LAMBDAS, HyperpriorCodec, HyperpriorConfig
from .metrics import ms_ssim, psnr, ssim
from .standard import STANDARD_CODECS, StandardCodec, search_quality

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "Header",
    "pack",
    "unpack",
    "read_container",
    "write_atomic",
    "LAMBDAS",
    "HyperpriorCodec",
    "HyperpriorConfig",
    "STANDARD_CODECS",
    "StandardCodec",
    "search_quality",
    "ms_ssim",
    "psnr",
    "ssim",
]
