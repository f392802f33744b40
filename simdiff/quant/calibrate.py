"""Calibration sets: the denoiser inputs ``(z_t, logsnr, cond)`` whose activations set the quantisation ranges.

* "trajectory" (Q-Diffusion, Li et al. 2023, time step-aware calibration): inputs recorded along the float model's
  own sampling trajectories (a forward pre-hook on the denoiser during :func:`simdiff.generate.generate`), then the
  same number of examples taken from every step of the sampler's grid ("uniformly over steps"; the paper's counts
  and step interval are not verified here).
* "single": the same recording, but only one level of the grid: ``single_level`` in ``[0, 1]`` picks the step at
  that fraction of the way from the noisiest to the cleanest (default 0.5, the middle step).
* "data": real training images noised to random levels, ``t ~ U(0, 1)``, ``logsnr = schedule.logsnr(t)``,
  ``z = alpha x + sigma eps`` (isotropic VP only), with their own labels.

The recording batches every call the sampler makes (classifier-free guidance's joint conditional + null batch
included) and runs under ``torch.inference_mode()`` inside :func:`generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CALIBRATIONS", "CalibrationSet", "record_trajectories", "select_uniform_steps", "select_single_level",
           "noised_data_set"]

CALIBRATIONS = ("trajectory", "single", "data")


@dataclass
class CalibrationSet:
    """``z`` ``[N, C, H, W]``, ``logsnr`` ``[N]``, ``cond`` (each ``[N, ...]``), ``step`` ``[N]`` (grid level index,
    0 = noisiest; -1 for noised data), ``kind`` (how it was drawn)."""

    z: Tensor
    logsnr: Tensor
    cond: dict[str, Tensor]
    step: Tensor
    kind: str

    def __len__(self) -> int:
        return self.z.shape[0]

    def subset(self, idx: Tensor, kind: str | None = None) -> CalibrationSet:
        return CalibrationSet(self.z[idx], self.logsnr[idx], {k: v[idx] for k, v in self.cond.items()},
                              self.step[idx], kind or self.kind)

    def batches(self, batch_size: int):
        """Yield ``(z, logsnr, cond)`` batches in order."""
        for s in range(0, len(self), batch_size):
            yield self.z[s:s + batch_size], self.logsnr[s:s + batch_size], \
                {k: v[s:s + batch_size] for k, v in self.cond.items()}


def _batched(value: Any, b: int) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value)
    if t.dim() == 0:
        return t.expand(b).clone()
    return t.detach().clone()


def record_trajectories(model: nn.Module, schedule, shape: tuple[int, ...], sample_cfg, *, num: int,
                        labels: Tensor | None = None, num_classes: int = 0, null_cond: dict | None = None,
                        process: Any = None, device: torch.device | str = "cpu") -> CalibrationSet:
    """Every denoiser input of ``num`` float-model sampling runs with ``sample_cfg`` (``kind="recorded"``).

    Rows are labelled with the rank of their log-SNR among the distinct levels the sampler visited (0 = noisiest).
    """
    from simdiff.generate import generate

    calls: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []

    def hook(_mod, args, kwargs):
        z, logsnr = args[0], (args[1] if len(args) > 1 else kwargs["logsnr"])
        b = z.shape[0]
        cond = {k: _batched(v, b) for k, v in kwargs.items() if k != "logsnr"}
        calls.append((z.detach().clone(), _batched(logsnr, b).float(), {k: v for k, v in cond.items()
                                                                          if v is not None}))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(model, schedule, shape, sample_cfg, num=num, labels=labels, num_classes=num_classes,
                 null_cond=null_cond, process=process, device=device)
    finally:
        handle.remove()
    if not calls:
        raise ValueError("the sampler made no denoiser calls; nothing to calibrate on")
    keys = set(calls[0][2])
    if any(set(c[2]) != keys for c in calls):
        raise ValueError("denoiser calls during sampling used different conditioning keys; cannot batch them")
    z = torch.cat([c[0] for c in calls]).cpu()
    logsnr = torch.cat([c[1] for c in calls]).cpu()
    cond = {k: torch.cat([c[2][k] for c in calls]).cpu() for k in keys}
    levels = torch.unique(logsnr)  # sorted ascending = noisiest first
    step = torch.searchsorted(levels, logsnr)
    return CalibrationSet(z, logsnr, cond, step, "recorded")


def select_uniform_steps(rec: CalibrationSet, n: int, *, seed: int = 0) -> CalibrationSet:
    """``n`` rows with (as nearly as possible) the same count from every recorded step (``kind="trajectory"``)."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.unique(rec.step)
    per = [n // len(steps) + (1 if i < n % len(steps) else 0) for i in range(len(steps))]
    picked = []
    for s, k in zip(steps.tolist(), per):
        rows = (rec.step == s).nonzero().squeeze(1)
        picked.append(rows[torch.randperm(rows.numel(), generator=gen)[:k]])
    return rec.subset(torch.cat(picked), "trajectory")


def select_single_level(rec: CalibrationSet, n: int, *, level: float = 0.5, seed: int = 0) -> CalibrationSet:
    """``n`` rows from the one recorded step at fraction ``level`` of the grid (0 noisiest, 1 cleanest)."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"single_level must be in [0, 1], got {level}")
    steps = torch.unique(rec.step)
    s = steps[round(level * (len(steps) - 1))]
    rows = (rec.step == s).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    idx = rows[torch.randperm(rows.numel(), generator=gen)[:n]]
    if idx.numel() < n:  # fewer recorded rows at that step than asked: repeat them
        idx = idx.repeat(-(-n // idx.numel()))[:n]
    return rec.subset(idx, "single")


def noised_data_set(images: Tensor, labels: Tensor | None, schedule, n: int, *, seed: int = 0,
                    num_classes: int = 0) -> CalibrationSet:
    """``n`` real ``images`` ``[M, C, H, W]`` in [-1, 1] noised at ``logsnr = schedule.logsnr(t)``, ``t ~ U(0, 1)``."""
    from simdiff.process import add_noise

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(images.shape[0], (n,), generator=gen)
    x = images[idx].float()
    t = torch.rand(n, generator=gen, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    logsnr = schedule.logsnr(t).float()
    z = add_noise(x, torch.randn(x.shape, generator=gen), logsnr=logsnr)
    cond = {"labels": labels[idx].long()} if labels is not None and num_classes > 0 else {}
    return CalibrationSet(z, logsnr, cond, torch.full((n,), -1), "data")

