"""Reverse samplers of masked diffusion and the categorical draws under them.

Tokens are integers ``0..V-1``; the mask (absorbing) state is ``V``. A denoiser maps ``(x_t [B, *shape], t [B])`` to
logits ``[B, *shape, V]`` of ``p(x_0 | x_t)`` (only the masked positions are read).

* :func:`tau_leaping_step`: the ancestral step from ``t`` to ``s < t`` on a fixed grid (MD4, Shi et al. 2024;
  MDLM, Sahoo et al. 2024): each masked token is unmasked with probability
  ``(alpha_s - alpha_t) / (1 - alpha_t)``, its value drawn from the denoiser; unmasked tokens stay. It is drawn, as
  in MDLM, as one categorical over ``V + 1`` outcomes (the ``V`` tokens scaled by the unmasking probability, and
  "stay masked"), which is where low-precision sampling bites: with many steps the token probabilities are tiny.
* :func:`first_hitting_step` / :func:`sample_first_hitting`: the first-hitting sampler (Zheng et al. 2024,
  "Masked diffusion models are secretly time-agnostic masked models and exploit inaccurate categorical sampling"):
  with ``n`` masked tokens at time ``tau_n`` the next unmasking happens at
  ``tau_{n-1} = alpha^{-1}(1 - (1 - alpha(tau_n)) u^{1/n})``, ``u ~ U(0, 1)``, at one masked position chosen
  uniformly; one network call per token and no time-discretisation error. ``k > 1`` tokens per call is the
  parallel variant (k positions unmasked from one call, each drawn from its own marginal: not exact).
* :func:`categorical`: ``"float64"`` draws by inverse CDF in float64 (each outcome's probability is exact to
  ``2^-53``); ``"float32"`` is float32 Gumbel-max (``argmax(log p - log(-log(u + 1e-10)))`` with float32 ``u``; the
  ``1e-10`` guard is the usual one in released masked-diffusion code, not checked), whose noise is
  bounded above by ``-log(-log(1 - 2^-24)) = 16.64`` and so under-samples outcomes far below the top one: a lower
  effective temperature (Zheng et al. 2024; the tests compute the effect exactly).

Section and equation numbers of these papers are not given: they were not checked against the papers' text here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from simdiff.discrete.schedules import MaskSchedule

__all__ = ["PRECISIONS", "categorical", "gumbel_noise", "tau_leaping_step", "first_hitting_step",
           "next_hitting_time", "sample_tau_leaping", "sample_first_hitting"]

PRECISIONS = ("float64", "float32")
Denoiser = Callable[..., Tensor]


def gumbel_noise(u: Tensor) -> Tensor:
    """``-log(-log(u + 1e-10))`` in ``u``'s dtype: Gumbel noise from uniforms ``u`` in [0, 1) (finite at 0)."""
    return -torch.log(-torch.log(u + 1e-10))


def categorical(probs: Tensor, *, generator: torch.Generator | None = None, precision: str = "float64") -> Tensor:
    """One draw per row of ``probs [..., K]`` (non-negative, rows summing to 1) -> indices ``[...]`` (long).

    ``precision="float64"``: inverse CDF of the float64 row with a float64 uniform. ``"float32"``: Gumbel-max on
    float32 log-probabilities with float32 uniforms (the truncated sampler, kept for comparison).
    """
    if precision == "float64":
        p = probs.to(torch.float64)
        cdf = p.cumsum(-1)
        u = torch.rand(p.shape[:-1], generator=generator, dtype=torch.float64, device=p.device) * cdf[..., -1]
        idx = torch.searchsorted(cdf.contiguous(), u.unsqueeze(-1), right=True).squeeze(-1)
        return idx.clamp_max(p.shape[-1] - 1)
    if precision == "float32":
        logp = probs.to(torch.float32).log()
        u = torch.rand(logp.shape, generator=generator, dtype=torch.float32, device=logp.device)
        return (logp + gumbel_noise(u)).argmax(-1)
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def _expand(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1))


def tau_leaping_step(denoise: Denoiser, x_t: Tensor, *, t: Tensor, s: Tensor, schedule: MaskSchedule,
                     mask_id: int, generator: torch.Generator | None = None, precision: str = "float64",
                     **cond: Any) -> Tensor:
    """One ancestral step ``x_t -> x_s`` (``t``, ``s`` ``[B]``, ``s < t``); returns tokens like ``x_t``."""
    masked = x_t == mask_id
    a_t, a_s = schedule.alpha(t.to(torch.float64)), schedule.alpha(s.to(torch.float64))
    r = _expand(((a_s - a_t) / (1 - a_t)).clamp(0, 1), x_t)  # unmasking probability of a masked token
    if not bool(masked.any()):
        return x_t
    p0 = denoise(x_t, t, **cond).to(torch.float64).softmax(-1)  # [B, *shape, V]
    probs = torch.cat([p0 * r.unsqueeze(-1), (1 - r).expand_as(masked).unsqueeze(-1)], -1)
    draw = categorical(probs, generator=generator, precision=precision)  # V means "stay masked"
    return torch.where(masked, draw, x_t)


