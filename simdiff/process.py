"""The isotropic variance-preserving Gaussian process in log-SNR form, as pure functions.

One scalar log-SNR per example (or per leading index). Per-coordinate coefficients, non-VP alpha/sigma and other
bases live in :mod:`simdiff.processes`, whose isotropic member calls these functions.

Convention (used everywhere in simdiff):

    z = alpha * x + sigma * eps,   eps ~ N(0, I)
    logsnr = log(alpha^2 / sigma^2),  alpha^2 = sigmoid(logsnr),  sigma^2 = sigmoid(-logsnr)
    v = alpha * eps - sigma * x                          (Salimans & Ho 2022, "v-prediction")

``logsnr`` is a tensor that broadcasts against the *leading* (batch) dimension of ``z``: a scalar, shape
``[B]`` or any shape that is a prefix of ``z.shape`` (it is right-padded with singleton dimensions). A value of
``+inf`` means clean data (alpha = 1, sigma = 0); ``-inf`` means pure noise.

Numerics follow google-research ``diffusion_distillation/dpm.py``: ``1 - r`` as ``-expm1``, ratios of sigmas
through ``softplus`` so nothing is formed as a difference of nearly equal numbers.

References: Kingma et al. 2021 (VDM) for the log-SNR parameterisation; Song et al. 2021 (DDIM) eq. 12;
Salimans & Ho 2022 (progressive distillation) App. for v and the DDIM/inverse-DDIM forms;
Heek et al. 2024 (multistep consistency models) eqs. 4-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Parameterisation = Literal["eps", "x", "v"]
PARAMETERISATIONS: tuple[str, ...] = ("eps", "x", "v")

__all__ = [
    "DenoiserOutput",
    "Denoiser",
    "PARAMETERISATIONS",
    "expand",
    "alpha_sigma",
    "log_alpha_sigma",
    "sigma_ratio",
    "add_noise",
    "x_from_eps",
    "eps_from_x",
    "v_from_x_eps",
    "x_from_v",
    "eps_from_v",
    "to_output",
    "posterior",
    "ddim_step",
    "ddim_invert_x",
    "ddpm_step",
    "forward_step",
]


@dataclass(frozen=True)
class DenoiserOutput:
    """The three equivalent views of one denoiser prediction, all shaped like ``z``."""

    x: Tensor
    eps: Tensor
    v: Tensor

    def get(self, kind: str) -> Tensor:
        """Return the prediction named ``kind`` ("x", "eps" or "v")."""
        if kind not in PARAMETERISATIONS:
            raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PARAMETERISATIONS)}")
        return getattr(self, kind)


class Denoiser(Protocol):
    """``denoise(z, logsnr, **cond) -> DenoiserOutput``; ``logsnr`` has shape ``[B]`` (or broadcasts)."""

    def __call__(self, z: Tensor, logsnr: Tensor, **cond) -> DenoiserOutput: ...


def expand(logsnr: Tensor | float, like: Tensor) -> Tensor:
    """Right-pad ``logsnr`` with singleton dims so it broadcasts against ``like`` (batch-first).

    Raises:
        ValueError: naming both shapes when ``logsnr`` is not a prefix-broadcastable shape of ``like``.
    """
    if not torch.is_tensor(logsnr):
        logsnr = torch.tensor(logsnr, dtype=like.dtype, device=like.device)
    if logsnr.dim() > like.dim():
        raise ValueError(f"logsnr of shape {tuple(logsnr.shape)} has more dims than z {tuple(like.shape)}")
    for a, b in zip(logsnr.shape, like.shape):
        if a != b and a != 1 and b != 1:
            raise ValueError(
                f"logsnr of shape {tuple(logsnr.shape)} does not broadcast against z of shape "
                f"{tuple(like.shape)} (logsnr must match the leading dims)"
            )
    return logsnr.reshape(tuple(logsnr.shape) + (1,) * (like.dim() - logsnr.dim()))


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha = sqrt(sigmoid(logsnr))``, ``sigma = sqrt(sigmoid(-logsnr))`` (stable at +-inf)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def log_alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """``(log alpha, log sigma)`` = ``(0.5 logsigmoid(logsnr), 0.5 logsigmoid(-logsnr))``."""
    return 0.5 * F.logsigmoid(logsnr), 0.5 * F.logsigmoid(-logsnr)


def sigma_ratio(*, logsnr_s: Tensor, logsnr_t: Tensor) -> Tensor:
    """``sigma_s / sigma_t`` = ``exp(0.5 (softplus(logsnr_t) - softplus(logsnr_s)))``."""
    return torch.exp(0.5 * (F.softplus(logsnr_t) - F.softplus(logsnr_s)))


def _check(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        try:
            torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            raise ValueError(
                f"{names}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast"
            ) from None


def add_noise(x: Tensor, eps: Tensor, *, logsnr: Tensor) -> Tensor:
    """Sample ``z = alpha x + sigma eps`` (forward process q(z_t | x))."""
    _check(x, eps, "add_noise(x, eps)")
    a, s = alpha_sigma(expand(logsnr, x))
    return a * x + s * eps


def x_from_eps(*, z: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """``x = (z - sigma eps) / alpha``."""
    _check(z, eps, "x_from_eps(z, eps)")
    a, s = alpha_sigma(expand(logsnr, z))
    return (z - s * eps) / a


def eps_from_x(*, z: Tensor, x: Tensor, logsnr: Tensor) -> Tensor:
    """``eps = (z - alpha x) / sigma``."""
    _check(z, x, "eps_from_x(z, x)")
    a, s = alpha_sigma(expand(logsnr, z))
    return (z - a * x) / s


def v_from_x_eps(*, x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """``v = alpha eps - sigma x``."""
    _check(x, eps, "v_from_x_eps(x, eps)")
    a, s = alpha_sigma(expand(logsnr, x))
    return a * eps - s * x


def x_from_v(*, z: Tensor, v: Tensor, logsnr: Tensor) -> Tensor:
    """``x = alpha z - sigma v``."""
    _check(z, v, "x_from_v(z, v)")
    a, s = alpha_sigma(expand(logsnr, z))
    return a * z - s * v


def eps_from_v(*, z: Tensor, v: Tensor, logsnr: Tensor) -> Tensor:
    """``eps = sigma z + alpha v``."""
    _check(z, v, "eps_from_v(z, v)")
    a, s = alpha_sigma(expand(logsnr, z))
    return s * z + a * v


def to_output(kind: str, pred: Tensor, *, z: Tensor, logsnr: Tensor) -> DenoiserOutput:
    """The one parameterisation layer: a raw network prediction of ``kind`` -> all three views.

    Args:
        kind: "eps", "x" or "v" — what ``pred`` estimates.
        pred: network output, shape of ``z``.
        z: the noisy input ``[B, ...]``.
        logsnr: ``[B]`` (or broadcastable) log-SNR of ``z``.
    """
    _check(z, pred, f"to_output({kind!r}): z vs prediction")
    a, s = alpha_sigma(expand(logsnr, z))
    if kind == "x":
        x = pred
        eps = (z - a * x) / s
        v = a * eps - s * x
    elif kind == "eps":
        eps = pred
        x = (z - s * eps) / a
        v = a * eps - s * x
    elif kind == "v":
        v = pred
        x = a * z - s * v
        eps = s * z + a * v
    else:
        raise ValueError(f"unknown parameterisation {kind!r}; valid: {', '.join(PARAMETERISATIONS)}")
    return DenoiserOutput(x=x, eps=eps, v=v)


def posterior(
    *, z_t: Tensor, x: Tensor, logsnr_s: Tensor, logsnr_t: Tensor, variance: str = "small"
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(z_s | z_t, x) for ``logsnr_s > logsnr_t`` (s less noisy than t).

    With ``r = exp(logsnr_t - logsnr_s)`` (= SNR_t / SNR_s):
        mean = r (alpha_s / alpha_t) z_t + (1 - r) alpha_s x
        var  = (1 - r) sigma_s^2   ("small", the true posterior)  or  (1 - r) sigma_t^2  ("large")
    Kingma et al. 2021 (VDM) eq. 26-27 in log-SNR form. A final ``logsnr_s = +inf`` gives mean x, var 0.

    Returns:
        ``(mean, var)``; ``mean`` like ``z_t``, ``var`` broadcastable to it.
    """
    _check(z_t, x, "posterior(z_t, x)")
    ls, lt = expand(logsnr_s, z_t), expand(logsnr_t, z_t)
    one_minus_r = -torch.expm1(lt - ls)
    r = torch.exp(lt - ls)
    log_a_s, log_s_s = log_alpha_sigma(ls)
    log_a_t, log_s_t = log_alpha_sigma(lt)
    mean = r * torch.exp(log_a_s - log_a_t) * z_t + one_minus_r * torch.exp(log_a_s) * x
    if variance == "small":
        var = one_minus_r * torch.exp(2 * log_s_s)
    elif variance == "large":
        var = one_minus_r * torch.exp(2 * log_s_t)
    else:
        raise ValueError(f"unknown posterior variance {variance!r}; valid: small, large")
    return mean, var


