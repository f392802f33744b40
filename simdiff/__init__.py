"""simdiff: pixel-space diffusion in log-SNR form (simple diffusion, SiD2, fast samplers, distillation).

The contract every piece meets at: ``denoise(z, logsnr, **cond) -> DenoiserOutput(x, eps, v)``.
Modules: ``schedules``, ``process``, ``weighting``, ``losses``, ``guidance``, ``samplers``, ``nets``, ``data``,
``train``, ``eval``, ``distill``, ``toy`` (exact Gaussian-mixture test bed), ``interop`` (diffusers models).
"""

from simdiff.process import DenoiserOutput

__version__ = "0.1.0"
__all__ = ["DenoiserOutput", "__version__"]
