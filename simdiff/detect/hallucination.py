"""Hallucination scores: the variance of the x-prediction over the last steps of a sampling run.

Aithal et al. 2024 ("Understanding Hallucinations in Diffusion Models through Mode Interpolation") observe that a
trained denoiser is a smooth approximation of a score that jumps between well-separated modes, so some samples
land between modes, outside the data's support ("mode interpolation"). Along such a sample's reverse trajectory the
predicted clean sample ``x_hat`` keeps moving late in sampling (the network hesitates between the modes), while
for samples that settle on a mode it is stable. Their score is the variance of ``x_hat`` over the last ``K``
steps; filtering samples whose score is high removes most hallucinations and few good samples.

Here the score of one sample is ``mean_d Var_k x_hat_k[d]``: the population variance over the last ``K``
x-predictions a sampler emits through its callback (one per grid point, the final landing included), averaged
over the sample's elements. Which steps the paper uses, whether it sums or averages over dimensions and which
variance estimator it uses are not verified against the paper; the ranking of samples by the score, which is what
filtering uses, does not depend on the averaging or the estimator.

:class:`TrajectoryVariance` is the sampler callback (a ring buffer of the last ``K`` predictions on the state's
device; no host synchronisation during sampling). :func:`scored_sample` runs any sampler with it;
:func:`generate_scored` samples a trained model exactly as :func:`simdiff.generate.generate` does and returns the
scores with the images. The Gaussian-mixture toys of the paper (1-D modes on a line, a 2-D grid), a small
trainer and the out-of-support test are in :mod:`simdiff.detect.toys`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["TrajectoryVariance", "scored_sample", "generate_scored"]


class TrajectoryVariance:
    """Sampler callback accumulating the last ``last`` x-predictions; :meth:`score` gives the per-sample variance.

    Args:
        last: ``K``, the number of final x-predictions used (>= 2). A run that emits fewer uses all of them.

    Use one instance per sampling run (or call :meth:`reset`).
    """

    def __init__(self, last: int = 10) -> None:
        if isinstance(last, bool) or int(last) != last or last < 2:
            raise ValueError(f"trajectory variance needs last >= 2 predictions, got {last!r}")
        self.last = int(last)
        self.reset()

    def reset(self) -> None:
        """Forget the predictions seen so far."""
        self.buffer: Tensor | None = None
        self.count = 0

    def __call__(self, info: dict) -> None:
        x = info["x"].detach()
        if self.buffer is None:
            self.buffer = torch.empty((self.last, *x.shape), dtype=torch.float64, device=x.device)
        elif self.buffer.shape[1:] != x.shape:
            raise ValueError(f"trajectory variance: prediction shape changed from {tuple(self.buffer.shape[1:])} "
                             f"to {tuple(x.shape)} (one instance per sampling run)")
        self.buffer[self.count % self.last] = x
        self.count += 1

    def score(self) -> Tensor:
        """``[B]`` float64: mean over elements of the variance over the kept predictions (0 for a constant one).

        Raises:
            ValueError: fewer than two predictions were seen.
        """
        if self.buffer is None or self.count < 2:
            raise ValueError(f"trajectory variance needs >= 2 x-predictions, saw {self.count}")
        kept = self.buffer[: min(self.count, self.last)]
        var = (kept - kept.mean(0, keepdim=True)).pow(2).mean(0)
        return var.reshape(var.shape[0], -1).mean(1)


def scored_sample(
    sampler: str | Callable,
    denoise: Callable,
    z: Tensor,
    grid: Tensor,
    *,
    last: int = 10,
    callback: Callable | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Run ``sampler`` (a name of :data:`simdiff.samplers.SAMPLERS` or a sampler callable) and score each sample.

    Args:
        denoise, z, grid: as for any sampler (``denoise(z, lam[B], **cond)``, ``z [B, ...]``, ``make_grid``).
        last: ``K`` of :class:`TrajectoryVariance`.
        callback: another per-step callback, called after the scorer.
        options: the sampler's keywords (``cond=``, ``process=``, ``generator=``, ``eta=`` ...).

    Returns:
        ``(samples [B, ...], scores [B] float64)``; higher scores are more suspicious.
    """
    from simdiff.samplers import get_sampler

    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    scorer = TrajectoryVariance(last)

    def both(info: dict) -> None:
        scorer(info)
        if callback is not None:
            callback(info)

    x = fn(denoise, z, grid, callback=both, **options)
    return x, scorer.score()


