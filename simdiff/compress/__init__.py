"""Lossy image compression with a diffusion decoder (Hoogeboom et al. 2023, "High-Fidelity Image Compression with
Score-based Generative Models"): a base layer (a learned MSE codec with a hyperprior, or a standard codec through
Pillow), the ``.sdc`` container, and distortion measures (PSNR, MS-SSIM).
"""

from .format import CODECS, FORMAT_VERSION, Header, pack, read_container, unpack, write_atomic
from .metrics import ms_ssim, psnr, ssim

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "Header",
    "pack",
    "unpack",
    "read_container",
    "write_atomic",
    "ms_ssim",
    "psnr",
    "ssim",
]
