"""Null-text (null-condition) inversion and guided DDIM with per-step null conditioning.

Null-text inversion (Mokady, Hertz, Aberman, Pritch & Cohen-Or 2023, "Null-text inversion for editing real images
using guided diffusion models", Alg. 1): DDIM inversion with the conditional model (guidance off) gives a *pivot*
trajectory ``z*_0 .. z*_M`` that reconstructs the image unguided but drifts once guidance is on. Starting from
``z_0 = z*_0``, each guided step ``i`` (levels ``lam_i -> lam_(i+1)``) optimises the unconditional embedding
``e_i`` (initialised with ``e_(i-1)``) so that the guided DDIM step lands on the pivot:

    min_e  || DDIM_step(z_i, x_c + w (x_c - x_u(e))) - z*_(i+1) ||^2,    then  z_(i+1) = DDIM_step(z_i, ... e_i)

(the final step to +inf targets the image itself). Regenerating with the per-step ``e_i`` and the source
condition reconstructs the image with guidance on; with another condition it edits it. Optimiser settings follow
the authors' released code as remembered, not checked against it here: Adam, ``inner_steps = 10`` per step,
learning rate ``lr (1 - i / (2 M))`` (their ``0.01 (1 - i / 100)`` over 50 steps), early stop when the loss is
below ``1e-5 + i 2e-5``; the loss is the per-example mean squared error.

What is optimised (:class:`NullEmbedding`): a floating-point null conditioning (e.g. an empty-prompt ``context``
``[B, L, C]``) directly; for a class-conditional simdiff network (null label ``num_classes``) an offset added to the
null class row through the backbone's ``extra_emb`` input (:class:`simdiff.nets.conditioning.ConditionEmbedding`
adds it to the same sum as the label row), so the network itself is never modified. One embedding per example.

Negative-prompt inversion (Miyake et al. 2023, "Negative-prompt inversion: fast image inversion for editing with
text-guided diffusion models") is the optimisation-free approximation: the null conditioning is replaced by the
source condition, so guided reconstruction is the conditional DDIM reconstruction; see :mod:`simdiff.invert.edit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from simdiff.conditioners import null_conditioning
from simdiff.invert.ddim import invert_trajectory, split_grid
from simdiff.processes import GaussianProcess
from simdiff.samplers._common import resolve_process

__all__ = ["NullEmbedding", "NullTextInversion", "nulltext_invert", "nulltext_sample"]


class NullEmbedding:
    """The optimisable form of the unconditional conditioning of ``denoise`` for a batch (module docstring).

    Args:
        denoise: the denoiser (a :class:`simdiff.nets.DiffusionModel` for the class-row case).
        null_cond: keyword -> unconditional value (``None``: the null class row ``{"labels": num_classes}``).
        cond: the conditional keywords of the batch (shapes the unconditional ones).
        batch: ``B``.

    Raises:
        ValueError: no floating-point null conditioning and no class embedding to offset.
    """

    def __init__(self, denoise: Callable, null_cond: dict[str, Any] | None, *, cond: dict[str, Any], batch: int):
        n = getattr(denoise, "num_classes", None)
        if null_cond is None:
            if not isinstance(n, int) or n <= 0:
                raise ValueError("null-text inversion needs null_cond (the denoiser has no class count)")
            null_cond = {"labels": n}
        self.base = null_conditioning(cond, null_cond, batch=batch)
        self.key = next((k for k, v in self.base.items() if k in null_cond and torch.is_tensor(v)
                         and v.is_floating_point()), None)
        if self.key is not None:
            self._init = self.base[self.key].detach().clone()
            return
        table = getattr(getattr(getattr(denoise, "backbone", None), "cond", None), "label", None)
        if "labels" not in null_cond or not isinstance(table, torch.nn.Embedding):
            raise ValueError("null-text inversion: the null conditioning has no floating-point value to optimise and "
                             "the denoiser has no class embedding (backbone.cond.label) to offset")
        self.key = "extra_emb"
        self._init = torch.zeros(batch, table.weight.shape[1], dtype=table.weight.dtype, device=table.weight.device)

    def init(self) -> Tensor:
        """A fresh copy of the starting value (the network's own null conditioning; a zero offset)."""
        return self._init.clone()

    def cond(self, value: Tensor) -> dict[str, Any]:
        """The unconditional keywords with ``value`` in place."""
        return {**self.base, self.key: value}


@dataclass
class NullTextInversion:
    """Result of :func:`nulltext_invert`: the latent at ``grid[0]``, the per-step null values and the final
    per-step optimisation losses (one ``[B]`` per step)."""

    latent: Tensor
    nulls: list[Tensor]
    embedding: NullEmbedding
    losses: list[Tensor] = field(default_factory=list)
    nfe: int = 0


def _steps(lam: Tensor, final_inf: bool, like: Tensor, process) -> tuple[GaussianProcess, list]:
    proc = resolve_process(process)
    c_z, c_x, _ = proc.ddim_coefficients(lam, 0.0)
    coefs = []
    for i in range(lam.shape[0] - 1):
        coefs.append(tuple(proc.fit(c[i], lam=lam[0], like=like).to(device=like.device, dtype=like.dtype)
                           for c in (c_z, c_x)))
    if final_inf:
        coefs.append(None)  # the final step returns the x-prediction
    return proc, coefs


def _step(proc, coef, z: Tensor, x: Tensor) -> Tensor:
    if coef is None:
        return x
    return proc.decode(coef[0] * proc.encode(z) + coef[1] * proc.encode(x))


def nulltext_invert(
    denoise: Callable,
    x: Tensor,
    grid: Tensor,
    *,
    cond: dict[str, Any],
    guidance: float,
    null_cond: dict[str, Any] | None = None,
    process: GaussianProcess | None = None,
    inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    land_iters: int = 1,
) -> NullTextInversion:
    """Null-text inversion of ``x`` for guided DDIM at weight ``guidance`` along ``grid`` (module docstring).

    Args:
        denoise: ``denoise(z, lam[B], **cond) -> DenoiserOutput``; its parameters are not changed (gradients flow
            only into the null values).
        x: ``[B, ...]`` images. grid: increasing levels ending at +inf (or a finite level: then ``x`` is the latent
            there). cond: the source conditioning.
        guidance: the weight ``w`` the reconstruction / edit will use (simdiff convention, 0 = conditional).
        null_cond: unconditional keywords (default: the null class row). process: the noising process.
        inner_steps, lr, early_stop: optimiser settings (module docstring). land_iters: see
            :func:`simdiff.invert.ddim.ddim_invert`.

    Returns:
        :class:`NullTextInversion`; ``nfe`` counts network evaluations (a forward+backward counts once).
    """
    if int(inner_steps) != inner_steps or inner_steps < 0:
        raise ValueError(f"nulltext: inner_steps must be an integer >= 0, got {inner_steps!r}")
    lam, final_inf = split_grid(grid, name="nulltext_invert")
    with torch.no_grad():
        pivot = invert_trajectory(denoise, x, grid, cond=cond, process=process, land_iters=land_iters)
    targets = pivot[1:] + ([x] if final_inf else [])
    proc, coefs = _steps(lam, final_inf, x, process)
    emb = NullEmbedding(denoise, null_cond, cond=cond, batch=x.shape[0])
    lam_dev = lam.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    w, n = float(guidance), len(coefs)
    value, z = emb.init(), pivot[0].detach().clone()
    nulls, losses, nfe = [], [], (land_iters if final_inf else 0) + lam.shape[0] - 1
    dims = tuple(range(1, x.dim()))
    for i in range(n):
        level = lam_dev[i].expand(x.shape[0])
        with torch.no_grad():
            xc = denoise(z, level, **cond).x
        target = targets[i].detach()
        value = value.detach().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=lr * (1 - i / (2 * n)))
        loss = None
        for _ in range(int(inner_steps)):
            with torch.enable_grad():
                xu = denoise(z, level, **emb.cond(value)).x
                err = (_step(proc, coefs[i], z, xc + w * (xc - xu)) - target).pow(2).mean(dims)
                opt.zero_grad(set_to_none=True)
                err.sum().backward()
            opt.step()
            nfe += 1
            loss = err.detach()
            if float(loss.max()) < early_stop + i * 2e-5:
                break
        value = value.detach()
        with torch.no_grad():
            xu = denoise(z, level, **emb.cond(value)).x
            z = _step(proc, coefs[i], z, xc + w * (xc - xu))
        nfe += 2
        nulls.append(value.clone())
        losses.append(loss if loss is not None else (z - target).pow(2).mean(dims))
    return NullTextInversion(latent=pivot[0], nulls=nulls, embedding=emb, losses=losses, nfe=nfe)


def nulltext_sample(
    denoise: Callable,
    z: Tensor,
    grid: Tensor,
    *,
    cond: dict[str, Any],
    inversion: NullTextInversion,
    guidance: float,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Guided DDIM from ``z`` at ``grid[0]`` with the per-step null values of ``inversion`` and conditioning
    ``cond`` (the source one reconstructs, another edits). ``2 (M + 1)`` network calls."""
    lam, final_inf = split_grid(grid, name="nulltext_sample")
    proc, coefs = _steps(lam, final_inf, z, process)
    if len(coefs) != len(inversion.nulls):
        raise ValueError(f"nulltext_sample: the grid has {len(coefs)} steps, the inversion {len(inversion.nulls)}")
    lam_dev = lam.to(device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
    w = float(guidance)
    for i, coef in enumerate(coefs):
        level = lam_dev[i].expand(z.shape[0])
        xc = denoise(z, level, **cond).x
        xu = denoise(z, level, **inversion.embedding.cond(inversion.nulls[i])).x
        z = _step(proc, coef, z, xc + w * (xc - xu))
    return z