def next_hitting_time(tau: Tensor, n: Tensor, *, schedule: MaskSchedule, generator: torch.Generator | None = None
                      ) -> Tensor:
    """``tau_{n-1} = alpha^{-1}(1 - (1 - alpha(tau_n)) u^{1/n})`` per row (float64; rows with ``n = 0`` keep
    ``tau``): the time of the next unmasking when ``n`` tokens are masked at ``tau`` and each unmasks independently
    at its own time ``alpha^{-1}(U)``, ``U ~ U(0, 1)`` (the largest of ``n`` such times below ``tau``)."""
    tau = tau.to(torch.float64)
    u = torch.rand(tau.shape, generator=generator, dtype=torch.float64, device=tau.device)
    n64 = n.to(torch.float64)
    nxt = schedule.inverse(1 - (1 - schedule.alpha(tau)) * u ** (1 / n64.clamp_min(1)))
    return torch.where(n > 0, torch.minimum(nxt, tau), tau)


def first_hitting_step(denoise: Denoiser, x: Tensor, *, t: Tensor, mask_id: int, k: int = 1,
                       generator: torch.Generator | None = None, precision: str = "float64", **cond: Any) -> Tensor:
    """Unmask ``min(k, n)`` masked positions per row, chosen uniformly, values drawn from one call of ``denoise``
    at times ``t [B]``; ``k = 1`` is the exact first-hitting update, ``k >= n`` unmasks every masked token."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    masked = flat == mask_id
    if not bool(masked.any()):
        return x
    logits = denoise(x, t, **cond).to(torch.float64).reshape(b, flat.shape[1], -1)
    k = min(k, flat.shape[1])
    score = torch.rand(flat.shape, generator=generator, dtype=torch.float64, device=x.device)
    score = torch.where(masked, score, torch.full_like(score, -1.0))
    pos = score.topk(k, dim=-1).indices  # [B, k]: uniformly random masked positions (unmasked ones have -1)
    chosen = torch.zeros_like(masked).scatter_(1, pos, True) & masked
    draw = categorical(logits.softmax(-1), generator=generator, precision=precision)  # [B, L]
    return torch.where(chosen, draw, flat).reshape(x.shape)


def sample_tau_leaping(denoise: Denoiser, x: Tensor, *, steps: int, schedule: MaskSchedule, mask_id: int,
                       generator: torch.Generator | None = None, precision: str = "float64",
                       **cond: Any) -> tuple[Tensor, int]:
    """``steps`` ancestral steps from ``t = 1`` to 0 on a uniform grid; returns ``(tokens, network_calls)``
    (a step with nothing masked makes no call)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    calls, b = 0, x.shape[0]
    for i in range(steps):
        calls += int(bool((x == mask_id).any()))
        t, s = (grid[j].to(x.device).expand(b) for j in (i, i + 1))
        x = tau_leaping_step(denoise, x, t=t, s=s, schedule=schedule, mask_id=mask_id, generator=generator,
                             precision=precision, **cond)
    return x, calls


def sample_first_hitting(denoise: Denoiser, x: Tensor, *, schedule: MaskSchedule, mask_id: int, k: int = 1,
                         generator: torch.Generator | None = None, precision: str = "float64",
                         return_times: bool = False, **cond: Any) -> tuple[Tensor, int] | tuple[Tensor, int, Tensor]:
    """The first-hitting sampler from ``x`` at time 1 until nothing is masked: ``ceil(n / k)`` network calls.

    The network sees, at each call, the time of the next unmasking (``tau_{n-1}`` for ``k = 1``; for ``k > 1`` the
    time after all ``k`` of them); with ``return_times`` the ``[calls, B]`` times are returned too.
    """
    b = x.shape[0]
    tau = torch.ones(b, dtype=torch.float64, device=x.device)
    calls, times = 0, []
    while True:
        n = (x == mask_id).reshape(b, -1).sum(1)
        if not bool((n > 0).any()):
            break
        for j in range(k):  # the k next hitting times (n, n-1, ..., n-k+1 masked before each)
            tau = next_hitting_time(tau, (n - j).clamp_min(0), schedule=schedule, generator=generator)
        x = first_hitting_step(denoise, x, t=tau.to(torch.float32), mask_id=mask_id, k=k, generator=generator,
                               precision=precision, **cond)
        calls += 1
        times.append(tau)
    if return_times:
        return x, calls, torch.stack(times) if times else torch.zeros(0, b, dtype=torch.float64)
    return x, calls
