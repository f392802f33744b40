"""Shared pieces of the likelihood estimators: results, bits per dimension, 8-bit data, the prior, closed forms.

Data convention (all of simdiff): an 8-bit image with integer values ``k in {0, ..., 255}`` is stored as
``x = k / 127.5 - 1`` in ``[-1, 1]``, so the 256 values are spaced ``2 / 255`` apart. A *discrete* likelihood
``P(k)`` is what bits per dimension measure: ``bpd = -log2 P(k) / D``. A continuous density ``p(x)`` bounds it
through uniform dequantisation (Theis et al. 2016; Ho et al. 2019, Flow++): with ``u ~ U(-delta/2, delta/2)^D``,
``delta = 2 / 255`` (one bin of the data scaling),

    log P(k) >= E_u [log p(x + u)] + D log(delta),

so ``bpd <= -(E_u log p(x + u) + D log delta) / (D ln 2)``: the ``D log delta`` term ("dequantisation offset")
converts a density over the ``[-1, 1]`` scaling into probability mass of the 256 bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LikelihoodResult",
    "bin_width",
    "check_isotropic",
    "check_levels",
    "data_bins",
    "discrete_decoder_nll",
    "gaussian_log_prob",
    "mixture_log_prob",
    "model_dtype",
    "prior_kl",
    "standard_normal_log_prob",
]


@dataclass
class LikelihoodResult:
    """Per-example negative log-likelihood estimates (nats) of one estimator.

    Attributes:
        nll: ``[B]`` estimate of ``-log P(x)`` (an upper bound in expectation for the ELBO and for dequantised
            densities), in nats, including ``offset``.
        mc_se: ``[B]`` Monte-Carlo standard error of each ``nll`` (the estimator's own randomness: times, noise,
            trace probes), in nats.
        terms: ``[B]`` tensors of the parts that sum to ``nll`` (nats), e.g. prior, reconstruction, diffusion.
        dims: number of data dimensions ``D`` per example.
        method: "elbo" or "ode".
        info: settings and costs (network evaluations, steps, ...), JSON-safe.
    """

    nll: Tensor
    mc_se: Tensor
    terms: dict[str, Tensor]
    dims: int
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bpd(self) -> Tensor:
        """``[B]`` bits per dimension, ``nll / (D ln 2)``."""
        return self.nll / (self.dims * math.log(2))

    def summary(self) -> dict[str, float]:
        """Mean bits per dimension over the examples with two standard errors (JSON-safe floats).

        ``bpd_se`` is the standard error of the mean over examples (data and estimator noise together: the spread
        across examples divided by ``sqrt(B)``); ``bpd_mc_se`` is the estimator's own Monte-Carlo error of the mean
        (``sqrt(sum mc_se^2) / B``), which shrinks with more times / probes at a fixed set of examples.
        """
        bpd = self.bpd.double()
        n = bpd.numel()
        scale = 1.0 / (self.dims * math.log(2))
        se = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        out = {"bpd": float(bpd.mean()), "bpd_se": se,
               "bpd_mc_se": float(self.mc_se.double().pow(2).sum().sqrt() / n * scale), "num": n}
        for name, t in self.terms.items():
            out[f"bpd_{name}"] = float(t.double().mean() * scale)
        return out


def data_bins(x: Tensor, bins: int = 256) -> Tensor:
    """Integer bin index of 8-bit data ``x = -1 + 2 k / (bins - 1)`` (``[B, ...]`` -> long ``[B, ...]``).

    Raises:
        ValueError: values outside ``[-1, 1]`` or off the ``bins``-value grid (more than 1e-3 of a bin away).
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    k = (x.double() + 1) * (bins - 1) / 2
    kr = k.round()
    if not bool(torch.isfinite(k).all()) or float((k - kr).abs().max()) > 1e-3 or float(kr.min()) < 0 \
            or float(kr.max()) > bins - 1:
        raise ValueError(f"the discrete likelihood needs {bins}-level data x = -1 + 2k/{bins - 1} (k integer in "
                         f"[0, {bins - 1}]); got values off that grid (use decoder='gaussian' for continuous data)")
    return kr.long()


def bin_width(bins: int = 256) -> float:
    """Width ``2 / (bins - 1)`` of one bin of ``bins``-level data scaled to ``[-1, 1]``."""
    return 2.0 / (bins - 1)


def check_isotropic(process: Any, what: str) -> None:
    """Refuse (one-line ValueError) a non-isotropic process: the estimators use the VP log-SNR algebra."""
    if process is not None and not getattr(process, "isotropic", False):
        raise ValueError(f"{what} supports the isotropic variance-preserving process only; got process "
                         f"{getattr(process, 'name', process)!r}")


