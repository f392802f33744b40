"""Masked (absorbing-state) discrete diffusion as a simdiff process: ``diffusion.process: {name: masked, ...}``.

The forward process masks each token independently: ``q(x_t^l | x^l) = alpha_t [x^l] + (1 - alpha_t) [mask]``
(Sahoo et al. 2024, MDLM; Shi et al. 2024, MD4). The training loss is the continuous-time ELBO
``E_t [ -alpha_t' / (1 - alpha_t) sum_{l masked} -log p_theta(x^l | x_t) ]`` (MD4, MDLM; checked here against its
closed form for an exact denoiser, not against the papers' equation numbers), reported per
token (nats; divide by ln 2 for bits per character). The denoiser's logits over the ``V`` data tokens are used
directly (the mask outcome has no mass and unmasked positions are copied: MDLM's "SUBS" parameterisation).

Data are simdiff batches ``x`` in [-1, 1] (``[B, C, H, W]``; text is ``[B, 1, 1, L]`` bytes ``u / 127.5 - 1``);
``levels`` tokens per value: 256 keeps bytes exactly, 2 binarises at 0, 4 quantises to four grey levels. Mask id is
``levels``. The network is a bare token backbone (``network_kwargs``: ``vocab_size = levels``, ``length``).
Sampling (``step``, called by :func:`simdiff.generate.generate` on a uniform grid) is tau-leaping, or, with
``sampler: first_hitting``, ``tokens_per_call`` uniformly chosen tokens per call (``steps = ceil(L / k)`` calls
with ``k = 1`` is exactly the first-hitting sampler for a time-agnostic network; remaining masks are filled at
the last step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.discrete.sampling import PRECISIONS, first_hitting_step, tau_leaping_step
from simdiff.discrete.schedules import get_mask_schedule

__all__ = ["MaskedDiffusion", "SAMPLERS", "tokens_from_data", "data_from_tokens", "decode_text"]

SAMPLERS = ("tau_leaping", "first_hitting")


def tokens_from_data(x: Tensor, levels: int) -> Tensor:
    """Values in [-1, 1] -> integer tokens ``0..levels-1`` (nearest level; 256 levels recover bytes exactly)."""
    return ((x.clamp(-1, 1) + 1) * (0.5 * (levels - 1))).round().long()


def data_from_tokens(tokens: Tensor, levels: int) -> Tensor:
    """Tokens ``0..levels-1`` -> float32 values in [-1, 1] (inverse of :func:`tokens_from_data` on levels)."""
    return tokens.clamp(0, levels - 1).float() * (2.0 / (levels - 1)) - 1


def decode_text(x: Tensor) -> list[str]:
    """Byte-level data ``[N, ...]`` in [-1, 1] (256 levels) -> one string per example (UTF-8, bad bytes replaced)."""
    b = tokens_from_data(x, 256).reshape(x.shape[0], -1).to(torch.uint8)
    return [bytes(row.tolist()).decode("utf-8", errors="replace") for row in b]


class MaskedDiffusion:
    """The masked diffusion process.

    Args:
        schedule: the experiment's Gaussian log-SNR schedule (unused: the masking schedule is ``masking``).
        masking: ``alpha(t)``: "linear", "cosine" or "log_linear" (:mod:`simdiff.discrete.schedules`).
        levels: tokens per data value (vocabulary size without the mask): 256, or 2..16 for image tokens.
        sampler: "tau_leaping" or "first_hitting" (what ``step`` does).
        tokens_per_call: tokens unmasked per call by the first-hitting ``step``.
        precision: categorical sampling, "float64" (inverse CDF) or "float32" (truncated Gumbel-max, for study).
    """

    name = "masked"
    isotropic = False

    def __init__(self, schedule: Any = None, *, masking: str = "linear", levels: int = 256,
                 sampler: str = "tau_leaping", tokens_per_call: int = 1, precision: str = "float64"):
        self.mask_schedule = get_mask_schedule(masking)
        if not (levels == 256 or 2 <= levels <= 16):
            raise ConfigError(f"masked: levels must be 256 (bytes) or 2..16 (image tokens), got {levels}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"masked: unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if tokens_per_call < 1:
            raise ConfigError(f"masked: tokens_per_call must be >= 1, got {tokens_per_call}")
        if precision not in PRECISIONS:
            raise ConfigError(f"masked: unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.masking, self.levels, self.sampler = masking, levels, sampler
        self.tokens_per_call, self.precision = tokens_per_call, precision
        self.mask_id = levels

    # ------------------------------------------------------------------------------------------ data <-> tokens
    def tokens(self, x: Tensor) -> Tensor:
        """Data ``[B, ...]`` in [-1, 1] -> tokens ``[B, ...]``."""
        return tokens_from_data(x, self.levels)

    def to_data(self, tokens: Tensor) -> Tensor:
        """Tokens -> float32 data in [-1, 1] (any leftover mask token becomes the top level)."""
        return data_from_tokens(tokens, self.levels)

    def network_kwargs(self, data_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """``vocab_size`` (data tokens; the backbone adds the mask as one more input id), sequence ``length`` and
        ``num_classes`` (class-conditional denoiser when > 0)."""
        return {"vocab_size": self.levels, "length": int(math.prod(data_shape)), "num_classes": num_classes}

    # ------------------------------------------------------------------------------------------ forward process
    def prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
              device: Any = "cpu") -> Tensor:
        """All tokens masked (time 1)."""
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def corrupt(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Tokens ``x [B, ...]`` -> ``x_t``: each masked independently with probability ``1 - alpha(t)``."""
        keep = self.mask_schedule.alpha(t.to(torch.float64)).reshape(-1, *[1] * (x.dim() - 1))
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        return torch.where(u < keep, x, torch.full_like(x, self.mask_id))

    # ------------------------------------------------------------------------------------------ the bound
    def bound_terms(self, model: Any, x: Tensor, *, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The ELBO integrand at ``(x_t, t)``: ``w(t) sum_{l masked} -log p(x^l | x_t)`` per token ``[B]`` (nats).
        Its expectation over ``t ~ U(0, 1)`` and ``x_t ~ q(x_t | x)`` is the bound on ``-log p(x) / L``."""
        masked = (x_t == self.mask_id).reshape(x.shape[0], -1)
        logits = model(x_t, t.to(torch.float32), **cond).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="none")
        ce = ce.reshape(x.shape[0], -1)
        w = self.mask_schedule.weight(t.to(torch.float64).clamp_min(1e-6)).to(ce.dtype)
        return w * (ce * masked).sum(1) / masked.shape[1]

    def loss(self, model: Any, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Per-example bound ``[B]`` in nats per token, at stratified times ``t_i = (u + i / B) mod 1`` (one
        uniform ``u`` per batch: a low-discrepancy sampler of ``t``; MDLM and MD4 reduce the variance of ``t``
        similarly, not checked against their text). The batch's other entries
        (e.g. ``labels``) are passed to the network."""
        x = self.tokens(batch["x"])
        b, dev = x.shape[0], x.device
        u = torch.rand((), generator=generator, dtype=torch.float64, device=dev)
        t = ((u + torch.arange(b, dtype=torch.float64, device=dev) / b) % 1).clamp_min(1e-6)
        cond = {k: v for k, v in batch.items() if k != "x"}
        return self.bound_terms(model, x, x_t=self.corrupt(x, t, generator), t=t, **cond)

    @torch.no_grad()
    def elbo(self, model: Any, x: Tensor, *, samples: int = 8, generator: torch.Generator | None = None,
             **cond: Any) -> Tensor:
        """Monte Carlo bound ``[B]`` on ``-log p(x) / L`` (nats per token) of tokens ``x``: ``samples`` stratified
        times per example."""
        b, dev = x.shape[0], x.device
        total = torch.zeros(b, dtype=torch.float64, device=dev)
        u = torch.rand(b, generator=generator, dtype=torch.float64, device=dev)
        for i in range(samples):
            t = ((u + i / samples) % 1).clamp_min(1e-6)
            total += self.bound_terms(model, x, x_t=self.corrupt(x, t, generator), t=t, **cond).double()
        return total / samples

    # ------------------------------------------------------------------------------------------ sampling
    def step(self, model: Any, x_t: Tensor, *, t: Tensor, s: Tensor, generator: torch.Generator | None = None,
             **cond: Any) -> Tensor:
        """One reverse step from ``t`` to ``s``: tau-leaping, or ``tokens_per_call`` first-hitting unmaskings (all
        remaining ones when ``s == 0``)."""
        if self.sampler == "tau_leaping":
            return tau_leaping_step(model, x_t, t=t, s=s, schedule=self.mask_schedule, mask_id=self.mask_id,
                                    generator=generator, precision=self.precision, **cond)
        k = x_t[0].numel() if bool((s <= 0).all()) else self.tokens_per_call
        return first_hitting_step(model, x_t, t=t, mask_id=self.mask_id, k=k, generator=generator,
                                  precision=self.precision, **cond)

    # ------------------------------------------------------------------------------------------ outputs
    def save_samples(self, x: Tensor, out: str | Path) -> Path:
        """Save generated data ``x [N, C, H, W]``: text (``levels = 256`` and ``H = 1``) as ``out`` with suffix
        ``.txt`` (one sample per block) plus a rendered PNG strip at ``out``; image tokens as a PNG grid."""
        out = Path(out)
        if self.levels == 256 and x.shape[-2] == 1:
            from simdiff.discrete.render import render_text_strip

            texts = decode_text(x)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".txt").write_text("".join(f"--- sample {i}\n{s}\n" for i, s in enumerate(texts)),
                                               encoding="utf-8")
            return render_text_strip(texts, out)
        from simdiff.images import save_grid

        return save_grid(x, out, scale=max(1, 64 // x.shape[-1]))

    def preview(self, model: Any, sample_cfg: Any, *, shape: tuple[int, ...], num_classes: int, out: str | Path,
                num: int, device: Any = "cpu") -> Path:
        """The trainer's sample picture: ``num`` samples through ``generate``, saved by :meth:`save_samples`."""
        from simdiff.generate import generate

        x = generate(model, None, shape, sample_cfg, num=num, device=device, process=self)
        return self.save_samples(x, out)
