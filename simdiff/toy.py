"""An exact test bed: Gaussian mixtures whose optimal denoiser E[x | z] is known in closed form.

For a mixture ``p(x) = sum_k w_k N(x; mu_k, diag(var_k))`` and ``z = alpha x + sigma eps``:

    z | k        ~ N(alpha mu_k, diag(alpha^2 var_k + sigma^2))
    E[x | z, k]  = mu_k + alpha var_k / (alpha^2 var_k + sigma^2) * (z - alpha mu_k)
    E[x | z]     = sum_k p(k | z) E[x | z, k]

so samplers and distillation methods can be judged against the truth (the probability-flow ODE driven by this
denoiser transports N(0, I) exactly onto the mixture). Class-conditional use restricts ``k`` to the components
of the given class. :meth:`GaussianMixture.denoise_for` gives the same exact denoiser for any diagonal process of
:mod:`simdiff.processes` (per basis coordinate ``u = alpha mu_k + ...``). Distances: sliced Wasserstein-2 and an
RBF MMD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from simdiff.process import DenoiserOutput, alpha_sigma, expand, to_output

if TYPE_CHECKING:
    from simdiff.processes import GaussianProcess

__all__ = ["GaussianMixture", "sliced_wasserstein", "mmd_rbf"]


class GaussianMixture:
    """Diagonal-covariance Gaussian mixture with its exact posterior-mean denoiser.

    Args:
        means: ``[K, D]`` component means.
        variances: ``[K, D]`` (or ``[K]`` / scalar, broadcast) per-dimension variances, all > 0.
        weights: ``[K]`` mixing weights (normalised here); uniform by default.
        classes: ``[K]`` integer class of each component (default ``arange(K)``).
    """

    def __init__(
        self,
        means: Tensor,
        variances: Tensor | float = 0.01,
        weights: Tensor | None = None,
        classes: Tensor | None = None,
    ) -> None:
        if means.dim() != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
        self.means = means
        k, d = means.shape
        var = torch.as_tensor(variances, dtype=means.dtype, device=means.device)
        if var.dim() == 1:
            var = var[:, None]
        self.variances = var.expand(k, d).clone()
        if not bool((self.variances > 0).all()):
            raise ValueError("GaussianMixture variances must all be > 0")
        w = torch.ones(k, dtype=means.dtype) if weights is None else torch.as_tensor(weights, dtype=means.dtype)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape [{k}], got {tuple(w.shape)}")
        self.log_weights = torch.log(w / w.sum()).to(means.device)
        self.classes = (torch.arange(k) if classes is None else torch.as_tensor(classes)).to(means.device)
        if self.classes.shape != (k,):
            raise ValueError(f"classes must have shape [{k}], got {tuple(self.classes.shape)}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    @classmethod
    def random(
        cls,
        dim: int,
        num_components: int = 8,
        *,
        spread: float = 1.0,
        std: float = 0.1,
        num_classes: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> GaussianMixture:
        """A seeded random mixture; means ~ N(0, spread^2 / dim * I)-ish scaled to unit overall norm."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, dim, generator=g, dtype=dtype) * spread
        if dim > 2:
            means = means / math.sqrt(dim) * 2.0
        stds = std * (0.5 + torch.rand(num_components, dim, generator=g, dtype=dtype))
        weights = 0.5 + torch.rand(num_components, generator=g, dtype=dtype)
        classes = None if num_classes is None else torch.arange(num_components) % num_classes
        return cls(means, stds**2, weights, classes)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` points. Returns ``(x [n, D], class labels [n])``.

        With ``labels`` given, each point is drawn from the components of its class.
        """
        logits = self.log_weights.expand(n, -1)
        if labels is not None:
            logits = self._mask(logits, labels)
        comp = torch.multinomial(logits.exp(), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        x = self.means[comp] + self.variances[comp].sqrt() * noise
        return x, self.classes[comp]

    def _mask(self, logits: Tensor, labels: Tensor) -> Tensor:
        same = self.classes[None, :] == labels.reshape(-1, 1).to(self.classes.device)
        return logits.masked_fill(~same, -math.inf)

    def posterior_mean(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact ``E[x | z]`` for ``z`` of shape ``[B, D]`` (or ``[B, ...]`` with ``D`` elements)."""
        shape = z.shape
        zf = z.reshape(shape[0], -1).to(self.means.dtype)
        if zf.shape[1] != self.dim:
            raise ValueError(f"z has {zf.shape[1]} features per example, the mixture has dim {self.dim}")
        lam_t = torch.as_tensor(logsnr, dtype=zf.dtype)
        if lam_t.numel() == 1 or (lam_t.dim() == 1 and lam_t.shape[0] == shape[0] and lam_t.stride(0) == 0):
            return self._posterior_mean_shared(zf, lam_t.reshape(-1)[:1], labels).reshape(shape).to(z.dtype)
        lam = expand(lam_t, zf[:, :1])  # [B, 1] or [1, 1]
        a, s = alpha_sigma(lam)
        a, s = a[:, :, None], s[:, :, None]  # [B, 1, 1]
        mu, var = self.means[None], self.variances[None]  # [1, K, D]
        tot = a**2 * var + s**2  # [B|1, K, D]
        diff = zf[:, None, :] - a * mu  # [B, K, D]
        loglik = -0.5 * ((diff**2) / tot + torch.log(2 * math.pi * tot)).sum(-1)  # [B, K]
        logits = self.log_weights[None] + loglik
        if labels is not None:
            logits = self._mask(logits, labels)
        resp = torch.softmax(logits, dim=-1)  # [B, K]
        cond_mean = mu + a * var / tot * diff  # [B, K, D]
        x = (resp[:, :, None] * cond_mean).sum(1)
        return x.reshape(shape).to(z.dtype)

    def _posterior_mean_shared(self, zf: Tensor, lam: Tensor, labels: Tensor | None) -> Tensor:
        """``posterior_mean`` when every example shares one log-SNR ``lam [1]`` (a scalar or a stride-0
        ``expand``, as samplers pass it, so the gradient through ``lam[0]`` is the exact summed one): the
        ``[K, D]`` variance terms are computed once and the mixture of conditional means
        ``sum_k r_k (mu_k + g_k (z - a mu_k))``, ``g = a var / tot``, is two ``[B, K] @ [K, D]`` products."""
        a, s = alpha_sigma(lam.reshape(1, 1))
        mu, var = self.means, self.variances  # [K, D]
        tot = a**2 * var + s**2  # [K, D]
        diff = zf[:, None, :] - (a * mu)[None]  # [B, K, D]
        loglik = -0.5 * (diff**2 / tot).sum(-1) - 0.5 * torch.log(2 * math.pi * tot).sum(-1)  # [B, K]
        logits = self.log_weights[None] + loglik
        if labels is not None:
            logits = self._mask(logits, labels)
        resp = torch.softmax(logits, dim=-1)  # [B, K]
        g = a * var / tot  # [K, D]
        return resp @ (mu - a * g * mu) + (resp @ g) * zf

    def denoise(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, **_: object) -> DenoiserOutput:
        """The optimal denoiser as a simdiff denoiser callable."""
        return to_output("x", self.posterior_mean(z, logsnr, labels), z=z, logsnr=logsnr)

    __call__ = denoise

    def posterior_mean_for(
        self, process: GaussianProcess, z: Tensor, lam: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Exact ``E[x | z]`` under a diagonal ``process`` at level ``lam`` (``[B]`` or scalar), ``z [B, ...]``.

        In basis coordinates ``u = encode(z)`` each component is ``N(alpha mu_k, alpha^2 var_k + sigma^2)`` per
        coordinate, with ``alpha, sigma`` the process's per-element coefficients. A non-identity basis needs
        per-component isotropic variances (then the component is rotation invariant); the means are encoded.
        """
        shape, b = z.shape, z.shape[0]
        if z[0].numel() != self.dim:
            raise ValueError(f"z has {z[0].numel()} features per example, the mixture has dim {self.dim}")
        k = self.means.shape[0]
        if process.basis.is_identity:
            var = self.variances
        elif bool((self.variances == self.variances[:, :1]).all()):
            var = self.variances
        else:
            raise ValueError("GaussianMixture: a non-identity basis needs per-component isotropic variances")
        zt = z.to(self.means.dtype)
        u = process.encode(zt).reshape(b, -1)
        mu = process.encode(self.means.reshape((k,) + tuple(shape[1:]))).reshape(k, -1)
        lam_t = torch.as_tensor(lam, dtype=zt.dtype, device=zt.device)
        a, s = process.alpha_sigma(lam_t)

        def flat(c: Tensor) -> Tensor:
            c = process.fit(c, lam=lam_t, like=zt)
            return torch.broadcast_to(c, (c.shape[0],) + tuple(shape[1:])).reshape(c.shape[0], 1, -1)

        a, s = flat(a), flat(s)  # [B|1, 1, D]
        tot = a**2 * var[None] + s**2  # [B|1, K, D]
        diff = u[:, None, :] - a * mu[None]  # [B, K, D]
        loglik = -0.5 * ((diff**2) / tot + torch.log(2 * math.pi * tot)).sum(-1)
        logits = self.log_weights[None] + loglik
        if labels is not None:
            logits = self._mask(logits, labels)
        resp = torch.softmax(logits, dim=-1)
        x_u = (resp[:, :, None] * (mu[None] + a * var[None] / tot * diff)).sum(1)
        return process.decode(x_u.reshape(shape)).to(z.dtype)

    def denoise_for(self, process: GaussianProcess) -> Callable[..., DenoiserOutput]:
        """The exact denoiser ``denoise(z, lam, labels=None) -> DenoiserOutput`` for a diagonal ``process``."""

        def denoise(z: Tensor, lam: Tensor, labels: Tensor | None = None, **_: object) -> DenoiserOutput:
            return process.to_output("x", self.posterior_mean_for(process, z, lam, labels), z=z, lam=lam)

        return denoise


def _quantiles(x: Tensor, n: int) -> Tensor:
    """Sorted projections resampled to ``n`` evenly spaced quantiles (columns independent)."""
    xs = torch.sort(x, dim=0).values
    if xs.shape[0] == n:
        return xs
    q = torch.linspace(0, 1, n, dtype=x.dtype, device=x.device)
    return torch.quantile(xs, q, dim=0)


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, num_projections: int = 256, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced Wasserstein-2 distance between point clouds ``x [N, D]`` and ``y [M, D]``.

    ``SW2 = sqrt( E_theta W2^2(theta^T x, theta^T y) )`` over random unit directions ``theta``; 1-D W2 from
    sorted samples (quantile-matched when ``N != M``).
    """
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: dims differ, x {tuple(x.shape)} vs y {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = x.to(dtype) @ theta, y.to(dtype) @ theta
    n = max(px.shape[0], py.shape[0])
    return ((_quantiles(px, n) - _quantiles(py, n)) ** 2).mean().sqrt()


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidth: float | None = None) -> Tensor:
    """Unbiased squared MMD with an RBF kernel ``exp(-||a - b||^2 / (2 h^2))``.

    ``h`` defaults to the median pairwise distance of the pooled sample.
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf: dims differ, x {tuple(x.shape)} vs y {tuple(y.shape)}")
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).pow(2)
    if bandwidth is None:
        bandwidth = float(d2[d2 > 0].median().sqrt())
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()