def check_levels(logsnr_min: float, logsnr_max: float, what: str) -> tuple[float, float]:
    """Validate a finite log-SNR range ``logsnr_min < logsnr_max`` (one-line ValueError)."""
    lo, hi = float(logsnr_min), float(logsnr_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what}: need finite logsnr_min < logsnr_max, got {lo} and {hi}")
    return lo, hi


def model_dtype(model: Any, default: torch.dtype) -> torch.dtype:
    """The floating dtype of ``model``'s parameters (an ``nn.Module``), else ``default`` (e.g. a closed form)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def prior_kl(x: Tensor, logsnr_min: float) -> Tensor:
    """``KL(q(z_min | x) || N(0, I))`` per example (nats), ``q = N(alpha x, sigma^2 I)`` at log-SNR ``logsnr_min``.

    Per dimension ``0.5 (alpha^2 x^2 + sigma^2 - 1 - log sigma^2) = 0.5 (alpha^2 (x^2 - 1) + softplus(lam))`` with
    ``alpha^2 = sigmoid(lam)``, ``-log sigma^2 = softplus(lam)`` (Kingma et al. 2021, VDM, the prior loss).
    """
    lam = torch.tensor(float(logsnr_min), dtype=torch.float64)
    a2, sp = torch.sigmoid(lam), F.softplus(lam)
    xf = x.double().reshape(x.shape[0], -1)
    return 0.5 * (a2 * (xf**2 - 1) + sp).sum(1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per example, ``[B, ...] -> [B]`` (float64)."""
    zf = z.double().reshape(z.shape[0], -1)
    return -0.5 * (zf**2).sum(1) - 0.5 * zf.shape[1] * math.log(2 * math.pi)


def gaussian_log_prob(x: Tensor, *, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """``log N(x; mean, diag(var))`` per example, ``[B, ...] -> [B]`` (float64; mean/var broadcast per example)."""
    xf = x.double().reshape(x.shape[0], -1)
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1) if torch.is_tensor(mean) else float(mean)
    v = torch.as_tensor(var, dtype=torch.float64)
    v = v.reshape(1, -1) if v.dim() > 0 else v
    return (-0.5 * ((xf - m) ** 2 / v + torch.log(2 * math.pi * v))).sum(1)


def mixture_log_prob(mixture: Any, z: Tensor, *, logsnr: float | None = None) -> Tensor:
    """Closed-form log density of a :class:`simdiff.toy.GaussianMixture`, or of its noised marginal.

    With ``logsnr = None`` it is ``log sum_k w_k N(z; mu_k, diag(var_k))``; with a finite ``logsnr`` (VP,
    ``alpha^2 = sigmoid(logsnr)``) it is the density of ``alpha x + sigma eps``:
    ``log sum_k w_k N(z; alpha mu_k, diag(alpha^2 var_k + sigma^2))``.

    Args:
        z: ``[B, D]`` (or ``[B, ...]`` with ``D`` elements). Returns ``[B]`` float64.
    """
    zf = z.double().reshape(z.shape[0], -1)
    mu, var = mixture.means.double(), mixture.variances.double()
    if logsnr is not None:
        lam = torch.tensor(float(logsnr), dtype=torch.float64)
        a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        mu, var = a2.sqrt() * mu, a2 * var + s2
    diff = zf[:, None, :] - mu[None]
    comp = -0.5 * (diff**2 / var[None] + torch.log(2 * math.pi * var[None])).sum(-1)  # [B, K]
    return torch.logsumexp(mixture.log_weights.double()[None] + comp, dim=1)


def discrete_decoder_nll(x: Tensor, z: Tensor, *, logsnr: float, bins: int = 256, chunk: int = 16) -> Tensor:
    """``-log p(x | z)`` per example (nats) for the discrete decoder of 8-bit data at log-SNR ``logsnr``.

    ``p(x_i = v_k | z_i)`` is proportional to ``N(z_i; alpha v_k, sigma^2)`` over the ``bins`` values
    ``v_k = -1 + 2k / (bins - 1)``: the posterior over the values under a uniform prior on them (the form of the
    decoder of Kingma et al. 2021, VDM; its exact normalisation in the VDM code is not verified here).

    Args:
        x: ``[B, ...]`` data on the ``bins``-value grid. z: ``[B, ...]`` noisy data at ``logsnr``.
    """
    d = x[0].numel()
    k = data_bins(x, bins).reshape(x.shape[0], -1)
    lam = torch.tensor(float(logsnr), dtype=torch.float64)
    a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    values = -1 + 2 * torch.arange(bins, dtype=torch.float64) / (bins - 1)
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        zi = z[i:i + chunk].double().reshape(-1, d)
        logits = -0.5 * ((zi[..., None] - a * values) / s) ** 2  # [b, D, bins]
        logp = torch.log_softmax(logits, -1).gather(-1, k[i:i + chunk, :, None]).squeeze(-1)
        out[i:i + chunk] = -logp.sum(1)
    return out
