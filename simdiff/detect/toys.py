"""The Gaussian-mixture toys of mode interpolation (Aithal et al. 2024): mixtures, a small trained denoiser, support.

The paper's 1-D toy is a few well-separated Gaussians on a line and its 2-D toy a square grid of Gaussians; a
small MLP trained with the denoising loss then samples points between the modes, where the data has (almost) no
mass. The exact positions, widths, grid size and training settings of the paper are not verified here; the
defaults below are chosen in the data range ``[-1, 1]`` with modes ``>= 10`` standard deviations apart.

A sample is *out of support* when it is more than ``radius`` standard deviations (Mahalanobis distance under the
component's diagonal covariance) from every component mean: at ``radius = 4`` in 1-D a sample of the mixture is
flagged with probability ``6e-5``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simdiff.process import add_noise
from simdiff.schedules import Schedule, get_schedule
from simdiff.toy import GaussianMixture
from simdiff.toy_nets import MLPDenoiser

__all__ = ["line_mixture", "grid_mixture", "support_distance", "out_of_support", "train_toy_denoiser"]


def line_mixture(num_modes: int = 3, *, std: float = 0.05, dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """1-D mixture of ``num_modes`` equal-weight Gaussians with means evenly spaced on ``[-1, 1]``."""
    if num_modes < 2:
        raise ValueError(f"line_mixture needs >= 2 modes, got {num_modes}")
    means = torch.linspace(-1.0, 1.0, num_modes, dtype=dtype)[:, None]
    return GaussianMixture(means, std**2)


def grid_mixture(side: int = 5, *, std: float = 0.03, dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """2-D mixture of ``side x side`` equal-weight Gaussians on a square grid spanning ``[-1, 1]^2``."""
    if side < 2:
        raise ValueError(f"grid_mixture needs side >= 2, got {side}")
    axis = torch.linspace(-1.0, 1.0, side, dtype=dtype)
    means = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return GaussianMixture(means, std**2)


def support_distance(mixture: GaussianMixture, x: Tensor) -> Tensor:
    """``[N]``: the smallest Mahalanobis distance of each point ``x [N, D]`` to a component of ``mixture``."""
    x = x.reshape(x.shape[0], -1).to(mixture.means.dtype)
    d2 = ((x[:, None, :] - mixture.means[None]) ** 2 / mixture.variances[None]).sum(-1)
    return d2.min(1).values.sqrt()


def out_of_support(mixture: GaussianMixture, x: Tensor, *, radius: float = 4.0) -> Tensor:
    """``[N]`` bool: points farther than ``radius`` standard deviations from every component (module doc)."""
    return support_distance(mixture, x) > radius


def train_toy_denoiser(
    mixture: GaussianMixture,
    *,
    steps: int = 800,
    hidden: int = 64,
    depth: int = 2,
    batch: int = 256,
    lr: float = 2e-3,
    num_data: int | None = None,
    schedule: Schedule | None = None,
    seed: int = 0,
) -> MLPDenoiser:
    """Train an :class:`~simdiff.toy_nets.MLPDenoiser` ("v" output) on samples of ``mixture`` with the denoising
    loss ``(1 + SNR) |x_hat - x|^2`` (the v-loss), ``t ~ U[0, 1]`` through ``schedule`` (cosine by default).

    Args:
        num_data: train on a fixed set of this many points (the paper's finite training set); ``None`` draws fresh
            points every step.

    Returns:
        the trained network in eval mode, float32, gradients off.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"train_toy_denoiser needs steps >= 1 and batch >= 1, got {steps}, {batch}")
    schedule = get_schedule("cosine") if schedule is None else schedule
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MLPDenoiser(mixture.dim, hidden=hidden, depth=depth)
    data = None if num_data is None else mixture.sample(num_data, generator=g)[0].float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        if data is None:
            x = mixture.sample(batch, generator=g)[0].float()
        else:
            x = data[torch.randint(data.shape[0], (batch,), generator=g)]
        lam = schedule.logsnr(torch.rand(batch, generator=g)).float()
        z = add_noise(x, torch.randn(x.shape, generator=g), logsnr=lam)
        loss = ((net(z, lam).x - x).pow(2).mean(1) * (1 + lam.exp())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)
