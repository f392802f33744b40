"""log-SNR noise schedules as small, serialisable, frozen dataclasses.

Convention (all of simdiff): time ``t`` in [0, 1]; ``t = 0`` is data (``logsnr_max``), ``t = 1`` is noise
(``logsnr_min``); ``logsnr(t)`` is strictly decreasing. Every schedule gives ``logsnr(t)``, its exact inverse
``t_from_logsnr`` (clamped to [0, 1]) and the analytic derivative ``dlogsnr_dt`` (negative; used by the
SiD2 / VDM++ weighted losses). All methods are batched, keep the input's dtype and device, and work in float32
and float64 (float64 where the math is checked).

Schedules: "cosine" (Nichol & Dhariwal 2021 in log-SNR form, clipped as in Salimans & Ho 2022),
"shifted_cosine" and "interpolated_cosine" (Hoogeboom et al. 2023, simple diffusion, sec. 3.1 and eq. 6),
"linear_beta" (the discrete DDPM beta schedules of Ho et al. 2020 / diffusers as a continuous curve) and
"edm" (Karras et al. 2022, eq. 5 / Table 1, mapped through ``sigma_edm = exp(-logsnr / 2)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, from_dict, get_registered, to_dict

__all__ = [
    "Schedule",
    "CosineSchedule",
    "ShiftedCosineSchedule",
    "InterpolatedCosineSchedule",
    "LinearBetaSchedule",
    "EDMSchedule",
    "SCHEDULES",
    "get_schedule",
    "schedule_from_dict",
    "sigma_from_logsnr",
    "logsnr_from_sigma",
]

_HALF_PI = math.pi / 2


def sigma_from_logsnr(logsnr: Tensor) -> Tensor:
    """Variance-exploding noise level ``sigma_ve = sigma / alpha = exp(-logsnr / 2)`` (EDM's sigma)."""
    return torch.exp(-0.5 * logsnr)


def logsnr_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of :func:`sigma_from_logsnr`: ``logsnr = -2 log sigma_ve``."""
    return -2.0 * torch.log(sigma)


def _check_range(lmin: float, lmax: float, where: str) -> None:
    if not (math.isfinite(lmin) and math.isfinite(lmax) and lmin < lmax):
        raise ConfigError(f"{where}: need finite logsnr_min < logsnr_max, got {lmin} and {lmax}")


class Schedule:
    """Base class: a strictly decreasing map ``t in [0, 1] -> logsnr``. Concrete schedules are frozen dataclasses."""

    name: ClassVar[str]

    def logsnr(self, t: Tensor) -> Tensor:
        """``[...] -> [...]`` log-SNR at time ``t``."""
        raise NotImplementedError

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Exact inverse of :meth:`logsnr`, clamped to [0, 1]."""
        raise NotImplementedError

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        """Analytic ``d logsnr / dt`` (negative)."""
        raise NotImplementedError

    @property
    def logsnr_min(self) -> float:
        """log-SNR at ``t = 1`` (noise end)."""
        return float(self.logsnr(torch.ones((), dtype=torch.float64)))

    @property
    def logsnr_max(self) -> float:
        """log-SNR at ``t = 0`` (data end)."""
        return float(self.logsnr(torch.zeros((), dtype=torch.float64)))

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params}`` (JSON safe); :func:`schedule_from_dict` inverts it."""
        return {"name": self.name, **to_dict(self)}


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """Clipped cosine schedule ``logsnr(t) = -2 log tan(u)``, ``u = t_min + t (t_max - t_min)``.

    ``t_min = atan(exp(-logsnr_max / 2))``, ``t_max = atan(exp(-logsnr_min / 2))``, so the curve runs exactly from
    ``logsnr_max`` to ``logsnr_min``; ``dlogsnr/dt = -4 (t_max - t_min) / sin(2u)`` (Nichol &
    Dhariwal 2021, eq. 17, alpha^2 = cos^2, in log-SNR form as in Kingma et al. 2021). Numerics: with
    ``v = pi/2 - u`` computed from its own offset ``atan(exp(logsnr_min / 2))``, ``tan`` is only ever
    taken of the smaller of ``u`` and ``v``.
    """

    name: ClassVar[str] = "cosine"
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    def __post_init__(self) -> None:
        _check_range(self.logsnr_min, self.logsnr_max, self.name)

    @property
    def _consts(self) -> tuple[float, float, float]:
        a = math.atan(math.exp(-0.5 * self.logsnr_max))  # t_min
        b = math.atan(math.exp(0.5 * self.logsnr_min))  # pi/2 - t_max
        return a, b, _HALF_PI - a - b  # width t_max - t_min

    def logsnr(self, t: Tensor) -> Tensor:
        a, b, w = self._consts
        u, v = a + t * w, b + (1 - t) * w
        return torch.where(u < math.pi / 4, -2 * torch.log(torch.tan(u)), 2 * torch.log(torch.tan(v)))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        a, b, w = self._consts
        hi = (torch.atan(torch.exp(-0.5 * logsnr)) - a) / w  # accurate for logsnr >= 0
        lo = 1 - (torch.atan(torch.exp(0.5 * logsnr)) - b) / w  # accurate for logsnr < 0
        return torch.where(logsnr >= 0, hi, lo).clamp(0, 1)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        a, b, w = self._consts
        u, v = a + t * w, b + (1 - t) * w
        return -4 * w / torch.where(u < math.pi / 4, torch.sin(2 * u), torch.sin(2 * v))


ClipMode = Literal["shift_range", "keep_range"]


@dataclass(frozen=True)
class ShiftedCosineSchedule(Schedule):
    """Resolution-shifted cosine: ``logsnr(t) = logsnr_cosine(t) + 2 log(noise_size / image_size)``.

    Hoogeboom et al. 2023 (simple diffusion), sec. 3.1: SNR at ``image_size`` is ``(noise_size/image_size)^2``
    times the reference-resolution SNR. Two clip conventions for ``[clip_min, clip_max]``:

    * ``"shift_range"`` (default): clip the base cosine to ``[clip_min, clip_max]`` then add the shift, so the
      range moves to ``[clip_min + shift, clip_max + shift]``. Default because it is the paper's reference
      pseudo-code (``logsnr_schedule_cosine(t) + 2 log(noise_d / image_d)``) as implemented by lucidrains and
      hackable_diffusion, and because it makes the shifted curve *exactly* the base plus a constant.
    * ``"keep_range"``: build the cosine on ``[clip_min - shift, clip_max - shift]`` then add the shift, so the
      overall range stays ``[clip_min, clip_max]`` (k-diffusion ``rand_cosine_interpolated``).

    The clip bounds are called ``clip_min``/``clip_max`` (not ``logsnr_min``/``logsnr_max``) because the
    :class:`Schedule` properties ``logsnr_min``/``logsnr_max`` always mean the values at t = 1 / t = 0, which
    differ from the clip bounds under ``"shift_range"``.
    """

    name: ClassVar[str] = "shifted_cosine"
    image_size: int
    noise_size: int = 64
    clip_min: float = -15.0
    clip_max: float = 15.0
    clip: ClipMode = "shift_range"

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.noise_size <= 0:
            raise ConfigError(f"{self.name}: image_size and noise_size must be > 0, got {self.image_size}, "
                              f"{self.noise_size}")
        if self.clip not in ("shift_range", "keep_range"):
            raise ConfigError(f"{self.name}: unknown clip {self.clip!r}; valid: keep_range, shift_range")
        _check_range(self.clip_min, self.clip_max, self.name)

    @property
    def shift(self) -> float:
        """``2 log(noise_size / image_size)`` (negative when the image is larger than the reference)."""
        return 2.0 * math.log(self.noise_size / self.image_size)

    @cached_property
    def base(self) -> CosineSchedule:
        """The unshifted cosine the curve is built on (its range depends on ``clip``)."""
        if self.clip == "shift_range":
            return CosineSchedule(self.clip_min, self.clip_max)
        return CosineSchedule(self.clip_min - self.shift, self.clip_max - self.shift)

    def logsnr(self, t: Tensor) -> Tensor:
        return self.base.logsnr(t) + self.shift

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return self.base.t_from_logsnr(logsnr - self.shift)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return self.base.dlogsnr_dt(t)


@dataclass(frozen=True)
class InterpolatedCosineSchedule(Schedule):
    """Interpolation between two shifted cosines (Hoogeboom et al. 2023, eq. 6).

    ``order="paper"`` (default; as transcribed from the paper and as in k-diffusion):
    ``logsnr(t) = t * shifted_high(t) + (1 - t) * shifted_low(t)`` with ``shifted_{low,high}`` the shifted cosine
    at ``noise_size_{low,high}`` (same ``clip_min``, ``clip_max``, ``clip`` as :class:`ShiftedCosineSchedule`).
    ``order="lucidrains"`` swaps the weights: ``t * shifted_low(t) + (1 - t) * shifted_high(t)``.

    The inverse has no closed form: 64 vectorised float64 bisection steps on [0, 1] then one Newton step (which
    also carries the gradient w.r.t. ``logsnr``). With ``clip="shift_range"`` the paper order is monotone only
    when ``2 log(noise_size_high / noise_size_low) < 4 (t_max - t_min)`` (about a 23x size ratio for the
    default range); construction checks ``dlogsnr_dt < 0`` on a dense grid and raises otherwise.
    """

    name: ClassVar[str] = "interpolated_cosine"
    image_size: int
    noise_size_low: int = 32
    noise_size_high: int = 256
    order: Literal["paper", "lucidrains"] = "paper"
    clip_min: float = -15.0
    clip_max: float = 15.0
    clip: ClipMode = "shift_range"

    def __post_init__(self) -> None:
        if self.order not in ("paper", "lucidrains"):
            raise ConfigError(f"{self.name}: unknown order {self.order!r}; valid: lucidrains, paper")
        if not 0 < self.noise_size_low < self.noise_size_high:
            raise ConfigError(f"{self.name}: need 0 < noise_size_low < noise_size_high, got "
                              f"{self.noise_size_low}, {self.noise_size_high}")
        _ = self.low, self.high  # validates image_size, clip and the range
        t = torch.linspace(0, 1, 4097, dtype=torch.float64)
        d = self.dlogsnr_dt(t)
        if not bool((d < 0).all()):
            i = int(d.argmax())
            raise ConfigError(
                f"{self.name}(order={self.order!r}, noise sizes {self.noise_size_low}->{self.noise_size_high}, "
                f"clip={self.clip!r}) is not monotone: dlogsnr/dt = {float(d[i]):.3g} >= 0 at t = {float(t[i]):.3g}"
                "; use closer noise sizes or order='lucidrains'"
            )

    @cached_property
    def low(self) -> ShiftedCosineSchedule:
        return ShiftedCosineSchedule(self.image_size, self.noise_size_low, self.clip_min, self.clip_max, self.clip)

    @cached_property
    def high(self) -> ShiftedCosineSchedule:
        return ShiftedCosineSchedule(
            self.image_size, self.noise_size_high, self.clip_min, self.clip_max, self.clip
        )

    def _ends(self) -> tuple[ShiftedCosineSchedule, ShiftedCosineSchedule]:
        """(schedule weighted by ``1 - t``, schedule weighted by ``t``)."""
        return (self.low, self.high) if self.order == "paper" else (self.high, self.low)

    def logsnr(self, t: Tensor) -> Tensor:
        s0, s1 = self._ends()
        return t * s1.logsnr(t) + (1 - t) * s0.logsnr(t)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        s0, s1 = self._ends()
        return s1.logsnr(t) - s0.logsnr(t) + t * s1.dlogsnr_dt(t) + (1 - t) * s0.dlogsnr_dt(t)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        target = logsnr.to(torch.float64)
        with torch.no_grad():
            lo, hi = torch.zeros_like(target), torch.ones_like(target)
            for _ in range(64):  # fixed number of vectorised bisection steps: width 2^-64
                mid = 0.5 * (lo + hi)
                right = self.logsnr(mid) > target  # still too clean: the root is at larger t
                lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
            t0 = 0.5 * (lo + hi)
        t = t0 - (self.logsnr(t0) - target) / self.dlogsnr_dt(t0)  # Newton step; differentiable in logsnr
        return t.clamp(0, 1).to(logsnr.dtype)


BetaKind = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


@dataclass(frozen=True)
class LinearBetaSchedule(Schedule):
    """A discrete DDPM beta schedule (Ho et al. 2020; diffusers' ``DDPMScheduler``) as a continuous curve.

    ``alphas_cumprod[i] = prod_{j <= i} (1 - beta_j)`` for ``i = 0..N-1``; index ``i`` sits at ``t = i / (N - 1)``
    (t = 0 is index 0, t = 1 is index N - 1) and between grid points log-SNR is interpolated piecewise linearly,
    so the curve is strictly decreasing and has an exact inverse. Betas as in diffusers: "linear"
    (``linspace(beta_start, beta_end)``), "scaled_linear" (``linspace(sqrt(beta_start), sqrt(beta_end))^2``) and
    "squaredcos_cap_v2" (Nichol & Dhariwal 2021 eq. 17 discretised, betas capped at 0.999; ignores
    beta_start/beta_end), all computed here in float64.
    """

    name: ClassVar[str] = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    beta_schedule: BetaKind = "linear"

    def __post_init__(self) -> None:
        valid = ("linear", "scaled_linear", "squaredcos_cap_v2")
        if self.beta_schedule not in valid:
            raise ConfigError(f"{self.name}: unknown beta_schedule {self.beta_schedule!r}; valid: {', '.join(valid)}")
        if self.num_train_timesteps < 2:
            raise ConfigError(f"{self.name}: num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.beta_schedule != "squaredcos_cap_v2" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"{self.name}: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, "
                              f"{self.beta_end}")

    def betas(self) -> Tensor:
        """``[N]`` float64 betas."""
        n, f64 = self.num_train_timesteps, torch.float64
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=f64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=f64) ** 2
        i = torch.arange(n, dtype=f64)
        alpha_bar = lambda s: torch.cos((s / n + 0.008) / 1.008 * _HALF_PI) ** 2  # noqa: E731
        return (1 - alpha_bar(i + 1) / alpha_bar(i)).clamp(max=0.999)

    @cached_property
    def _grid(self) -> Tensor:
        """``[N]`` float64 log-SNR at the integer timesteps (strictly decreasing)."""
        log_acp = torch.cumsum(torch.log1p(-self.betas()), 0)
        return log_acp - torch.log(-torch.expm1(log_acp))

    def alphas_cumprod(self) -> Tensor:
        """``[N]`` float64 ``alphas_cumprod`` (= sigmoid of the log-SNR grid)."""
        return torch.sigmoid(self._grid)

    def logsnr_from_timestep(self, timestep: Tensor) -> Tensor:
        """log-SNR at (fractional) timestep indices in ``[0, N-1]``; exact on integers. Keeps ``timestep``'s dtype
        (integer input gives float64)."""
        out_dtype = timestep.dtype if timestep.is_floating_point() else torch.float64
        s = timestep.to(torch.float64)
        grid = self._grid.to(s.device)
        i0 = s.floor().clamp(0, self.num_train_timesteps - 2)
        frac, i0 = s - i0, i0.long()
        a, b = grid[i0], grid[i0 + 1]
        out = torch.where(frac < 0.5, a + frac * (b - a), b - (1 - frac) * (b - a))
        return out.to(out_dtype)

    def timestep_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Fractional timestep index in ``[0, N-1]`` (clamped) for ``logsnr``; exact inverse on the grid."""
        target = logsnr.to(torch.float64)
        grid = self._grid.to(target.device)
        k = torch.searchsorted(-grid, -target.contiguous())  # first k with grid[k] <= target
        i0 = (k - 1).clamp(0, self.num_train_timesteps - 2)
        a, b = grid[i0], grid[i0 + 1]
        frac = ((target - a) / (b - a)).clamp(0, 1)
        frac = torch.where(torch.isnan(target), target, frac)
        return (i0 + frac).to(logsnr.dtype)

    def logsnr(self, t: Tensor) -> Tensor:
        return self.logsnr_from_timestep(t * (self.num_train_timesteps - 1)).to(t.dtype)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return self.timestep_from_logsnr(logsnr) / (self.num_train_timesteps - 1)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        """Slope of the linear piece containing ``t`` (the right-hand piece at grid points)."""
        n = self.num_train_timesteps
        grid = self._grid.to(t.device)
        i0 = (t.to(torch.float64) * (n - 1)).floor().clamp(0, n - 2).long()
        return ((grid[i0 + 1] - grid[i0]) * (n - 1)).to(t.dtype)


@dataclass(frozen=True)
class EDMSchedule(Schedule):
    """Karras et al. 2022 (EDM) eq. 5 as a continuous curve: ``sigma(t) = (a + t (b - a))^rho`` with
    ``a = sigma_min^(1/rho)``, ``b = sigma_max^(1/rho)`` (t = 0 is sigma_min), and ``logsnr = -2 log sigma``
    (VE sigma = sigma/alpha of the VP process). ``dlogsnr/dt = -2 rho (b - a) / (a + t (b - a))``."""

    name: ClassVar[str] = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max) and self.rho > 0):
            raise ConfigError(f"{self.name}: need 0 < sigma_min < sigma_max < inf and rho > 0, got "
                              f"{self.sigma_min}, {self.sigma_max}, {self.rho}")

    @property
    def _ab(self) -> tuple[float, float]:
        return self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)

    def logsnr(self, t: Tensor) -> Tensor:
        a, b = self._ab
        return -2 * self.rho * torch.log(a + t * (b - a))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        a, b = self._ab
        return ((torch.exp(-logsnr / (2 * self.rho)) - a) / (b - a)).clamp(0, 1)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        a, b = self._ab
        return -2 * self.rho * (b - a) / (a + t * (b - a))


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (CosineSchedule, ShiftedCosineSchedule, InterpolatedCosineSchedule, LinearBetaSchedule, EDMSchedule)
}


def get_schedule(name: str, **params: Any) -> Schedule:
    """Build the schedule registered as ``name``; unknown names or parameters raise a one-line ConfigError."""
    cls = get_registered(SCHEDULES, name, "schedule")
    return from_dict(cls, params, where=name)


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    """Inverse of :meth:`Schedule.to_dict`: ``{"name": ..., **params}`` -> schedule."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"schedule dict needs a 'name' key (valid: {', '.join(sorted(SCHEDULES))}), got {d!r}")
    params = dict(d)
    return get_schedule(params.pop("name"), **params)
