"""The isotropic variance-preserving process: one log-SNR per example, identity basis (today's simdiff default).

Every method calls the pure functions of :mod:`simdiff.process` (or the exact expressions the samplers used before
processes existed: sigma ratios through ``softplus``, ``1 - r`` as ``-expm1``), so results are bit-identical to the
code paths that take no process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from simdiff import process as P
from simdiff.process import DenoiserOutput
from simdiff.processes.base import GaussianProcess
from simdiff.processes.bases import IdentityBasis

__all__ = ["IsotropicGaussian", "vp_ddim_coefficients", "vp_ei_coefficients"]


def vp_ddim_coefficients(lam: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step ``(c_z, c_x, c_noise)`` (each ``[M]``) of DDIM on the VP process, ``z_s = c_z z_t + c_x x_hat +
    c_noise * noise``; ``lam``: finite log-SNRs ``[M + 1]``. Song et al. 2021 eq. 12: ``z_s = alpha_s x +
    sqrt(sigma_s^2 - c^2) eps_hat + c noise`` with ``c^2 = eta^2 (1 - r) sigma_s^2``, ``r = exp(logsnr_t - logsnr_s)``.
    """
    ls, lt = lam[1:], lam[:-1]
    a_s, s_s = P.alpha_sigma(ls)
    a_t, _ = P.alpha_sigma(lt)
    one_minus_r = -torch.expm1(lt - ls)
    keep = (1 - eta**2 * one_minus_r).clamp_min(0).sqrt()  # fraction of sigma_s kept on the eps direction
    c_z = P.sigma_ratio(logsnr_s=ls, logsnr_t=lt) * keep
    c_x = a_s - a_t * c_z
    c_n = s_s * (eta**2 * one_minus_r).clamp_min(0).sqrt()
    return c_z, c_x, c_n


def vp_ei_coefficients(lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sigma_s / sigma_t, alpha_s, h = (logsnr_s - logsnr_t) / 2)`` per step, each ``[M]`` (VP process)."""
    a_s, _ = P.alpha_sigma(lam[1:])
    return P.sigma_ratio(logsnr_s=lam[1:], logsnr_t=lam[:-1]), a_s, 0.5 * torch.diff(lam)


class IsotropicGaussian(GaussianProcess):
    """``z = alpha x + sigma eps`` with ``alpha^2 = sigmoid(lam)``, ``sigma^2 = sigmoid(-lam)``, ``lam`` = log-SNR.

    Args:
        schedule: the log-SNR schedule (needed for training only; samplers need none).
    """

    name = "isotropic"
    isotropic = True
    coef_shape = ()

    def __init__(self, schedule: Any = None) -> None:
        super().__init__(schedule, basis=IdentityBasis())

    def log_alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        return P.log_alpha_sigma(lam)

    def alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        return P.alpha_sigma(lam)

    def log_snr(self, lam: Tensor) -> Tensor:
        return lam

    def add_noise(self, x: Tensor, eps: Tensor, *, lam: Tensor) -> Tensor:
        return P.add_noise(x, eps, logsnr=lam)

    def to_output(self, kind: str, pred: Tensor, *, z: Tensor, lam: Tensor) -> DenoiserOutput:
        return P.to_output(kind, pred, z=z, logsnr=lam)

    def posterior(
        self, *, z_t: Tensor, x: Tensor, lam_s: Tensor, lam_t: Tensor, variance: str = "small", encoded: bool = False
    ) -> tuple[Tensor, Tensor]:
        return P.posterior(z_t=z_t, x=x, logsnr_s=lam_s, logsnr_t=lam_t, variance=variance)

    def ddpm_step(
        self,
        *,
        z_t: Tensor,
        x: Tensor,
        lam_s: Tensor,
        lam_t: Tensor,
        noise: Tensor,
        variance: str = "small",
        encoded: bool = False,
    ) -> Tensor:
        return P.ddpm_step(z_t=z_t, x=x, logsnr_s=lam_s, logsnr_t=lam_t, noise=noise, variance=variance)

    def ddim_step(self, *, z_t: Tensor, x: Tensor, lam_s: Tensor, lam_t: Tensor, encoded: bool = False) -> Tensor:
        return P.ddim_step(z_t=z_t, x=x, logsnr_s=lam_s, logsnr_t=lam_t)

    def ddim_invert_x(self, *, z_s: Tensor, z_t: Tensor, lam_s: Tensor, lam_t: Tensor, encoded: bool = False) -> Tensor:
        return P.ddim_invert_x(z_s=z_s, z_t=z_t, logsnr_s=lam_s, logsnr_t=lam_t)

    def ddim_coefficients(self, lam: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
        return vp_ddim_coefficients(lam, eta)

    def ei_coefficients(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return vp_ei_coefficients(lam)

    def loss_weight(self, lam: Tensor, weighting) -> Tensor:
        """``weighting(logsnr)``, one weight per example (``lam.shape``)."""
        return weighting(lam)

    def __repr__(self) -> str:
        return f"IsotropicGaussian(schedule={self.schedule!r})"
