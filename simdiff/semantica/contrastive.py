"""A small image encoder trained contrastively by simdiff (SimCLR, Chen et al. 2020), frozen for image conditioning.

:class:`ContrastiveNet`: three 3x3 conv layers (1 -> 32 -> 64 (stride 2) -> 128 (stride 2), ReLU, GroupNorm) give a
``[128, 7, 7]`` map (:meth:`ContrastiveNet.feature_map`); its spatial mean is the 128-d representation
(:meth:`ContrastiveNet.pool`). A two-layer projection head (128 -> 128 -> 64) is used only by the loss, as in
SimCLR, and is not shipped.

Training (:func:`train_contrastive`): two random affine views of each image (rotation up to 15 degrees, scale
0.85-1.15, translation up to 3 pixels, additive noise std 0.1), NT-Xent with temperature 0.2 over the ``2B`` views
(each view's positive is the other view of its image; the other ``2B - 2`` are negatives), AdamW. Only MNIST
training digits 0-6 are used and no labels, so digits 7-9 stay unseen by the encoder too. The weights are written
as float16 safetensors with the recipe in the metadata. Hyper-parameters are ours, not from SimCLR or Semantica.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContrastiveNet", "nt_xent", "augment", "train_contrastive", "save_contrastive", "load_contrastive",
           "WEIGHTS"]

WEIGHTS = Path(__file__).resolve().parent / "weights" / "contrastive_mnist.safetensors"


class ContrastiveNet(nn.Module):
    """``[B, 1, 28, 28]`` images in ``[-1, 1]`` -> ``[B, 128, 7, 7]`` feature map / ``[B, 128]`` representation."""

    width = 128

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.ReLU(),
        )  # fmt: skip

    def feature_map(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        return self.convs(x)

    @staticmethod
    def pool(fmap: Tensor) -> Tensor:
        return fmap.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.feature_map(images))


def augment(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """One random affine view per image (rotation <= 15 deg, scale 0.85-1.15, shift <= 3 px) plus N(0, 0.1^2)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(15)
    scale = 0.85 + 0.3 * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (3 / 14)  # normalised coordinates: 14 px = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # background -1
    return (out + 0.1 * torch.randn(out.shape, generator=generator)).clamp(-1, 1)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent loss of two views ``[B, D]`` (mean over the ``2B`` anchors)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def fit_contrastive(make_net, images: Tensor, views, *, steps: int, batch_size: int, lr: float = 2e-3,
                    seed: int = 0, temperature: float = 0.2, log_every: int = 100, name: str = "contrastive"):
    """SimCLR-style training of ``make_net()`` (a net with 128-d output) plus a projection head (128 -> 128 -> 64):
    NT-Xent between two ``views(x, generator=)`` of each batch drawn from ``images``; AdamW (weight decay 1e-4),
    linear warm-up over 5% of the steps then cosine decay. Returns the net in eval mode and the recipe (steps, batch,
    lr, seed, temperature, final loss, seconds)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = make_net()
    head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)].float()
        v1, v2 = views(x, generator=gen), views(x, generator=gen)
        loss = nt_xent(head(net(v1)), head(net(v2)), temperature=temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"[{name}] step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    recipe = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "temperature": temperature,
              "final_loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start, 1)}
    return net.eval(), recipe


def train_contrastive(images: Tensor, *, steps: int = 1500, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
                      log_every: int = 100) -> tuple[ContrastiveNet, dict[str, Any]]:
    """Train :class:`ContrastiveNet` (with a projection head) on ``images`` ``[N, 1, 28, 28]`` by
    :func:`fit_contrastive` on :func:`augment` views; returns the net in eval mode and the recipe."""
    return fit_contrastive(ContrastiveNet, images, augment, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                           log_every=log_every, name="contrastive")


def save_contrastive(net: ContrastiveNet, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``net``'s weights as float16 safetensors with ``meta`` (JSON values) in the header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"recipe": json.dumps(meta), "version": "1"})
    tmp.replace(path)
    return path


def load_frozen_net(net: torch.nn.Module, path: str | Path, *, name: str, recipe: str):
    """``net`` with the weights of the safetensors file ``path`` (written by :func:`save_contrastive`), as a frozen
    float32 module in eval mode, and the file's metadata (``version`` + the training recipe).

    Raises:
        ConfigError: the file is missing (the message names ``name`` and the ``recipe`` command that trains it).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from simdiff.configuration import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{name} encoder weights not found: {path} (train them with {recipe})")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    meta = {"version": header.get("version", "1"), **json.loads(header.get("recipe", "{}"))}
    return net.eval().requires_grad_(False), meta


def load_contrastive(path: str | Path = WEIGHTS) -> tuple[ContrastiveNet, dict[str, Any]]:
    """The frozen :class:`ContrastiveNet` (float32, eval, no grad) and its metadata from a safetensors file."""
    return load_frozen_net(ContrastiveNet(), path, name="contrastive",
                           recipe="python -m simdiff.semantica.contrastive")


def main() -> None:  # pragma: no cover - the shipped weights' recipe (about 10 minutes on one CPU thread)
    import argparse

    from simdiff.semantica.pairs import load_source

    p = argparse.ArgumentParser(description="train the contrastive MNIST encoder on digits 0-6 (no labels)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=str(WEIGHTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    raw = load_source("mnist", "train", classes=range(7))
    net, recipe = train_contrastive(raw.images, steps=args.steps, batch_size=args.batch_size)
    recipe["data"] = "MNIST train digits 0-6, no labels"
    print(save_contrastive(net, args.out, recipe), recipe)


if __name__ == "__main__":  # pragma: no cover
    main()
