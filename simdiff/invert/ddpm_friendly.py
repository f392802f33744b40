"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli 2024, "An edit friendly DDPM noise
space: inversion and manipulations", CVPR; their Alg. 1).

Instead of one forward trajectory, draw the noisy images *independently*, ``z_i = alpha_i x + sigma_i eps_i`` with
fresh ``eps_i`` at every grid level, then extract the noise map that makes the ancestral (DDPM) sampler go from
``z_i`` to ``z_(i+1)``:

    n_i = (z_(i+1) - mu_i(z_i)) / std_i,       mu_i, std_i^2 = mean and variance of q(z_(i+1) | z_i, x = x_hat(z_i))

(posterior of :meth:`simdiff.processes.GaussianProcess.posterior`, "small" variance, per basis coordinate).
Sampling from ``z_0`` with these maps in place of fresh noise reproduces ``z_1, ..., z_M`` and the image exactly
(up to round-off) by construction, for any denoiser; with another condition it edits the image while the maps keep
its structure (the maps are not standard normal: they are correlated with the image, which is why they are
"edit friendly").

The last step of a simdiff grid lands on data at +inf, where the posterior variance is zero. It is handled here with
the scale of the forward transition from the last finite level (``sigma_M``, DDPM's "large" variance there):
``x = x_hat(z_M) + sigma_M n_M``. This is a choice made here (the paper's discrete schedule ends at a level with
``beta_1 > 0``), not taken from the paper.

``skip`` (the paper's ``T_skip``): run only the last ``M + 1 - skip`` steps, starting from ``z_skip``; pass the
shortened grid ``grid[skip:]``, as :func:`simdiff.invert.edit.invert` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from simdiff.invert.ddim import guided, split_grid
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import resolve_process

__all__ = ["DDPMInversion", "ddpm_invert", "ddpm_sample"]


@dataclass
class DDPMInversion:
    """The latent ``z_0`` at ``grid[0]`` ``[B, ...]`` and one noise map per step (``M`` finite steps, + 1 for the
    final step to +inf), each ``[B, ...]``."""

    latent: Tensor
    noises: list[Tensor]


class _Level:
    def __init__(self, lam: Tensor, like: Tensor, process) -> None:
        self.proc = resolve_process(process)
        self.lam = lam
        self.dev = lam.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
        self.like = like

    def alpha_sigma(self, i: int) -> tuple[Tensor, Tensor]:
        la, ls = self.proc.log_alpha_sigma(self.lam[i])
        fit = self.proc.fit
        return (fit(la.exp(), lam=self.lam[i], like=self.like).to(self.like),
                fit(ls.exp(), lam=self.lam[i], like=self.like).to(self.like))

    def posterior(self, u: Tensor, x_hat: Tensor, i: int) -> tuple[Tensor, Tensor]:
        mean, var = self.proc.posterior(z_t=u, x=self.proc.encode(x_hat), lam_s=self.dev[i + 1], lam_t=self.dev[i],
                                        variance="small", encoded=True)
        return mean, var.sqrt()


def ddpm_invert(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> DDPMInversion:
    """Edit-friendly DDPM inversion of ``x`` along ``grid`` (increasing, ending at +inf). ``M + 1`` network calls.

    Args:
        denoise: ``denoise(z, lam[B], **cond) -> DenoiserOutput``. x: ``[B, ...]`` images.
        cond, guidance, null_cond: the conditioning and guidance the sampler will use to reconstruct.
        process: the noising process (``None``: isotropic VP).
        generator: for the independent noise draws.

    Raises:
        ValueError: a grid that does not end at +inf.
    """
    lam, final_inf = split_grid(grid, name="ddpm_invert")
    if not final_inf:
        raise ValueError("ddpm_invert: the grid must end at +inf (the images are the data at the end)")
    den = guided(denoise, guidance, null_cond=null_cond, process=process)
    lv = _Level(lam, x, process)
    proc, cond, b = lv.proc, dict(cond or {}), x.shape[0]
    ux = proc.encode(x)
    us = []
    for i in range(lam.shape[0]):
        a, s = lv.alpha_sigma(i)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        us.append(a * ux + s * proc.encode(eps))
    noises = []
    for i in range(lam.shape[0]):
        x_hat = den(proc.decode(us[i]), lv.dev[i].expand(b), **cond).x.to(x.dtype)
        if i + 1 < lam.shape[0]:
            mean, std = lv.posterior(us[i], x_hat, i)
            noises.append(proc.decode((us[i + 1] - mean) / std))
        else:
            _, s = lv.alpha_sigma(i)
            noises.append(proc.decode((ux - proc.encode(x_hat)) / s))
    return DDPMInversion(latent=proc.decode(us[0]), noises=noises)


def ddpm_sample(
    denoise: Callable,
    inversion: DDPMInversion,
    grid: Tensor,
    *,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
    guidance: float | None = None,
    null_cond: dict[str, Any] | None = None,
) -> Tensor:
    """Ancestral sampling from ``inversion.latent`` with its noise maps (module docstring). With the conditioning
    and guidance of the inversion it returns the inverted images to round-off; with others it edits them.
    ``M + 1`` network calls."""
    lam, final_inf = split_grid(grid, name="ddpm_sample")
    if not final_inf or len(inversion.noises) != lam.shape[0]:
        raise ValueError(f"ddpm_sample: the grid ({lam.shape[0]} finite levels, final +inf: {final_inf}) does not "
                         f"match the inversion's {len(inversion.noises)} noise maps")
    den = guided(denoise, guidance, null_cond=null_cond, process=process)
    z = inversion.latent
    lv = _Level(lam, z, process)
    proc, cond, b = lv.proc, dict(cond or {}), z.shape[0]
    u = proc.encode(z)
    for i in range(lam.shape[0]):
        x_hat = den(proc.decode(u), lv.dev[i].expand(b), **cond).x.to(z.dtype)
        n = proc.encode(inversion.noises[i])
        if i + 1 < lam.shape[0]:
            mean, std = lv.posterior(u, x_hat, i)
            u = mean + std * n
        else:
            _, s = lv.alpha_sigma(i)
            u = proc.encode(x_hat) + s * n
    return proc.decode(u)
