"""A small MLP denoiser for vector data (tests, benchmarks, toy distillation), and a tiny training loop.

``MLPDenoiser(z [B, D], logsnr [B], labels=None, guidance=None) -> DenoiserOutput``: the noise level enters as
Fourier features of the (clipped) log-SNR plus ``alpha``/``sigma``; an optional class embedding (``num_classes + 1``
rows, the last = null label) and an optional Fourier embedding of the guidance weight ``w`` (Meng et al. 2023 embed
``w`` like the time) are added to the hidden state of a residual SiLU MLP. The raw output is read as ``pred``
("v" by default, as progressive distillation students in Salimans & Ho 2022) through ``process.to_output``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from simdiff.process import DenoiserOutput, add_noise, alpha_sigma, expand, to_output
from simdiff.schedules import Schedule

__all__ = ["MLPDenoiser", "fit_denoiser", "train_loop"]


class _Fourier(nn.Module):
    """Fixed sinusoidal features of a scalar ``[B] -> [B, 2 * n]`` at geometric frequencies."""

    def __init__(self, n: int, max_freq: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), n)), persistent=False)

    def forward(self, u: Tensor) -> Tensor:
        ang = u[:, None] * self.freqs.to(u.dtype)[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)


class MLPDenoiser(nn.Module):
    """Residual MLP denoiser for ``[B, D]`` data.

    Args:
        dim: data dimension ``D``.
        hidden: width; depth: number of residual blocks.
        pred: what the raw output means ("v", "x" or "eps").
        num_classes: enable class conditioning (``labels`` in ``{0..num_classes}``; ``num_classes`` = null).
        guidance: enable a guidance-weight input ``guidance`` ``[B]`` (w-conditioned students).
        logsnr_clip: the log-SNR is clipped to ``+-logsnr_clip`` for the embedding (``+-inf`` safe).
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 128,
        depth: int = 3,
        pred: str = "v",
        num_classes: int | None = None,
        guidance: bool = False,
        logsnr_clip: float = 20.0,
    ) -> None:
        super().__init__()
        if pred not in ("v", "x", "eps"):
            raise ValueError(f"unknown pred {pred!r}; valid: eps, v, x")
        self.dim, self.pred, self.logsnr_clip = dim, pred, logsnr_clip
        self.num_classes, self.use_guidance = num_classes, guidance
        self.t_feat = _Fourier(16, 8.0)
        self.t_emb = nn.Sequential(nn.Linear(32 + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        if guidance:
            self.w_feat = _Fourier(8, 4.0)
            self.w_emb = nn.Sequential(nn.Linear(16 + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(
        self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None, **_: object
    ) -> DenoiserOutput:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiser expects z of shape [B, {self.dim}], got {tuple(z.shape)}")
        b = z.shape[0]
        lam = torch.as_tensor(logsnr, dtype=z.dtype, device=z.device)
        lam = expand(lam, z[:, 0]).expand(b)
        lc = lam.clamp(-self.logsnr_clip, self.logsnr_clip)
        a, s = alpha_sigma(lam)
        emb = self.t_emb(torch.cat([self.t_feat(lc / self.logsnr_clip), a[:, None], s[:, None]], dim=1))
        if self.class_emb is not None:
            lab = torch.full((b,), self.num_classes, device=z.device) if labels is None else labels.reshape(b)
            emb = emb + self.class_emb(lab.long())
        if self.use_guidance:
            if guidance is None:
                raise ValueError("MLPDenoiser(guidance=True) needs a guidance=w [B] input")
            w = torch.as_tensor(guidance, dtype=z.dtype, device=z.device).reshape(-1).expand(b)
            emb = emb + self.w_emb(torch.cat([self.w_feat(w), w[:, None]], dim=1))
        h = self.inp(z)
        for blk in self.blocks:
            h = h + blk(torch.cat([h, emb], dim=1))
        return to_output(self.pred, self.out(h), z=z, logsnr=lam)


def fit_denoiser(
    net: nn.Module,
    teacher: Callable[..., DenoiserOutput],
    schedule: Schedule,
    sample_batch: Callable[[torch.Generator], dict[str, Tensor]],
    *,
    steps: int,
    lr: float = 2e-3,
    seed: int = 0,
) -> nn.Module:
    """Regress ``net`` onto a teacher denoiser's x-prediction (v-loss weight SNR + 1) at ``t ~ U[0, 1]``.

    Stands in for "initialise the student from the pretrained teacher" when the teacher is an analytic denoiser.
    ``sample_batch(generator) -> {"x": [B, D], optional cond}``; ``cond`` entries are passed to both.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        batch = sample_batch(g)
        x = batch["x"]
        cond = {k: v for k, v in batch.items() if k != "x"}
        t = torch.rand(x.shape[0], generator=g, dtype=torch.float64)
        lam = schedule.logsnr(t).to(x.dtype)
        z = add_noise(x, torch.randn(x.shape, generator=g, dtype=x.dtype), logsnr=lam)
        with torch.no_grad():
            target = teacher(z, lam, **cond).x.to(x.dtype)
        loss = ((net(z, lam, **cond).x - target).pow(2).mean(1) * (1 + lam.exp())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


def train_loop(
    loss_fn: Callable[..., Tensor],
    model: nn.Module,
    sample_batch: Callable[[torch.Generator], dict[str, Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    start_step: int = 0,
    grad_clip: float = 1.0,
) -> nn.Module:
    """Minimal trainer: Adam, cosine-annealed lr, ``loss_fn.set_step(step)`` each step (if it has one)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for i in range(steps):
        if hasattr(loss_fn, "set_step"):
            loss_fn.set_step(start_step + i)
        loss = loss_fn(model, sample_batch(g), g).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
    return model
