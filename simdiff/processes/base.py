"""The diagonal Gaussian process family: per-element alpha and sigma in an orthonormal basis.

A process maps clean data ``x`` and white noise ``eps`` to

    z = decode(alpha ⊙ encode(x) + sigma ⊙ encode(eps))

with per-element ``alpha``, ``sigma`` > 0 that need not satisfy ``alpha^2 + sigma^2 = 1``. Each basis coordinate is
then a one-dimensional Gaussian diffusion with its own log-SNR ``2 (log alpha - log sigma)``, so every identity of
the isotropic case holds coordinate by coordinate; blurring diffusion (Hoogeboom & Salimans 2023, "Blurring
diffusion models") is a process of this form in the DCT basis. The scalar that indexes the noise level, the
*level* ``lam``, is the base schedule's log-SNR; sampler grids are grids of levels.

A subclass implements :meth:`GaussianProcess.log_alpha_sigma` (``lam -> (log alpha, log sigma)``, shaped
``lam.shape + coef_shape``); everything else (noising, the x/eps/v conversions, the posterior, DDPM / DDIM steps,
the per-step coefficients the samplers use, time sampling and the loss weight) is written once here over those
coefficients. ``coef_shape`` is ``()`` (one value per level) or has as many dims as one example has after the
level's dims (e.g. ``(1, H, W)`` or ``(C, H, W)`` for a level ``[B]``): coefficients are aligned with the leading
dims of ``z`` like the level, and broadcast over the rest.

Methods take and return data-space tensors; with ``encoded=True`` they take and return basis coordinates
(samplers keep their state there). Variances are always per basis coordinate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from simdiff.process import PARAMETERISATIONS, DenoiserOutput
from simdiff.processes.bases import Basis, IdentityBasis
from simdiff.processes.times import sample_t

__all__ = ["GaussianProcess", "check_shapes"]


def check_shapes(a: Tensor, b: Tensor, names: str) -> None:
    """Raise a one-line ValueError naming both shapes when ``a`` and ``b`` do not broadcast."""
    if a.shape != b.shape:
        try:
            torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            raise ValueError(f"{names}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast") from None


def _as_level(lam: Tensor | float, like: Tensor) -> Tensor:
    if torch.is_tensor(lam):
        return lam
    return torch.tensor(float(lam), dtype=like.dtype, device=like.device)


class GaussianProcess(ABC):
    """A diagonal Gaussian process in a basis (see the module docstring).

    Args:
        schedule: the base schedule ``t -> lam`` (a :class:`simdiff.schedules.Schedule`); needed for training
            (time sampling, Jacobian) and grids, not for the per-step algebra.
        basis: :class:`~simdiff.processes.bases.IdentityBasis` (default) or another orthonormal basis.

    Attributes:
        name: registry name. coef_shape: shape of the per-level coefficients (see the module docstring).
        isotropic: True only for the isotropic variance-preserving process of :mod:`simdiff.process` (one scalar
            per example, identity basis, ``alpha^2 = sigmoid(lam)``): samplers that have no per-coordinate form
            run only when it is True.
    """

    name: str = "gaussian"
    isotropic: bool = False
    coef_shape: tuple[int, ...] = ()

    def __init__(self, schedule: Any = None, *, basis: Basis | None = None) -> None:
        self.schedule = schedule
        self.basis = IdentityBasis() if basis is None else basis

    # ----------------------------------------------------------------------------------------- coefficients
    @abstractmethod
    def log_alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``(log alpha, log sigma)`` at level ``lam``, each shaped ``lam.shape + coef_shape``."""

    def alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)``, each ``lam.shape + coef_shape``."""
        la, ls = self.log_alpha_sigma(lam)
        return la.exp(), ls.exp()

    def log_snr(self, lam: Tensor) -> Tensor:
        """Per-coordinate log-SNR ``2 (log alpha - log sigma)``, ``lam.shape + coef_shape``."""
        la, ls = self.log_alpha_sigma(lam)
        return 2 * (la - ls)

    def net_cond(self, lam: Tensor) -> Tensor:
        """What the backbone is conditioned on at level ``lam`` (default: ``lam`` itself)."""
        return lam

    def encode(self, x: Tensor) -> Tensor:
        """Data -> basis coordinates."""
        return self.basis.encode(x)

    def decode(self, u: Tensor) -> Tensor:
        """Basis coordinates -> data."""
        return self.basis.decode(u)

    def fit(self, c: Tensor, *, lam: Tensor, like: Tensor) -> Tensor:
        """Reshape a coefficient ``c`` (``lam.shape + coef_shape``) to broadcast against ``like`` (leading-aligned).

        A 0-d ``lam`` is one level for the whole batch. Raises a one-line ValueError when it cannot broadcast.
        """
        lam_dim = lam.dim() if torch.is_tensor(lam) else 0
        if lam_dim == 0:
            c, lam_dim = c[None], 1
        if c.dim() == lam_dim:
            c = c.reshape(tuple(c.shape) + (1,) * (like.dim() - c.dim()))
        try:
            if c.dim() != like.dim():
                raise RuntimeError
            torch.broadcast_shapes(c.shape, like.shape)
        except RuntimeError:
            raise ValueError(
                f"{self.name}: coefficients of shape {tuple(c.shape)} (level dims {lam_dim}) do not broadcast against "
                f"{tuple(like.shape)}; coef_shape must be () or cover every dim after the level's"
            ) from None
        return c

    def _coefs(self, lam: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        la, ls = self.log_alpha_sigma(lam)
        return self.fit(la, lam=lam, like=like), self.fit(ls, lam=lam, like=like)

    def _in(self, t: Tensor, encoded: bool) -> Tensor:
        return t if encoded else self.encode(t)

    def _out(self, t: Tensor, encoded: bool) -> Tensor:
        return t if encoded else self.decode(t)

    # ----------------------------------------------------------------------------------------- forward / views
    def add_noise(self, x: Tensor, eps: Tensor, *, lam: Tensor) -> Tensor:
        """Sample ``z = decode(alpha encode(x) + sigma encode(eps))`` (q(z | x) at level ``lam``)."""
        check_shapes(x, eps, f"{self.name}.add_noise(x, eps)")
        lam = _as_level(lam, x)
        la, ls = self._coefs(lam, x)
        return self.decode(la.exp() * self.encode(x) + ls.exp() * self.encode(eps))

    def to_output(self, kind: str, pred: Tensor, *, z: Tensor, lam: Tensor) -> DenoiserOutput:
        """A raw prediction of ``kind`` ("x", "eps" or "v") at ``z`` -> all three views, per basis coordinate.

        ``v = alpha eps - sigma x`` per coordinate; from ``v``: ``x = (alpha u - sigma v) / (alpha^2 + sigma^2)``,
        ``eps = (sigma u + alpha v) / (alpha^2 + sigma^2)`` with ``u = encode(z)``.
        """
        check_shapes(z, pred, f"to_output({kind!r}): z vs prediction")
        lam = _as_level(lam, z)
        la, ls = self._coefs(lam, z)
        a, s = la.exp(), ls.exp()
        u, p = self.encode(z), self.encode(pred)
        if kind == "x":
            x = p
            e = (u - a * x) / s
        elif kind == "eps":
            e = p
            x = (u - s * e) / a
        elif kind == "v":
            norm = a * a + s * s
            x = (a * u - s * p) / norm
            e = (s * u + a * p) / norm
        else:
            raise ValueError(f"unknown parameterisation {kind!r}; valid: {', '.join(PARAMETERISATIONS)}")
        v = p if kind == "v" else a * e - s * x
        return DenoiserOutput(x=self.decode(x), eps=self.decode(e), v=self.decode(v))

    # ----------------------------------------------------------------------------------------- reverse steps
    def posterior(
        self, *, z_t: Tensor, x: Tensor, lam_s: Tensor, lam_t: Tensor, variance: str = "small", encoded: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Mean and per-coordinate variance of q(z_s | z_t, x), level ``lam_s`` less noisy than ``lam_t``.

        Per coordinate, with ``r = SNR_t / SNR_s``:  ``mean = r (alpha_s / alpha_t) z_t + (1 - r) alpha_s x``,
        ``var = (1 - r) sigma_s^2`` ("small", the true posterior) or ``(1 - r) sigma_t^2`` ("large", the variance of
        the forward transition q(z_t | z_s)). This is Gaussian conditioning on the Markov forward step
        ``z_t = (alpha_t / alpha_s) z_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) n``; it does not use
        ``alpha^2 + sigma^2 = 1`` (VDM, Kingma et al. 2021, eqs. 26-27, per coordinate).

        Returns:
            ``(mean, var)``: mean like ``z_t`` (basis coordinates when ``encoded``), var per basis coordinate,
            broadcastable to it.
        """
        check_shapes(z_t, x, "posterior(z_t, x)")
        lam_s, lam_t = _as_level(lam_s, z_t), _as_level(lam_t, z_t)
        la_s, ls_s = self._coefs(lam_s, z_t)
        la_t, ls_t = self._coefs(lam_t, z_t)
        log_r = 2 * ((la_t - ls_t) - (la_s - ls_s))
        r, one_minus_r = torch.exp(log_r), -torch.expm1(log_r)
        u_t, ux = self._in(z_t, encoded), self._in(x, encoded)
        mean = r * torch.exp(la_s - la_t) * u_t + one_minus_r * torch.exp(la_s) * ux
        if variance == "small":
            var = one_minus_r * torch.exp(2 * ls_s)
        elif variance == "large":
            var = one_minus_r * torch.exp(2 * ls_t)
        else:
            raise ValueError(f"unknown posterior variance {variance!r}; valid: small, large")
        return self._out(mean, encoded), var

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
        """Ancestral step ``mean + sqrt(var) * noise`` per basis coordinate (``noise`` white, like ``z_t``)."""
        u_t, ux = self._in(z_t, encoded), self._in(x, encoded)
        mean, var = self.posterior(z_t=u_t, x=ux, lam_s=lam_s, lam_t=lam_t, variance=variance, encoded=True)
        return self._out(mean + var.sqrt() * self._in(noise, encoded), encoded)

    def ddim_step(self, *, z_t: Tensor, x: Tensor, lam_s: Tensor, lam_t: Tensor, encoded: bool = False) -> Tensor:
        """Deterministic DDIM per coordinate: ``z_s = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x)`` (either
        direction; Song et al. 2021 eq. 12)."""
        check_shapes(z_t, x, "ddim_step(z_t, x)")
        lam_s, lam_t = _as_level(lam_s, z_t), _as_level(lam_t, z_t)
        la_s, ls_s = self._coefs(lam_s, z_t)
        la_t, ls_t = self._coefs(lam_t, z_t)
        ux = self._in(x, encoded)
        u = la_s.exp() * ux + torch.exp(ls_s - ls_t) * (self._in(z_t, encoded) - la_t.exp() * ux)
        return self._out(u, encoded)

    def ddim_invert_x(self, *, z_s: Tensor, z_t: Tensor, lam_s: Tensor, lam_t: Tensor, encoded: bool = False) -> Tensor:
        """The x for which a DDIM step t -> s maps ``z_t`` to ``z_s``, per coordinate:
        ``x = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - alpha_t sigma_s / sigma_t)`` (Salimans & Ho 2022 eq. 8)."""
        check_shapes(z_s, z_t, "ddim_invert_x(z_s, z_t)")
        lam_s, lam_t = _as_level(lam_s, z_t), _as_level(lam_t, z_t)
        la_s, ls_s = self._coefs(lam_s, z_t)
        la_t, ls_t = self._coefs(lam_t, z_t)
        ratio = torch.exp(ls_s - ls_t)
        x = (self._in(z_s, encoded) - ratio * self._in(z_t, encoded)) / (la_s.exp() - la_t.exp() * ratio)
        return self._out(x, encoded)

    # ----------------------------------------------------------------------------------------- sampler grids
    def ddim_coefficients(self, lam: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-step ``(c_z, c_x, c_noise)``, each ``[M, *coef_shape]``, with
        ``u_s = c_z u_t + c_x x_hat + c_noise * noise`` in basis coordinates.

        ``lam``: finite levels ``[M + 1]``. Song et al. 2021 eq. 12 / 16 per coordinate: ``u_s = alpha_s x +
        sqrt(sigma_s^2 - c^2) eps_hat + c noise``, ``c^2 = eta^2 (1 - r) sigma_s^2``, ``r = SNR_t / SNR_s``.
        """
        la, ls = self.log_alpha_sigma(lam)
        la_s, ls_s, la_t, ls_t = la[1:], ls[1:], la[:-1], ls[:-1]
        one_minus_r = -torch.expm1(2 * ((la_t - ls_t) - (la_s - ls_s)))
        keep = (1 - eta**2 * one_minus_r).clamp_min(0).sqrt()
        c_z = torch.exp(ls_s - ls_t) * keep
        c_x = la_s.exp() - la_t.exp() * c_z
        c_n = ls_s.exp() * (eta**2 * one_minus_r).clamp_min(0).sqrt()
        return c_z, c_x, c_n

    def ei_coefficients(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Exponential-integrator coefficients per step, each ``[M, *coef_shape]``: ``(sigma_s / sigma_t,
        alpha_s, h)`` with ``h = lambda_s - lambda_t`` per coordinate, ``lambda = log alpha - log sigma``.

        Per coordinate the PF-ODE ``du/dlam = (dlog sigma/dlam) u + alpha x_hat dlambda/dlam`` has the exact
        solution ``u_s = (sigma_s / sigma_t) u_t + sigma_s int e^lambda x_hat dlambda`` (DPM-Solver++, Lu et al.
        2022, eq. 9, per coordinate), so a first-order step is ``u_s = ratio u_t + alpha_s (1 - e^-h) x_hat``.
        """
        la, ls = self.log_alpha_sigma(lam)
        half = la - ls
        return torch.exp(ls[1:] - ls[:-1]), la[1:].exp(), half[1:] - half[:-1]

    # ----------------------------------------------------------------------------------------- training
    def _schedule(self):
        if self.schedule is None:
            raise ValueError(f"process {self.name!r} was built without a schedule; training needs one")
        return self.schedule

    def sample_times(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        stratified: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training times ``[B]`` in [0, 1) (:func:`simdiff.losses.sample_t`); per-frame processes return
        ``[B, frames]``."""
        return sample_t(batch_size, generator=generator, stratified=stratified, device=device, dtype=dtype)

    def level(self, t: Tensor) -> Tensor:
        """Level ``lam`` at time ``t`` (the schedule's log-SNR), shaped like ``t``."""
        return self._schedule().logsnr(t)

    def jacobian(self, t: Tensor) -> Tensor:
        """``-dlam/dt`` at ``t`` (VDM++ / SiD2: turns the expectation over t into an integral over levels)."""
        return -self._schedule().dlogsnr_dt(t)

    def loss_weight(self, lam: Tensor, weighting) -> Tensor:
        """Per-element weight on the squared x error in basis coordinates: ``weighting`` at each coordinate's
        log-SNR, shaped ``lam.shape + coef_shape``. The loss is ``mean(weight * jacobian(t) * encode(x - x_hat)^2)``.

        For the isotropic process this is exactly ``weighting(logsnr)``. For per-coordinate processes applying a
        VP weighting at the coordinate's own log-SNR is a natural generalisation, not one taken from a paper.
        """
        return weighting(self.log_snr(lam))

    def to_dict(self) -> dict[str, Any]:
        """The spec that :func:`simdiff.processes.build_process` rebuilds (with the schedule): the one it was built
        from, else ``{"name": name}``."""
        return dict(getattr(self, "spec", None) or {"name": self.name})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r}, basis={self.basis!r})"
