"""Blurring diffusion (Hoogeboom & Salimans, ICLR 2023, "Blurring Diffusion Models", arXiv 2209.05557).

Heat dissipation plus noise, written as a diagonal Gaussian process in the orthonormal DCT-II basis: with
``u = DCT(x)`` and frequency ``(k, l)`` of an ``H x W`` image,

    z_t = IDCT(alpha_t ⊙ DCT(x)) + sigma_t eps,          alpha_t(k, l) = a_t d_t(k, l)
    d_t(k, l) = (1 - d_min) exp(-Lambda_kl tau_t) + d_min, Lambda_kl = (pi k / H)^2 + (pi l / W)^2
    tau_t = sigma_B(t)^2 / 2,                             sigma_B(t) = sigma_B_max sin(t pi / 2)^2

where ``a_t`` and ``sigma_t`` are the usual variance-preserving coefficients of the base log-SNR schedule
(``a_t^2 = sigmoid(lam)``, ``sigma_t^2 = sigmoid(-lam)``, ``lam`` = the schedule's log-SNR at ``t``; any registered
schedule, shifted ones included). ``exp(-Lambda tau)`` is the heat equation's solution operator at time ``tau`` with
reflecting (Neumann) boundaries, diagonal in the DCT-II basis. ``sigma_B_max = 0`` gives ``d_t = 1``: standard
diffusion. The paper's defaults, as given by the appendix pseudo-code that public re-implementations share:
``sigma_B_max = 20``, ``d_min = 0.001``; the choice of ``sigma_B_max`` for 28x28 data is ours (see
docs/DECISIONS.md).

The level ``lam`` (what sampler grids are made of) is the base schedule's log-SNR; the process maps it back to
``t = schedule.t_from_logsnr(lam)`` for the blur. Everything else (noising, x/eps/v views, the posterior, i.e. the
paper's ancestral reverse step in DCT space, the deterministic DDIM-type step, DPM-Solver++(2M) coefficients)
comes from :class:`~simdiff.processes.base.GaussianProcess` per DCT coordinate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.processes.base import GaussianProcess
from simdiff.processes.bases import DCTBasis

__all__ = ["BlurringDiffusion", "heat_eigenvalues"]


def heat_eigenvalues(height: int, width: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``Lambda [H, W]``: ``(pi k / H)^2 + (pi l / W)^2``, the (negated) Laplacian's eigenvalue of DCT-II mode
    ``(k, l)`` on a unit-spaced grid with reflecting boundaries (in the small-frequency form the paper uses)."""
    fy = math.pi * torch.arange(height, dtype=dtype) / height
    fx = math.pi * torch.arange(width, dtype=dtype) / width
    return fy[:, None] ** 2 + fx[None, :] ** 2


def _size(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        h = w = image_size
    elif isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        h, w = (int(v) for v in image_size)
    else:
        raise ConfigError(f"blurring: image_size must be an int or [height, width], got {image_size!r}")
    if h < 1 or w < 1:
        raise ConfigError(f"blurring: image_size must be positive, got {image_size!r}")
    return h, w


class BlurringDiffusion(GaussianProcess):
    """Blurring diffusion in the DCT basis (see the module docstring).

    Args:
        schedule: the base log-SNR schedule (gives ``a_t``, ``sigma_t`` and ``t(lam)``).
        image_size: ``H`` (square) or ``[H, W]`` of the images; the coefficients are ``[1, H, W]``, shared by the
            channels.
        sigma_B_max: maximal blur ``sigma_B(1)`` (0: standard diffusion).
        d_min: the floor of the per-frequency dissipation ``d_t`` (keeps every frequency's signal nonzero).
    """

    name = "blurring"

    def __init__(self, schedule: Any, *, image_size: int | tuple[int, int], sigma_B_max: float = 20.0,
                 d_min: float = 0.001) -> None:
        if schedule is None:
            raise ConfigError("blurring: needs a base schedule")
        if not (math.isfinite(sigma_B_max) and sigma_B_max >= 0):
            raise ConfigError(f"blurring: sigma_B_max must be finite and >= 0, got {sigma_B_max}")
        if not 0 < d_min <= 1:
            raise ConfigError(f"blurring: d_min must be in (0, 1], got {d_min}")
        super().__init__(schedule, basis=DCTBasis())
        self.height, self.width = _size(image_size)
        self.sigma_B_max, self.d_min = float(sigma_B_max), float(d_min)
        self.eigenvalues = heat_eigenvalues(self.height, self.width)
        self.coef_shape = (1, self.height, self.width)

    def blur_time(self, t: Tensor) -> Tensor:
        """``tau_t = sigma_B(t)^2 / 2`` with ``sigma_B(t) = sigma_B_max sin(t pi / 2)^2``."""
        return 0.5 * (self.sigma_B_max * torch.sin(0.5 * math.pi * t) ** 2) ** 2

    def log_dissipation(self, lam: Tensor) -> Tensor:
        """``log d_t`` ``[*lam.shape, 1, H, W]`` at level ``lam`` (``t = schedule.t_from_logsnr(lam)``)."""
        t = self.schedule.t_from_logsnr(lam.to(torch.float64)).clamp(0, 1)
        tau = self.blur_time(t).reshape(lam.shape + (1, 1, 1))
        lam_k = self.eigenvalues.to(device=lam.device)
        d = (1.0 - self.d_min) * torch.exp(-lam_k * tau) + self.d_min
        return torch.log(d).to(lam.dtype)

    def log_alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``(log a_t + log d_t, log sigma_t)``, each ``[*lam.shape, 1, H, W]``."""
        shape = lam.shape + self.coef_shape
        la = (0.5 * F.logsigmoid(lam)).reshape(lam.shape + (1, 1, 1))
        ls = (0.5 * F.logsigmoid(-lam)).reshape(lam.shape + (1, 1, 1))
        if self.sigma_B_max == 0.0:  # d_t = 1 exactly: standard diffusion
            return la.expand(shape), ls.expand(shape)
        return la + self.log_dissipation(lam), ls.expand(shape)

    def check_data_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse (one line) images whose ``[H, W]`` differ from the process's ``image_size``."""
        if tuple(shape[-2:]) != (self.height, self.width):
            raise ConfigError(f"blurring: the process is for {self.height}x{self.width} images "
                              f"(diffusion.process.image_size) but the data are {shape[-2]}x{shape[-1]}")

    def to_dict(self) -> dict[str, Any]:
        spec = getattr(self, "spec", None)
        if spec:
            return dict(spec)
        size = self.height if self.height == self.width else [self.height, self.width]
        return {"name": self.name, "image_size": size, "sigma_B_max": self.sigma_B_max, "d_min": self.d_min}

    def __repr__(self) -> str:
        return (f"BlurringDiffusion(image_size=({self.height}, {self.width}), sigma_B_max={self.sigma_B_max}, "
                f"d_min={self.d_min}, schedule={self.schedule!r})")
