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
  over-exposure the rescale is meant to fix, and the view every sampler consumes), then rebuilds eps and v from it
  (with ``process.to_output`` when a process is given, so a non-isotropic process rebuilds them per coordinate).

The unconditional conditioning is built by :func:`simdiff.conditioners.null_conditioning` (the keys of
``null_cond`` replaced; a ``None`` value means "call without this conditioning").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from simdiff.conditioners import null_conditioning
from simdiff.process import Denoiser, DenoiserOutput, to_output

__all__ = ["classifier_free_guidance", "ClassifierFreeGuidance", "guide", "interval_from_sigma"]


def interval_from_sigma(sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
    """EDM noise levels ``sigma_lo < sigma_hi`` (VE sigma = sigma/alpha) -> log-SNR interval ``(lo, hi)``.

    ``logsnr = -2 log sigma``, so ``sigma_hi`` gives the lower log-SNR bound; e.g. sigmas ``(0.28, 1.61)`` (about the
    guided steps of Kynkäänniemi et al.'s EDM2-XXL setting) give about ``(-0.95, 2.55)``.
    """
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
    return -2.0 * math.log(sigma_hi), -2.0 * math.log(sigma_lo)


def guide(
    cond: DenoiserOutput,
    uncond: DenoiserOutput,
    *,
    weight: float,
    z: Tensor,
    logsnr: Tensor,
    rescale: float = 0.0,
    process: Any = None,
) -> DenoiserOutput:
    """Combine conditional and unconditional predictions: ``cond + weight * (cond - uncond)`` on every view.

    With ``rescale > 0`` the guided x is rescaled per example to the conditional x's standard deviation (over all
    non-batch dims), mixed by ``rescale``, and eps / v are rebuilt from it with ``process.to_output`` (the
    isotropic :func:`simdiff.process.to_output` when ``process`` is None).

    Args:
        cond, uncond: predictions for the same ``z`` ``[B, ...]``.
        weight: guidance weight ``w`` (0 = conditional).
        z: ``[B, ...]`` noisy input; logsnr: ``[B]`` (the process's level when a process is given).
        rescale: ``phi`` in [0, 1] (0 = no rescale).
        process: optional process with ``to_output(kind, pred, *, z, lam)``.
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
    if process is not None:
        return process.to_output("x", x, z=z, lam=logsnr)
    return to_output("x", x, z=z, logsnr=logsnr)


def _index(out: DenoiserOutput, idx: Tensor) -> DenoiserOutput:
    return DenoiserOutput(x=out.x[idx], eps=out.eps[idx], v=out.v[idx])


def _joint(cond: dict[str, Any], null: dict[str, Any], b: int, n: int) -> dict[str, Any] | None:
    """Conditioning of the batch ``[B conditional ; n unconditional]``, or None if some pair cannot share a call.

    A ``[B, ...]`` conditional tensor is concatenated with its ``[n, ...]`` unconditional counterpart; an unbatched
    value (a flag, ``None``, a tensor without the batch dimension) is shared when both halves have the same object.
    """
    out = {}
    for key, a in cond.items():
        u = null[key]
        if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == b:
            if not (torch.is_tensor(u) and u.shape == (n, *a.shape[1:])):
                return None
            out[key] = torch.cat([a, u])
        elif u is a:
            out[key] = a
        else:
            return None
    return out


class ClassifierFreeGuidance:
    """A guided denoiser ``guided(z, logsnr, *, host_level=None, **cond) -> DenoiserOutput``.

    See :func:`classifier_free_guidance`. ``wants_host_level = True`` asks the samplers' network wrapper to pass
    ``host_level``, the step's log-SNR as a Python float (every example of a sampler call is at that level): the
    guidance interval is then decided on the host, without reading the device and with static shapes (a call is
    one network evaluation of size ``2B`` inside the interval, ``B`` outside). Without ``host_level`` (a caller
    passing per-example levels ``[B]`` directly) the examples inside the interval are selected on the device
    (``nonzero``, one host synchronisation, a call of size ``B + n_inside``).
    """

    wants_host_level = True

    def __init__(
        self,
        denoise: Denoiser,
        *,
        weight: float,
        null_cond: dict[str, Any],
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
        process: Any = None,
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
        self.process = process
        self._pass_level = bool(getattr(denoise, "wants_host_level", False))

    def _inner(self, z: Tensor, lam: Tensor, host_level: float | None, cond: dict[str, Any]) -> DenoiserOutput:
        if self._pass_level and host_level is not None:
            return self.denoise(z, lam, host_level=host_level, **cond)
        return self.denoise(z, lam, **cond)

    def _inside(self, level: float) -> bool:
        return self.interval is None or self.interval[0] <= level <= self.interval[1]

    def __call__(self, z: Tensor, logsnr: Tensor, *, host_level: float | None = None, **cond: Any) -> DenoiserOutput:
        b = z.shape[0]
        lam = logsnr.to(z.device) if torch.is_tensor(logsnr) else torch.tensor(logsnr, dtype=z.dtype, device=z.device)
        if lam.dim() == 0 or lam.shape == (1,):
            lam = lam.reshape(1).expand(b)
        if lam.shape != (b,):
            raise ValueError(f"guidance: logsnr must be [B] or scalar, got {tuple(lam.shape)} for z {tuple(z.shape)}")
        if self.weight == 0.0:
            return self._inner(z, lam, host_level, cond)
        null = null_conditioning(cond, self.null_cond, batch=b)
        if host_level is not None or self.interval is None:
            if host_level is not None and not self._inside(float(host_level)):
                return self._inner(z, lam, host_level, cond)
            return self._guided(z, lam, host_level, cond, null)
        # per-example levels given directly: select the guided subset on the device (one host sync)
        inside = (lam >= self.interval[0]) & (lam <= self.interval[1])
        idx = inside.nonzero().squeeze(1)
        n_in = idx.shape[0]
        if n_in == b:
            return self._guided(z, lam, None, cond, null)
        if n_in == 0:
            return self._inner(z, lam, None, cond)
        sub = {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v for k, v in null.items()}
        c, u = self._pair(z, lam, None, cond, z[idx], lam[idx], sub)
        g = guide(_index(c, idx), u, weight=self.weight, z=z[idx], logsnr=lam[idx], rescale=self.rescale,
                  process=self.process)
        return DenoiserOutput(
            x=c.x.index_copy(0, idx, g.x), eps=c.eps.index_copy(0, idx, g.eps), v=c.v.index_copy(0, idx, g.v)
        )

    def _guided(
        self, z: Tensor, lam: Tensor, host_level: float | None, cond: dict[str, Any], null: dict[str, Any]
    ) -> DenoiserOutput:
        c, u = self._pair(z, lam, host_level, cond, z, lam, null)
        return guide(c, u, weight=self.weight, z=z, logsnr=lam, rescale=self.rescale, process=self.process)

    def _pair(
        self,
        z: Tensor,
        lam: Tensor,
        host_level: float | None,
        cond: dict[str, Any],
        z_u: Tensor,
        lam_u: Tensor,
        null: dict[str, Any],
    ) -> tuple[DenoiserOutput, DenoiserOutput]:
        """Conditional predictions for ``(z, lam, cond)`` and unconditional ones for ``(z_u, lam_u, null)``.

        One concatenated call when every conditioning pair can share a batch; two calls otherwise (a null value of
        ``None`` next to a tensor).
        """
        b = z.shape[0]
        both = _joint(cond, null, b, z_u.shape[0])
        if both is None:
            return self._inner(z, lam, host_level, cond), self._inner(z_u, lam_u, host_level, null)
        out = self._inner(torch.cat([z, z_u]), torch.cat([lam, lam_u]), host_level, both)
        c = DenoiserOutput(x=out.x[:b], eps=out.eps[:b], v=out.v[:b])
        return c, DenoiserOutput(x=out.x[b:], eps=out.eps[b:], v=out.v[b:])

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
    process: Any = None,
) -> ClassifierFreeGuidance:
    """Wrap ``denoise`` with classifier-free guidance ``cond + weight * (cond - uncond)`` (Ho & Salimans 2022).

    One network call per evaluation: the conditional batch and the unconditional copies of the examples being guided
    are concatenated (size ``B + n``, ``n = B`` without an interval). The unconditional half uses the call's
    conditioning with the keys of ``null_cond`` replaced by :func:`simdiff.conditioners.null_conditioning` (values
    broadcast to the conditioning's shape, e.g. ``{"labels": num_classes}`` or ``{"context": zeros}``; a value
    ``None`` calls the denoiser with that keyword ``None``, and since ``None`` cannot share a batch with a tensor the
    two halves are then two calls of size ``B`` and ``n``). With ``interval=(lo, hi)`` (log-SNR, see
    :func:`interval_from_sigma`) only examples with ``lo <= logsnr <= hi`` are guided: from a sampler (which passes
    ``host_level``) the whole call is inside (size ``2B``) or outside (size ``B``); with per-example levels and no
    ``host_level``, only the examples inside get an unconditional copy. ``weight = 0`` is always a single
    conditional call.

    Args:
        denoise: ``denoise(z, logsnr, **cond) -> DenoiserOutput`` (given ``host_level=`` too when it has
            ``wants_host_level = True``).
        weight: guidance weight ``w`` (0 = conditional; the diffusers scale is ``1 + w``).
        null_cond: conditioning keywords meaning "unconditional".
        interval: optional ``(lo, hi)`` log-SNR range where guidance is applied.
        rescale: guidance-rescale mix ``phi`` (Lin et al. 2024) on the x prediction; 0 = off.
        process: optional process (``to_output(kind, pred, *, z, lam)``) used to rebuild eps / v after a rescale.
    """
    return ClassifierFreeGuidance(denoise, weight=weight, null_cond=null_cond, interval=interval, rescale=rescale,
                                  process=process)
