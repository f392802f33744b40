"""DIRE: detecting generated images by their diffusion reconstruction error (Wang et al. 2023, ICCV).

An image ``x`` is inverted to noise with deterministic DDIM inversion ``I`` and regenerated with the same
deterministic sampler ``R``; the DIRE map is the element-wise absolute error ``|x - R(I(x))|``. The paper's premise:
images the diffusion model can generate (its own samples) are reconstructed closely, real images are not. (On MNIST
the shipped model shows the opposite order: real test digits reconstruct better than its samples; see
``benchmarks/detect.py``.) The paper trains a binary classifier (a ResNet-50) on DIRE maps; here a small CNN
(:class:`DIREClassifier`) fits 28x28 maps, and the training-free score is the map's mean (:func:`dire_score`, higher
= more real-looking, so a "generated" score is its negative).

Inversion and reconstruction are :func:`simdiff.invert.ddim_invert` and :func:`simdiff.invert.reconstruct` (DDIM,
first order by default) on the grid given, with the conditioning passed in; ``simdiff detect`` and the benchmark
pass the null class of a class-conditional model (the image's class is unknown). The paper's exact step count (its
reconstruction used DDIM with a small number of steps on ADM) and its input normalisation are not verified here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.invert import ddim_invert, reconstruct

__all__ = ["dire_maps", "dire_score", "DIREClassifier", "train_classifier", "classifier_scores",
           "save_classifier", "load_classifier"]

CLASSIFIER_FORMAT = "simdiff-dire-classifier-1"


def dire_maps(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: Any = None,
    order: int = 1,
    land_iters: int = 1,
    batch_size: int = 256,
) -> Tensor:
    """DIRE maps ``|x - R(I(x))|`` of images ``x [B, ...]`` (float, on the denoiser's device), in batches.

    Args:
        denoise: ``denoise(z, lam[B], **cond) -> DenoiserOutput``.
        grid: an increasing sampler grid ending at +inf (:func:`simdiff.samplers.make_grid`).
        cond: conditioning keywords, each ``[B, ...]`` (sliced per batch), e.g. ``{"labels": null labels}``.
        order, land_iters: of :func:`simdiff.invert.ddim_invert` (1, 1: plain DDIM inversion).

    Returns:
        ``[B, ...]`` non-negative maps, dtype of ``x``. Network calls per image: ``2 * steps`` (``land_iters = 1``).
    """
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"dire_maps: images must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"dire_maps: batch_size must be >= 1, got {batch_size}")
    out = []
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s: s + batch_size]
            cb = {k: v[s: s + batch_size] for k, v in (cond or {}).items()}
            z = ddim_invert(denoise, xb, grid, cond=cb, process=process, order=order, land_iters=land_iters)
            rec = reconstruct(denoise, z, grid, cond=cb, process=process, order=order)
            out.append((xb - rec.to(xb.dtype)).abs())
    return torch.cat(out).clone()


def dire_score(maps: Tensor) -> Tensor:
    """``[B]`` float64: the mean of each DIRE map (the training-free score; small for the model's own samples)."""
    return maps.reshape(maps.shape[0], -1).to(torch.float64).mean(1)


class DIREClassifier(nn.Module):
    """Small CNN: ``[B, C, H, W]`` map -> ``[B]`` logit (positive = generated).

    conv3x3(C->16)-SiLU-avgpool2 -> conv3x3(16->32)-SiLU-avgpool2 -> conv3x3(32->32)-SiLU -> adaptive avgpool to
    4x4 -> linear(512 -> 1). Inputs are multiplied by ``scale`` (set from the training maps so they are O(1)).
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.register_buffer("scale", torch.ones(()))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(32 * 16, 1)

    def forward(self, maps: Tensor) -> Tensor:
        if maps.dim() != 4 or maps.shape[1] != self.in_channels:
            raise ValueError(f"DIREClassifier expects [B, {self.in_channels}, H, W], got {tuple(maps.shape)}")
        return self.head(self.features(maps * self.scale).flatten(1)).squeeze(1)


def train_classifier(
    *,
    generated: Tensor,
    real: Tensor,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> DIREClassifier:
    """Fit a :class:`DIREClassifier` to tell ``generated`` maps (label 1) from ``real`` ones (label 0), both
    ``[N, C, H, W]``; Adam with cosine-annealed learning rate, binary cross-entropy, random horizontal flips off
    (digits are not flip-symmetric). Returns the network in eval mode."""
    if generated.dim() != 4 or real.dim() != 4 or generated.shape[1:] != real.shape[1:]:
        raise ValueError(f"train_classifier: maps must be [N, C, H, W] of one shape, got {tuple(generated.shape)} "
                         f"and {tuple(real.shape)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.cat([generated, real]).float().cpu()
    y = torch.cat([torch.ones(generated.shape[0]), torch.zeros(real.shape[0])])
    net = DIREClassifier(x.shape[1])
    net.scale.fill_(1.0 / max(float(x.abs().mean()), 1e-8))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * n_batches)
    loss_fn = nn.BCEWithLogitsLoss()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for b in range(n_batches):
            idx = perm[b * batch_size: (b + 1) * batch_size]
            loss = loss_fn(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def classifier_scores(net: DIREClassifier, maps: Tensor, *, batch_size: int = 512) -> Tensor:
    """``[B]`` float64 logits of ``net`` on ``maps`` (positive = generated)."""
    dev = net.scale.device
    with torch.inference_mode():
        out = [net(maps[s: s + batch_size].float().to(dev)).double().cpu() for s in range(0, maps.shape[0], batch_size)]
    return torch.cat(out)


def save_classifier(net: DIREClassifier, path: str | Path, *, info: dict[str, Any] | None = None) -> Path:
    """Write the classifier's weights and ``info`` (e.g. the grid it was trained with) to a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": CLASSIFIER_FORMAT, "in_channels": str(net.in_channels), "info": json.dumps(info or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path) -> tuple[DIREClassifier, dict[str, Any]]:
    """Read a :func:`save_classifier` file -> ``(classifier, info)``; a wrong file -> one-line ValueError."""
    from simdiff.train.checkpoint import CheckpointError, read_safetensors

    try:
        state, meta = read_safetensors(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a DIRE classifier file (metadata format={meta.get('format')!r})")
    net = DIREClassifier(int(meta.get("in_channels", "1")))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the DIRE classifier ({str(e).splitlines()[0]})") from None
    return net.eval().requires_grad_(False), json.loads(meta.get("info", "{}"))