def ddpm_step(
    *,
    z_t: Tensor,
    x: Tensor,
    logsnr_s: Tensor,
    logsnr_t: Tensor,
    noise: Tensor,
    variance: str = "small",
) -> Tensor:
    """Ancestral step: ``z_s = mean + sqrt(var) * noise`` with the posterior of :func:`posterior`."""
    mean, var = posterior(z_t=z_t, x=x, logsnr_s=logsnr_s, logsnr_t=logsnr_t, variance=variance)
    return mean + var.sqrt() * noise


def ddim_step(*, z_t: Tensor, x: Tensor, logsnr_s: Tensor, logsnr_t: Tensor) -> Tensor:
    """Deterministic DDIM update ``z_s = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x)``.

    Song et al. 2021 eq. 12 with eta = 0. Works in either direction (inversion: ``logsnr_s < logsnr_t``).
    """
    _check(z_t, x, "ddim_step(z_t, x)")
    ls, lt = expand(logsnr_s, z_t), expand(logsnr_t, z_t)
    a_s, _ = alpha_sigma(ls)
    a_t, _ = alpha_sigma(lt)
    return a_s * x + sigma_ratio(logsnr_s=ls, logsnr_t=lt) * (z_t - a_t * x)


def ddim_invert_x(*, z_s: Tensor, z_t: Tensor, logsnr_s: Tensor, logsnr_t: Tensor) -> Tensor:
    """The x for which a DDIM step t -> s maps ``z_t`` to ``z_s`` (progressive distillation target).

    ``x = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - alpha_t sigma_s / sigma_t)``; Salimans & Ho 2022 eq. 8,
    Heek et al. 2024 eq. 5 (invDDIM).
    """
    _check(z_s, z_t, "ddim_invert_x(z_s, z_t)")
    ls, lt = expand(logsnr_s, z_t), expand(logsnr_t, z_t)
    a_s, _ = alpha_sigma(ls)
    a_t, _ = alpha_sigma(lt)
    ratio = sigma_ratio(logsnr_s=ls, logsnr_t=lt)
    return (z_s - ratio * z_t) / (a_s - a_t * ratio)


def forward_step(*, z_s: Tensor, logsnr_s: Tensor, logsnr_t: Tensor, noise: Tensor) -> Tensor:
    """Sample the forward transition q(z_t | z_s) for ``logsnr_t <= logsnr_s`` (t noisier; ``logsnr_s`` may be +inf).

    ``z_t = (alpha_t / alpha_s) z_s + sigma_t sqrt(1 - SNR_t / SNR_s) noise`` (Kingma et al. 2021, VDM eq. 22-23 in
    log-SNR form): composed with q(z_s | x) it gives q(z_t | x) exactly.
    """
    _check(z_s, noise, "forward_step(z_s, noise)")
    lt, ls = expand(logsnr_t, z_s), expand(logsnr_s, z_s)
    a_t, s_t = alpha_sigma(lt)
    a_s, _ = alpha_sigma(ls)
    keep = (-torch.expm1(lt - ls)).clamp_min(0).sqrt()
    return (a_t / a_s) * z_s + (s_t * keep) * noise
