"""Tiny model, synthetic data and loss for the trainer tests; also a CLI used by subprocess tests.

    python tests/scripts/tiny_train.py RUN_DIR STEPS [--ckpt-every K] [--sleep S] [--grad-accum A] [--batch B]

Runs :class:`simdiff.train.Trainer` (single process, or one rank under torchrun) with log_every=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

from simdiff.train import BatchIterator, OptimConfig, TrainConfig, Trainer


class TinyNet(nn.Module):
    """MLP with dropout (exercises the global torch RNG)."""

    def __init__(self, dim: int = 6, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_data(n: int = 64, dim: int = 6, seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, dim, generator=g) / dim**0.5
    return {"x": x, "y": torch.tanh(x @ w)}


def noisy_loss(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """Per-example MSE of model(x + 0.05 * noise) vs y; the noise comes from the trainer's generator."""
    noise = torch.randn(batch["x"].shape, generator=generator, device=batch["x"].device)
    pred = model(batch["x"] + 0.05 * noise)
    return (pred - batch["y"]).pow(2).mean(dim=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("steps", type=int)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet(dropout=a.dropout)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    data = BatchIterator(make_data(), a.batch, seed=7, rank=rank, world_size=world)

    def loss_fn(m, b, g):
        if a.sleep:
            time.sleep(a.sleep)
        return noisy_loss(m, b, g)

    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, grad_accum=a.grad_accum, seed=3,
                      optim=OptimConfig(lr=3e-3, warmup_steps=3, decay="cosine"), ema_half_life_images=100.0,
                      checkpoint_every=a.ckpt_every, keep_last=2, log_every=1, progress=False, device="cpu")
    out = Trainer(model, loss_fn, data, cfg, a.run_dir, config_dict={"model": "tiny"}).fit()
    print("done", out["step"], file=sys.stderr)


if __name__ == "__main__":
    main()
