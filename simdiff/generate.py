"""Generation: noise -> sampler (over a denoiser, optionally guided) -> images.

One function, :func:`generate`, is what the CLI, the trainer's sample-grid hook, the evaluation and the
benchmarks call. It builds the step grid from the model's schedule, wraps the denoiser in classifier-free
guidance when asked, draws the starting noise from a seeded generator and runs the chosen sampler in
float32 (or float64) while the network may run in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from simdiff.guidance import classifier_free_guidance
from simdiff.samplers import get_sampler, make_grid
from simdiff.schedules import Schedule

__all__ = ["SampleConfig", "generate"]


@dataclass(frozen=True)
class SampleConfig:
    """How to sample. ``guidance`` uses the Ho & Salimans convention: 0 is plain conditional sampling.

    ``interval`` is a log-SNR range ``(lo, hi)`` where guidance is applied (guidance interval,
    Kynkäänniemi et al. 2024); ``None`` applies it everywhere.
    """

    sampler: str = "dpmpp_2m"
    steps: int = 50
    grid: str = "uniform_logsnr"
    guidance: float = 0.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    eta: float = 0.0
    num: int = 64
    seed: int = 0
    batch_size: int = 256


def _student_samplers() -> tuple[str, ...]:
    from simdiff.distill.experiment import STUDENT_SAMPLERS

    return STUDENT_SAMPLERS


def generate(
    denoise,
    schedule: Schedule,
    shape: tuple[int, ...],
    cfg: SampleConfig = SampleConfig(),
    *,
    num: int | None = None,
    labels: Tensor | None = None,
    num_classes: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Tensor:
    """Draw ``num`` samples of per-example ``shape`` (e.g. ``(1, 28, 28)``); returns ``[num, *shape]`` on CPU.

    Args:
        denoise: ``denoise(z, logsnr, **cond) -> DenoiserOutput``.
        schedule: the model's log-SNR schedule (defines the grid's range).
        labels: ``[num]`` class labels for a conditional model (``None``: unconditional / null class).
        num_classes: the model's class count; the null label for guidance is ``num_classes``.
    """
    num = cfg.num if num is None else num
    if labels is not None and labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")
    if cfg.guidance != 0.0 and num_classes == 0:
        raise ValueError("guidance needs a class-conditional model (this one has num_classes = 0)")
    # Distilled students: their own samplers (simdiff.distill.experiment) and, for guided students, w as an input.
    guidance_input = bool(getattr(denoise, "guidance_input", False))
    if cfg.sampler in _student_samplers():
        from simdiff.distill.experiment import student_sampler

        if cfg.sampler == "generator" and cfg.guidance != 0.0:
            raise ValueError("guidance is not available for a one-step generator student (sampler 'generator')")
        sampler = student_sampler(cfg.sampler, schedule, cfg.steps)
    else:
        sampler = get_sampler(cfg.sampler)
    logsnrs = make_grid(schedule, cfg.steps, kind=cfg.grid).to(device)
    if cfg.guidance != 0.0 and not guidance_input:
        denoise = classifier_free_guidance(
            denoise,
            weight=cfg.guidance,
            null_cond={"labels": num_classes},
            interval=cfg.interval,
            rescale=cfg.rescale,
        )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    extra = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    out = []
    starts = range(0, num, cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling ({cfg.sampler}, {cfg.steps} steps)", unit="batch")
    for start in starts:
        n = min(cfg.batch_size, num - start)
        z = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
        cond = {}
        if labels is not None:
            cond["labels"] = labels[start : start + n].to(device)
        if guidance_input:
            cond["guidance"] = torch.full((n,), float(cfg.guidance), device=device)
        noise_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
        x = sampler(denoise, z, logsnrs, generator=noise_gen, cond=cond, **extra)
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1, 1)
