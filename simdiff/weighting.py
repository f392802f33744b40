"""Loss weightings, all expressed as a weight on the x-space error ``||x - x_hat||^2`` (one common scale).

Every weighting is a function ``w(logsnr)`` such that the per-example loss is ``w(logsnr) * mean((x - x_hat)^2)``.
Because the VP conversions are exact (``simdiff.process``), the classic losses are weightings of the x-MSE
(Salimans & Ho 2022 sec. 4)::

    ||eps - eps_hat||^2 = e^logsnr       ||x - x_hat||^2        -> "eps"
    ||v   - v_hat  ||^2 = (1 + e^logsnr) ||x - x_hat||^2        -> "v"
    max(SNR, 1)         ||x - x_hat||^2                         -> "snr_trunc" (progressive distillation)

and the named re-weightings are:

* ``min_snr`` (Hang et al. 2023, "Efficient diffusion training via Min-SNR weighting", eq. 8): the eps loss weighted
  by ``min(SNR, gamma) / SNR`` -> x-weight ``min(SNR, gamma)``. (Their v-prediction form
  ``min(SNR, gamma) / (SNR + 1)`` times the v-MSE gives the *same* x-weight, so one entry serves both.)
* ``edm`` (Karras et al. 2022, eq. 8 / Table 1): ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
  on ``||D(x + sigma n) - x||^2`` with the VE noise level ``sigma = exp(-logsnr / 2)``. ``D`` is an x-estimate, so
  the x-weight is ``lambda = e^logsnr + 1 / sigma_data^2`` (equal to "v" when ``sigma_data = 1``). Only the weight is
  reproduced here; EDM's log-normal noise-level sampling is a matter for the time schedule.
* ``sigmoid`` (Kingma & Gao 2023, VDM++; SiD2, Hoogeboom et al. 2024 eq. 4): eps-weight ``sigmoid(b - logsnr)``
  -> x-weight ``e^logsnr sigmoid(b - logsnr) = e^b sigmoid(logsnr - b)``, computed as
  ``exp(b + logsigmoid(logsnr - b))`` so it neither overflows nor forms ``inf * 0``. Limits: ``logsnr >> b`` ->
  ``e^b`` (an x-loss), ``logsnr << b`` -> ``e^logsnr`` (an eps-loss). The VDM++ ``1/2`` factor is dropped
  (a constant).

The ``-dlogsnr/dt`` Jacobian of VDM++ / SiD2 is *not* part of a weighting: ``simdiff.losses.diffusion_loss`` applies
it (``jacobian=True``, from the process: ``GaussianProcess.jacobian``) since it depends on the time schedule, not on
log-SNR. A process with per-coordinate coefficients evaluates the weighting at each coordinate's own log-SNR
(``GaussianProcess.loss_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError, get_registered

__all__ = [
    "Weighting",
    "WEIGHTINGS",
    "DEFAULT_SIGMOID_BIAS",
    "get_weighting",
    "sigmoid_bias_for_resolution",
]

#: Default sigmoid bias ``b`` (see :func:`_sigmoid` for why).
DEFAULT_SIGMOID_BIAS = 2.0


def sigmoid_bias_for_resolution(bias_ref: float, *, ref_size: float, image_size: float) -> float:
    """Shift a sigmoid bias from a reference resolution to ``image_size``: ``bias_ref + 2 log(ref_size / image_size)``.

    HYPOTHESIS, not a verified paper rule: SiD2 (Hoogeboom et al. 2024) is described as balancing the shift of the
    sigmoid with the resolution, but the exact rule was not checked against the paper. This applies the same
    ``2 log(ratio)`` shift that simple diffusion's shifted cosine schedule applies to log-SNR (2x2 pooling multiplies
    the SNR by 4), so that the weighting stays put relative to a resolution-shifted schedule. It is an explicit
    opt-in (the ``ref_size`` / ``image_size`` parameters of the "sigmoid" weighting), never applied by default.
    """
    if ref_size <= 0 or image_size <= 0:
        raise ValueError(f"ref_size and image_size must be > 0, got ref_size={ref_size}, image_size={image_size}")
    return float(bias_ref) + 2.0 * math.log(ref_size / image_size)


def _x(logsnr: Tensor) -> Tensor:
    return torch.ones_like(logsnr)


def _eps(logsnr: Tensor) -> Tensor:
    return torch.exp(logsnr)


def _v(logsnr: Tensor) -> Tensor:
    return 1.0 + torch.exp(logsnr)


def _snr_trunc(logsnr: Tensor) -> Tensor:
    return torch.exp(logsnr.clamp(min=0.0))


def _min_snr(logsnr: Tensor, *, gamma: float = 5.0) -> Tensor:
    if gamma <= 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    return torch.exp(logsnr.clamp(max=math.log(gamma)))


def _edm(logsnr: Tensor, *, sigma_data: float = 0.5) -> Tensor:
    if sigma_data <= 0:
        raise ValueError(f"edm sigma_data must be > 0, got {sigma_data}")
    return torch.exp(logsnr) + 1.0 / sigma_data**2


def _sigmoid(
    logsnr: Tensor,
    *,
    bias: float = DEFAULT_SIGMOID_BIAS,
    ref_size: float | None = None,
    image_size: float | None = None,
) -> Tensor:
    """x-weight ``e^b sigmoid(logsnr - b)`` (eps-weight ``sigmoid(b - logsnr)``).

    Default ``b = +2``. Evidence: Kingma & Gao's sigmoid(-logsnr + 2) as used in the bayesflow code;
    hackable_diffusion's code defaults to ``b = 0``; SiD2's own value for high-resolution (>= 256) images is
    believed to be around ``b ~ -3``, which was not verified against the paper. Under the resolution-shift
    hypothesis the bias *decreases* as images grow, so small images (MNIST/CIFAR, <= 64 px, the scale simdiff trains
    at) sit at the high end of that range; ``b = +2`` is the one value with a concrete low-resolution provenance.
    With ``b = 2`` the weight is an eps-loss below log-SNR ~ 2 and saturates at ``e^2`` ~ 7.4 above it, i.e. it
    de-emphasises nearly clean inputs relative to the v-loss. Give ``ref_size`` and ``image_size`` to apply
    :func:`sigmoid_bias_for_resolution` to ``bias``.
    """
    if (ref_size is None) != (image_size is None):
        raise ValueError("sigmoid weighting: give both ref_size and image_size (resolution shift) or neither")
    b = bias if ref_size is None else sigmoid_bias_for_resolution(bias, ref_size=ref_size, image_size=image_size)
    return torch.exp(b + F.logsigmoid(logsnr - b))


#: name -> function ``f(logsnr, **params)``; the keyword defaults of ``f`` are the parameter defaults.
WEIGHTINGS: dict[str, Callable[..., Tensor]] = {
    "x": _x,
    "eps": _eps,
    "v": _v,
    "snr_trunc": _snr_trunc,
    "min_snr": _min_snr,
    "edm": _edm,
    "sigmoid": _sigmoid,
}


def _param_names(fn: Callable[..., Tensor]) -> tuple[str, ...]:
    return tuple(fn.__kwdefaults__ or {})


@dataclass(frozen=True)
class Weighting:
    """A named loss weight ``w(logsnr)`` on ``||x - x_hat||^2``; build with :func:`get_weighting`.

    Call with ``logsnr`` of any shape (typically ``[B]``); returns the weight with the same shape and dtype.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fn = get_registered(WEIGHTINGS, self.name, "weighting")
        valid = _param_names(fn)
        for key in self.params:
            if key not in valid:
                raise ConfigError(
                    f"unknown parameter {key!r} for weighting {self.name!r}; valid: {', '.join(valid) or '(none)'}"
                )
        # Evaluate once so that bad parameter values fail at construction time, not in the training loop.
        fn(torch.zeros(1, dtype=torch.float64), **self.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __call__(self, logsnr: Tensor) -> Tensor:
        return WEIGHTINGS[self.name](logsnr, **self.params)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params}`` (inverse of ``get_weighting(**d)``)."""
        return {"name": self.name, **self.params}


def get_weighting(name: str, **params: Any) -> Weighting:
    """Build the weighting ``name`` (one of :data:`WEIGHTINGS`) with keyword ``params``.

    Parameters: ``min_snr``: ``gamma`` (5.0); ``edm``: ``sigma_data`` (0.5); ``sigmoid``: ``bias`` (2.0) and the
    optional ``ref_size`` + ``image_size`` resolution shift. Unknown names or parameters raise a one-line
    :class:`~simdiff.configuration.ConfigError` listing the valid ones.
    """
    return Weighting(name, dict(params))
