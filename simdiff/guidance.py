"""Classifier-free guidance as a wrapper over a denoiser, with a guidance interval and guidance rescale.

Weight convention (used everywhere in simdiff), Ho & Salimans 2022 eq. 6::

    guided = cond + w * (cond - uncond) = (1 + w) cond - w uncond        (w = 0: plain conditional model)

(the EDM2 / Kynkäänniemi "G" and the diffusers ``guidance_scale`` are ``1 + w``). The rule is affine with
coefficients summing to one, so it gives the same result applied to x, eps or v: the three guided views are
mutually consistent (identical to ``process.to_output("x", guided_x)``).

* Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality", sec. 4): guide only where ``lo <= logsnr <= hi``; elsewhere return the conditional
  prediction. The paper's interval is in EDM sigmas ``(sigma_lo, sigma_hi]``; :func:`interval_from_sigma` maps it
  (closed at both ends here).
* Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", sec. 3.4,
  eqs. 15-17): ``x_resc = guided * std(cond) / std(guided)`` per example, ``x = phi x_resc + (1 - phi) guided``.
  Lin et al. rescaled their v-prediction; simdiff rescales the **x** prediction (the image itself, whose
  over-exposure the rescale is meant to fix, and the view every sampler consumes), then rebuilds eps and v from it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from simdiff.process import Denoiser, DenoiserOutput, to_output

__all__ = ["classifier_free_guidance", "ClassifierFreeGuidance", "guide", "interval_from_sigma"]


def interval_from_sigma(sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
    """EDM noise levels ``sigma_lo < sigma_hi`` (VE sigma = sigma/alpha) -> log-SNR interval ``(lo, hi)``.

    ``logsnr = -2 log sigma``, so ``sigma_hi`` gives the lower log-SNR bound; e.g. sigmas ``(0.28, 1.61)`` (about the
    guided steps of Kynkäänniemi et al.'s EDM2-XXL setting, ALGORITHMS.md 2.3) give about ``(-0.95, 2.55)``.
    """
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
    return -2.0 * math.log(sigma_hi), -2.0 * math.log(sigma_lo)


def guide(
    cond: DenoiserOutput, uncond: DenoiserOutput, *, weight: float, z: Tensor, logsnr: Tensor, rescale: float = 0.0
) -> DenoiserOutput:
    """Combine conditional and unconditional predictions: ``cond + weight * (cond - uncond)`` on every view.

    With ``rescale > 0`` the guided x is rescaled per example to the conditional x's standard deviation (over all
    non-batch dims), mixed by ``rescale``, and eps / v are rebuilt from it with ``process.to_output``.

    Args:
        cond, uncond: predictions for the same ``z`` ``[B, ...]``.
        weight: guidance weight ``w`` (0 = conditional).
        z: ``[B, ...]`` noisy input; logsnr: ``[B]``.
        rescale: ``phi`` in [0, 1] (0 = no rescale).
    """
    def mix(c: Tensor, u: Tensor) -> Tensor:
        return c + weight * (c - u)

    if rescale == 0.0:
        # Each view combined directly: exactly consistent by linearity, and no division by sigma at high log-SNR.
        return DenoiserOutput(x=mix(cond.x, uncond.x), eps=mix(cond.eps, uncond.eps), v=mix(cond.v, uncond.v))
    x = mix(cond.x, uncond.x)
    dims = tuple(range(1, x.dim()))
    ratio = cond.x.std(dim=dims, keepdim=True) / x.std(dim=dims, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    x = rescale * (x * ratio) + (1.0 - rescale) * x
    return to_output("x", x, z=z, logsnr=logsnr)


def _take(out: DenoiserOutput, sl: slice) -> DenoiserOutput:
    return DenoiserOutput(x=out.x[sl], eps=out.eps[sl], v=out.v[sl])


class ClassifierFreeGuidance:
    """A guided denoiser ``guided(z, logsnr, **cond) -> DenoiserOutput``; see :func:`classifier_free_guidance`."""

    def __init__(
        self,
        denoise: Denoiser,
        *,
        weight: float,
        null_cond: dict[str, Any],
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
    ) -> None:
        if not null_cond:
            raise ValueError("classifier_free_guidance needs a non-empty null_cond, e.g. {'labels': num_classes}")
        if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
            raise ValueError(f"guidance interval must be (lo, hi) with lo <= hi in log-SNR, got {interval}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.denoise = denoise
        self.weight = float(weight)
        self.null_cond = dict(null_cond)
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.rescale = float(rescale)

    def _null(self, key: str, ref: Any, b: int) -> Tensor:
        if not torch.is_tensor(ref) or ref.dim() == 0 or ref.shape[0] != b:
            got = tuple(ref.shape) if torch.is_tensor(ref) else type(ref).__name__
            raise ValueError(f"guidance: conditioning {key!r} must be a [B={b}, ...] tensor to be replaced, got {got}")
        null = torch.as_tensor(self.null_cond[key], dtype=ref.dtype, device=ref.device)
        try:
            return null.broadcast_to(ref.shape)
        except RuntimeError:
            raise ValueError(
                f"guidance: null_cond[{key!r}] of shape {tuple(null.shape)} does not broadcast to the conditioning "
                f"shape {tuple(ref.shape)}"
            ) from None

    def _doubled_cond(self, cond: dict[str, Any], b: int, idx: Tensor | None) -> dict[str, Any]:
        """Conditioning for the batch ``[all B conditional ; subset idx unconditional]``."""
        missing = sorted(set(self.null_cond) - set(cond))
        if missing:
            raise ValueError(f"guidance: null_cond has {missing} but the call's conditioning has {sorted(cond)}")
        out = {}
        for key, val in cond.items():
            if key in self.null_cond:
                second = self._null(key, val, b)
            elif torch.is_tensor(val) and val.dim() > 0 and val.shape[0] == b:
                second = val
            else:  # unbatched (None, flags): shared by both halves
                out[key] = val
                continue
            out[key] = torch.cat([val, second if idx is None else second[idx]])
        return out

    def __call__(self, z: Tensor, logsnr: Tensor, **cond: Any) -> DenoiserOutput:
        b = z.shape[0]
        lam = logsnr.to(z.device) if torch.is_tensor(logsnr) else torch.tensor(logsnr, dtype=z.dtype, device=z.device)
        if lam.dim() == 0 or lam.shape == (1,):
            lam = lam.reshape(1).expand(b)
        if lam.shape != (b,):
            raise ValueError(f"guidance: logsnr must be [B] or scalar, got {tuple(lam.shape)} for z {tuple(z.shape)}")
        if self.weight == 0.0:
            return self.denoise(z, lam, **cond)
        if self.interval is None:
            idx, n_in = None, b
        else:
            inside = (lam >= self.interval[0]) & (lam <= self.interval[1])
            n_in = int(inside.sum())
            idx = None if n_in == b else inside.nonzero().squeeze(1)
        if n_in == 0:
            return self.denoise(z, lam, **cond)
        z_sub = z if idx is None else z[idx]
        lam_sub = lam if idx is None else lam[idx]
        out = self.denoise(torch.cat([z, z_sub]), torch.cat([lam, lam_sub]), **self._doubled_cond(cond, b, idx))
        c, u = _take(out, slice(0, b)), _take(out, slice(b, None))
        c_sub = c if idx is None else DenoiserOutput(x=c.x[idx], eps=c.eps[idx], v=c.v[idx])
        g = guide(c_sub, u, weight=self.weight, z=z_sub, logsnr=lam_sub, rescale=self.rescale)
        if idx is None:
            return g
        return DenoiserOutput(
            x=c.x.index_copy(0, idx, g.x), eps=c.eps.index_copy(0, idx, g.eps), v=c.v.index_copy(0, idx, g.v)
        )

    def __repr__(self) -> str:
        return (
            f"ClassifierFreeGuidance(weight={self.weight}, interval={self.interval}, rescale={self.rescale}, "
            f"null_cond keys={sorted(self.null_cond)})"
        )


def classifier_free_guidance(
    denoise: Denoiser,
    *,
    weight: float,
    null_cond: dict[str, Any],
    interval: tuple[float, float] | None = None,
    rescale: float = 0.0,
) -> ClassifierFreeGuidance:
    """Wrap ``denoise`` with classifier-free guidance ``cond + weight * (cond - uncond)`` (Ho & Salimans 2022).

    One network call per evaluation: the conditional batch and the unconditional copies of the examples being guided
    are concatenated (size ``B + n``, ``n = B`` without an interval). The unconditional half uses the call's
    conditioning with the keys of ``null_cond`` replaced (values broadcast to the conditioning's shape, e.g.
    ``{"labels": num_classes}`` or ``{"context": zeros}``). With ``interval=(lo, hi)`` (log-SNR, see
    :func:`interval_from_sigma`) only examples with ``lo <= logsnr <= hi`` get an unconditional copy; if none do, the
    call is a single conditional evaluation of size ``B``. ``weight = 0`` is always a single conditional call.

    Args:
        denoise: ``denoise(z, logsnr, **cond) -> DenoiserOutput``.
        weight: guidance weight ``w`` (0 = conditional; the diffusers scale is ``1 + w``).
        null_cond: conditioning keywords meaning "unconditional".
        interval: optional ``(lo, hi)`` log-SNR range where guidance is applied.
        rescale: guidance-rescale mix ``phi`` (Lin et al. 2024) on the x prediction; 0 = off.
    """
    return ClassifierFreeGuidance(denoise, weight=weight, null_cond=null_cond, interval=interval, rescale=rescale)