def generate_scored(
    denoise: Callable,
    schedule,
    shape: tuple[int, ...],
    cfg=None,
    *,
    num: int | None = None,
    labels: Tensor | None = None,
    num_classes: int = 0,
    null_cond: dict[str, Any] | None = None,
    process: Any = None,
    last: int = 10,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """:func:`simdiff.generate.generate` with trajectory-variance scores: the same noise draws, so the same images.

    Args:
        denoise, schedule, shape, cfg, num, labels, num_classes, null_cond, process, device, dtype: as for
            :func:`simdiff.generate.generate` (a diffusion denoiser; discrete processes and one-step generators have
            no trajectory and are refused).
        last: ``K`` of :class:`TrajectoryVariance`.

    Returns:
        ``(images [num, *shape] in [-1, 1] on CPU, scores [num] float64 on CPU)``.
    """
    from simdiff.configuration import ConfigError
    from simdiff.generate import SampleConfig, check_sample_config, gaussian_start_parts, resolve_grid, start_noise
    from simdiff.guidance import classifier_free_guidance
    from simdiff.processes import is_discrete
    from simdiff.samplers import check_process, get_sampler

    cfg = SampleConfig() if cfg is None else cfg
    check_sample_config(cfg)
    if is_discrete(process) or cfg.sampler == "generator":
        raise ConfigError("hallucination scores need a multi-step diffusion sampler (no discrete process or "
                          "one-step generator)")
    num = cfg.num if num is None else num
    if isinstance(num, bool) or int(num) != num or num < 1:
        raise ConfigError(f"num must be an integer >= 1, got {num!r}")
    if labels is not None and labels.shape[0] != num:
        raise ValueError(f"labels must be [{num}], got shape {tuple(labels.shape)}")
    sampler = get_sampler(cfg.sampler)
    check_process(cfg.sampler, process)
    raw = denoise
    if cfg.guidance != 0.0:
        null = null_cond if null_cond is not None else ({"labels": num_classes} if num_classes > 0 else None)
        if not null or labels is None:
            raise ValueError("guidance needs a class-conditional model and labels")
        denoise = classifier_free_guidance(denoise, weight=cfg.guidance, null_cond=null, interval=cfg.interval,
                                           rescale=cfg.rescale, process=process)
    per_example = {} if labels is None else {"labels": labels}
    moments, surrogate = gaussian_start_parts(raw, cfg, process=process, null=null if cfg.guidance != 0.0 else None)
    logsnrs = resolve_grid(denoise, raw, schedule, cfg, shape, per_example=per_example, process=process,
                           device=device, dtype=dtype, moments=moments)
    extra: dict[str, Any] = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    if process is not None:
        extra["process"] = process
    start_scaled = process is not None and not process.isotropic
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    images, scores = [], []
    with torch.inference_mode():
        for start in range(0, num, cfg.batch_size):
            n = min(cfg.batch_size, num - start)
            z = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
            if start_scaled:
                z = process.add_noise(torch.zeros_like(z), z, lam=logsnrs[0].to(device=device, dtype=dtype).expand(n))
            cond = {} if labels is None else {"labels": labels[start: start + n].to(device)}
            z = start_noise(surrogate, z, schedule, logsnrs, cond)
            noise_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
            x, s = scored_sample(sampler, denoise, z, logsnrs, last=last, generator=noise_gen, cond=cond, **extra)
            images.append(x.float().cpu())
            scores.append(s.cpu())
    return torch.cat(images).clamp(-1, 1).clone(), torch.cat(scores).clone()
