"""Prompts -> samples for text-conditioned models: conditioning, guided sampling, grids, the CLI and evaluation.

``simdiff sample RUN --prompt "a thick 7 on the left" --prompt "a small 2" --per-prompt 8 --guidance 2
--interval -2 4 --rescale 0.5`` draws one grid row per prompt. Classifier-free guidance
(:func:`simdiff.guidance.classifier_free_guidance`, with its interval and rescale) uses the empty prompt's token
states and mask as the unconditional input (:attr:`simdiff.text.MiniLMText.null_cond`), the caption the model was
trained on for its unconditional mode. The text encoder is the one the run recorded (``meta["conditioner"]``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.text import MODEL_NAME, MiniLMText, load_text_encoder

__all__ = ["DEFAULT_PROMPTS", "conditioner_from_meta", "prompt_conditioning", "sample_prompts", "save_prompt_grid",
           "text_sample_grid", "grid_sampler", "sample_command", "add_prompt_flags", "evaluate_text_model",
           "is_text_run"]

#: prompts of the training-time sample grids (one row each).
DEFAULT_PROMPTS = ("a 0", "a thick 1 on the left", "a thin slanted 2", "a large 3 on the right", "a faint 4",
                   "a small 5 on the left, a large 6 on the right", "a thick upright 7", "an 8, a thin 9")


def is_text_run(loaded) -> bool:
    """Whether a :class:`~simdiff.runs.LoadedModel` is text-conditioned."""
    return loaded.config.model.arch == "text_uvit"


def conditioner_from_meta(meta: dict[str, Any], *, device: str | torch.device = "cpu") -> MiniLMText:
    """The text encoder a run recorded (``meta["conditioner"]``, see :meth:`simdiff.text.MiniLMText.identity`)."""
    ident = meta.get("conditioner") or {}
    if ident.get("name") not in (None, MODEL_NAME):
        raise ConfigError(f"this model was trained with the text encoder {ident.get('name')!r}; only {MODEL_NAME} "
                          "is available")
    return load_text_encoder(int(ident.get("max_length", 32)), str(torch.device(device)))


def prompt_conditioning(encoder: MiniLMText, prompts: Sequence[str], *, per_prompt: int = 1) -> dict[str, Tensor]:
    """``{"context", "context_mask"}`` for each prompt repeated ``per_prompt`` times (prompt-major order)."""
    if not prompts:
        raise ConfigError("give at least one prompt")
    if per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1, got {per_prompt}")
    bad = [p for p in prompts if not isinstance(p, str) or "\n" in p]
    if bad:
        raise ConfigError(f"a prompt must be one line of text, got {bad[0]!r}")
    try:
        ctx, mask = encoder.lookup(list(prompts))
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from None
    return {"context": ctx.repeat_interleave(per_prompt, 0), "context_mask": mask.repeat_interleave(per_prompt, 0)}


def sample_prompts(loaded, prompts: Sequence[str], sample_cfg, *, per_prompt: int = 8,
                   device: str | torch.device = "cpu", encoder: MiniLMText | None = None, progress: bool = False,
                   logsnrs: Tensor | None = None) -> Tensor:
    """``per_prompt`` samples of each prompt from a loaded text model -> ``[P * per_prompt, C, H, W]`` in [-1, 1].

    Guidance (``sample_cfg.guidance``, ``interval``, ``rescale``) takes the empty prompt as the unconditional input.
    """
    from simdiff.generate import generate

    if encoder is None:
        encoder = conditioner_from_meta(loaded.meta, device=device)
    cond = prompt_conditioning(encoder, prompts, per_prompt=per_prompt)
    cfg = dataclasses.replace(sample_cfg, num=len(prompts) * per_prompt)
    return generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, cond=cond, conditioner=encoder,
                    device=device, process=loaded.process, progress=progress, logsnrs=logsnrs)


def save_prompt_grid(images: Tensor, out: str | Path, *, per_prompt: int) -> Path:
    """A PNG grid with one row per prompt."""
    from simdiff.images import save_grid

    return save_grid(images, out, nrow=per_prompt, scale=max(1, 64 // images.shape[-1]))


def text_sample_grid(model, schedule, sample_cfg, *, image_shape, out: str | Path, encoder: MiniLMText,
                     device: torch.device | str = "cpu", process=None,
                     prompts: Sequence[str] = DEFAULT_PROMPTS) -> Path:
    """The training run's sample grid for a text model: ``sample_cfg.num // len(prompts)`` samples (at least 1) of
    each prompt, one row per prompt (the counterpart of :func:`simdiff.runs.sample_grid`)."""
    from simdiff.generate import generate

    per = max(1, sample_cfg.num // len(prompts))
    cond = prompt_conditioning(encoder, prompts, per_prompt=per)
    cfg = dataclasses.replace(sample_cfg, num=per * len(prompts))
    x = generate(model, schedule, tuple(image_shape), cfg, cond=cond, conditioner=encoder, device=device,
                 process=process)
    return save_prompt_grid(x, out, per_prompt=per)


def grid_sampler(encoder: MiniLMText, prompts: Sequence[str] = DEFAULT_PROMPTS):
    """A drop-in for :func:`simdiff.runs.sample_grid` (same signature) that draws prompt rows with ``encoder``."""

    def grid(model, schedule, sample_cfg, *, image_shape, num_classes=0, out, num=None, device="cpu", process=None):
        cfg = sample_cfg if num is None else dataclasses.replace(sample_cfg, num=num)
        return text_sample_grid(model, schedule, cfg, image_shape=image_shape, out=out, encoder=encoder,
                                device=device, process=process, prompts=prompts)

    return grid


def add_prompt_flags(p) -> None:
    """``--prompt`` (repeatable) and ``--per-prompt`` for ``simdiff sample``."""
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text prompt for a text-conditioned model (repeat for several; one grid row each)")
    p.add_argument("--per-prompt", dest="per_prompt", type=int, default=None,
                   help="samples per prompt (default: --num divided among the prompts, at least 1)")


def sample_command(args, loaded, scfg, *, device, logsnrs: Tensor | None = None) -> int:
    """``simdiff sample`` for a text model (or with ``--prompt``): one grid row per prompt, guidance on text.

    Without ``--prompt`` the :data:`DEFAULT_PROMPTS` are drawn. Refused with one line: ``--prompt`` on a model
    that is not text-conditioned, ``--labels`` on a text model.
    """
    from simdiff.images import save_images

    prompts = list(getattr(args, "prompt", None) or [])
    if not is_text_run(loaded):
        raise ConfigError(f"--prompt needs a text-conditioned model (model.arch text_uvit); this one is "
                          f"{loaded.config.model.arch!r}")
    if getattr(args, "labels", None):
        raise ConfigError("--labels does not apply to a text-conditioned model; use --prompt")
    prompts = prompts or list(DEFAULT_PROMPTS)
    per = getattr(args, "per_prompt", None)
    per = max(1, scfg.num // len(prompts)) if per is None else per
    start = time.perf_counter()
    x = sample_prompts(loaded, prompts, scfg, per_prompt=per, device=device, progress=True, logsnrs=logsnrs)
    secs = time.perf_counter() - start
    if getattr(args, "out_dir", None):
        save_images(x, args.out_dir)
        print(f"wrote {len(x)} images to {args.out_dir}")
    if getattr(args, "out", None) or not getattr(args, "out_dir", None):
        out = save_prompt_grid(x, Path(args.out or "samples.png"), per_prompt=per)
        print(f"wrote grid of {len(prompts)} prompts x {per} samples to {out}")
    print(f"{scfg.sampler}, {scfg.steps} steps, guidance {scfg.guidance}: {len(x) / secs:.1f} samples/s")
    return 0


def evaluate_text_model(loaded, sample_cfg, *, num: int = 1000, metrics: Sequence[str] = ("fid", "kid"),
                        device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """Sample the first caption of each of ``num`` test images and score: FID / KID (and other image metrics of
    :func:`simdiff.eval.evaluate_samples`) against those images, plus prompt adherence
    (:func:`simdiff.eval.prompts.prompt_adherence` with the training split's thresholds)."""
    from simdiff.data.captions import caption_thresholds, captioned
    from simdiff.data.transforms import uint8_to_float
    from simdiff.eval import evaluate_samples
    from simdiff.eval.prompts import prompt_adherence

    data_cfg = dataclasses.replace(loaded.config.data, split="test", limit=num, hflip=False)
    d = captioned(data_cfg)
    prompts = [per[0] for per in d["captions"]]
    ref = uint8_to_float(torch.from_numpy(d["images"])[:, None])
    x = sample_prompts(loaded, prompts, sample_cfg, per_prompt=1, device=device, progress=progress)
    scores = prompt_adherence(x, prompts, caption_thresholds(data_cfg))
    if metrics:
        key = f"{data_cfg.name}-test-{len(ref)}"
        scores.update(evaluate_samples(x, ref, metrics=tuple(metrics), reference_key=key, progress=progress,
                                       device=device))
    return {k: v for k, v in scores.items() if not (isinstance(v, float) and math.isnan(v))}
