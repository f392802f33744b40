"""Few-shot generation from conditioning images: the Python API and the command-line paths.

Semantica (Kumar, Houlsby & Hoogeboom 2024) generates images "of a data set" by conditioning each sample on one
image of that data set (no fine-tuning); few-shot FID is computed on such samples. Here the few-shot set is ``m``
images (a folder or a tensor) and ``mode`` says how samples use them:

* ``each`` (default; the paper's protocol): sample ``i`` is conditioned on image ``i mod m``;
* ``concat``: every sample attends to the tokens of all ``m`` images, concatenated (``m * L`` tokens);
* ``mean``: every sample is conditioned on the token-wise mean of the ``m`` images' tokens (a prototype).

``concat`` and ``mean`` are not from the paper (it conditions on one image); the model is trained with one
conditioning image, so both feed it an input it was not trained on -- ``concat`` changes the attention's token
count only, ``mean`` moves the tokens off the encoder's image manifold. Classifier-free guidance uses the zero
context as the unconditional input (:mod:`simdiff.semantica.encoders`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError

__all__ = ["MODES", "sample_conditioned", "load_condition_images", "sample_from_condition_images", "main",
           "semantica_sample_command", "add_condition_flags", "add_semantica_parser", "save_fewshot_grid"]

MODES = ("each", "concat", "mean")
#: ``simdiff sample`` flags passed on to the sample config as they are.
_PASSED = ("grid", "interval", "rescale", "eta", "batch_size")


def sample_conditioned(model, schedule, encoder, cond_images: Tensor, sample_cfg, *, per_condition: int,
                       image_shape: tuple[int, ...], device: torch.device | str = "cpu", mode: str = "each",
                       process: Any = None) -> Tensor:
    """``per_condition`` samples for each row of ``cond_images`` ``[m, k, C, H, W]`` (``k`` images per row, their
    tokens concatenated) -> ``[m * per_condition, C, H, W]`` (row-major: the samples of row 0 first).

    ``mode="mean"`` averages the ``k`` images' tokens instead of concatenating them. The starting noise comes from
    ``sample_cfg.seed`` (the same seed gives the same images)."""
    from simdiff.generate import generate

    if cond_images.dim() != 5:
        raise ValueError(f"cond_images must be [m, k, C, H, W], got shape {tuple(cond_images.shape)}")
    m, k = cond_images.shape[:2]
    ctx = encoder.context(cond_images)  # [m, k * L, D]
    if mode == "mean":
        ctx = ctx.reshape(m, k, encoder.num_tokens, encoder.width).mean(1)
    ctx = ctx.repeat_interleave(per_condition, 0)
    return generate(model, schedule, tuple(image_shape), sample_cfg, num=m * per_condition, cond={"context": ctx},
                    null_cond=dict(encoder.null_cond), device=device, process=process)


def load_condition_images(source: str | Path | Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """Conditioning images ``[m, C, H, W]`` in ``[-1, 1]`` at the model's shape: a tensor ``[m, C', H', W']`` (or
    one image ``[C', H', W']``) or every image file under a folder; other sizes are resized (antialiased
    bilinear; folders: shorter side and centre crop) and grey / RGB converted to the model's channels."""
    from simdiff.data.transforms import convert_channels, resize_images

    c, h, w = image_shape
    if torch.is_tensor(source):
        x = source.detach().float().cpu()
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"condition images must be [m, 1 or 3, H, W], got shape {tuple(source.shape)}")
        if x.numel() and (x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6):
            raise ConfigError("condition images must lie in [-1, 1]")
        x = convert_channels(x, c)
        if tuple(x.shape[-2:]) != (h, w):
            x = resize_images(x, (h, w))
        return x
    from simdiff.data.folder import load_folder
    from simdiff.data.transforms import uint8_to_float

    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"--condition-images {path}: not a folder of images")
    if h != w:
        raise ConfigError(f"condition images from a folder need a square model, this one is {h}x{w}")
    data = load_folder(path, size=h, channels=c)
    return uint8_to_float(data.images)


def sample_from_condition_images(run, images: str | Path | Tensor, n: int, guidance: float | None = None, *,
                                 mode: str = "each", seed: int | None = None, steps: int | None = None,
                                 sampler: str | None = None, device: torch.device | str = "cpu",
                                 options: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """``n`` new images from a few conditioning images, with no fine-tuning.

    Args:
        run: a run directory, checkpoint or export of a pairs model, or a loaded model
            (:class:`simdiff.runs.LoadedModel`).
        images: a folder of images or a ``[m, C, H, W]`` tensor in ``[-1, 1]``.
        n: samples to draw. guidance: classifier-free guidance weight (0: conditional only; ``None``: the run's
            ``sample.guidance``).
        mode: ``each`` | ``concat`` | ``mean`` (module docstring). seed: seeds the starting noise (``None``: the
            run's ``sample.seed``).
        steps, sampler: override the run's ``sample`` section.
        options: further ``SampleConfig`` fields (e.g. ``{"rescale": 0.5, "grid": "uniform_logsnr"}``).

    Returns:
        ``(samples [n, C, H, W], condition images [m, C, H, W])``; with ``each`` sample ``i`` used image ``i % m``.
    """
    import dataclasses

    from simdiff.generate import check_sample_config
    from simdiff.runs import LoadedModel, load_model
    from simdiff.semantica.train import encoder_for_config, is_semantica_config

    if mode not in MODES:
        raise ConfigError(f"condition mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of samples must be a positive integer, got {n!r}")
    loaded = run if isinstance(run, LoadedModel) else load_model(run, device=device)
    if not is_semantica_config(loaded.config):
        raise ConfigError("--condition-images needs an image-conditioned model (trained with data.name: pairs)")
    encoder = encoder_for_config(loaded.config)
    cond = load_condition_images(images, tuple(loaded.image_shape))
    if len(cond) == 0:
        raise ConfigError("no condition images given")
    changes: dict[str, Any] = {**(options or {}), "num": n}
    if guidance is not None:
        changes["guidance"] = float(guidance)
    if seed is not None:
        changes["seed"] = int(seed)
    if steps is not None:
        changes["steps"] = steps
    if sampler is not None:
        changes["sampler"] = sampler
    scfg = check_sample_config(dataclasses.replace(loaded.config.sample, **changes), where="sampling")
    common = dict(image_shape=tuple(loaded.image_shape), device=device, process=loaded.process)
    if mode == "each":
        order = torch.arange(n) % len(cond)
        x = sample_conditioned(loaded.model, loaded.schedule, encoder, cond[order][:, None], scfg, per_condition=1,
                               **common)
    else:
        x = sample_conditioned(loaded.model, loaded.schedule, encoder, cond[None], scfg, per_condition=n,
                               mode=mode, **common)
    return x, cond


def save_fewshot_grid(samples: Tensor, cond: Tensor, out: str | Path, *, per_row: int = 8) -> Path:
    """One PNG: the conditioning images on the first row(s), a blank row, then the samples (``per_row`` wide)."""
    from simdiff.images import save_grid

    pad = (-len(cond)) % per_row
    blank = torch.full((pad + per_row, *cond.shape[1:]), -1.0)
    grid = torch.cat([cond, blank, samples])
    return save_grid(grid, out, nrow=per_row, scale=max(1, 64 // samples.shape[-1]))


def add_condition_flags(p: argparse.ArgumentParser) -> None:
    """``--condition-images DIR`` and ``--condition-mode`` (for ``simdiff sample``)."""
    p.add_argument("--condition-images", dest="condition_images", metavar="DIR",
                   help="image-conditioned model: generate new images from the images in DIR (few-shot, no "
                        "fine-tuning)")
    p.add_argument("--condition-mode", dest="condition_mode", choices=MODES, default="each",
                   help="each: sample i uses image i mod m (default); concat: every sample sees all images' tokens; "
                        "mean: their mean tokens")


def semantica_sample_command(args: argparse.Namespace) -> int:
    """``simdiff sample RUN --condition-images DIR [--num N] [--guidance W] [--seed S] [--steps K] [--sampler S]
    [--condition-mode each|concat|mean] [--out grid.png] [--out-dir DIR] [--device D]``."""
    from simdiff.devices import resolve_device
    from simdiff.images import check_output, save_images

    device = resolve_device(getattr(args, "device", "cpu") or "cpu", what="--device")
    out = Path(getattr(args, "out", None) or "samples.png")
    check_output(out, what="--out", image=True)
    if getattr(args, "out_dir", None):
        check_output(args.out_dir, what="--out-dir", directory=True)
    num = getattr(args, "num", None) or 16
    start = time.perf_counter()
    x, cond = sample_from_condition_images(
        args.source, args.condition_images, num, getattr(args, "guidance", None),
        mode=getattr(args, "condition_mode", "each") or "each", seed=getattr(args, "seed", None),
        steps=getattr(args, "steps", None), sampler=getattr(args, "sampler", None), device=device,
        options={k: (tuple(v) if k == "interval" else v) for k in _PASSED
                 if (v := getattr(args, k, None)) is not None})
    secs = time.perf_counter() - start
    if getattr(args, "out_dir", None):
        save_images(x, args.out_dir)
        print(f"wrote {len(x)} images to {args.out_dir}")
    path = save_fewshot_grid(x, cond, out)
    print(f"wrote {len(cond)} condition images and {len(x)} samples to {path} ({len(x) / secs:.1f} samples/s)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from simdiff.runs import load_config
    from simdiff.semantica.pairs import register
    from simdiff.semantica.train import is_semantica_config, train_semantica

    register()
    cfg = load_config(args.config, args.set or [])
    if not is_semantica_config(cfg):
        raise ConfigError(f"{args.config}: not an image-conditioned config (needs data.name: pairs)")
    summary = train_semantica(cfg, Path(args.run_dir or Path("runs") / cfg.name), resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from simdiff.semantica.metrics import fewshot_report

    report = fewshot_report(args.source, source=args.reference, classes=args.classes, shots=args.shots,
                            num=args.num, guidance=args.guidance, seed=args.seed, steps=args.steps)
    print(json.dumps(report, indent=1))
    return 0


def add_semantica_parser(sub) -> argparse.ArgumentParser:
    """``simdiff semantica train CONFIG | sample RUN --condition-images DIR | eval RUN``."""
    p = sub.add_parser("semantica", help="image-conditioned (Semantica-style) models: train, sample, few-shot eval")
    ss = p.add_subparsers(dest="semantica_command", required=True)
    t = ss.add_parser("train", help="train on image pairs (a config with data.name: pairs)")
    t.add_argument("config")
    t.add_argument("--run-dir")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    t.add_argument("--no-resume", action="store_true")
    t.set_defaults(func=_cmd_train)
    s = ss.add_parser("sample", help="new images from a few conditioning images")
    s.add_argument("source")
    add_condition_flags(s)
    for flag, kind in (("--num", int), ("--guidance", float), ("--seed", int), ("--steps", int)):
        s.add_argument(flag, type=kind)
    s.add_argument("--sampler")
    s.add_argument("--out")
    s.add_argument("--out-dir", dest="out_dir")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=lambda a: _require_images(a) or semantica_sample_command(a))
    e = ss.add_parser("eval", help="few-shot FD/KID, precision/recall and the copy check on held-out classes")
    e.add_argument("source")
    e.add_argument("--reference", default="mnist",
                   help="data set of the held-out images (mnist, fashion_mnist, animal_mnist, photos)")
    e.add_argument("--classes", type=lambda s: [int(v) for v in s.split(",")], default=[7, 8, 9])
    e.add_argument("--shots", type=int, default=5, help="conditioning images per class")
    e.add_argument("--num", type=int, default=200, help="samples per class")
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int)
    e.set_defaults(func=_cmd_eval)
    return p


def _require_images(args: argparse.Namespace) -> None:
    if not args.condition_images:
        raise ConfigError("simdiff semantica sample needs --condition-images DIR")


def main(argv: list[str] | None = None) -> int:
    """``python -m simdiff.semantica train | sample | eval ...`` (the same commands as ``simdiff semantica ...``)."""
    import sys

    from simdiff.data import DataError
    from simdiff.train import CheckpointError

    parser = argparse.ArgumentParser(prog="python -m simdiff.semantica")
    add_semantica_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["semantica", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, ValueError, FileNotFoundError) as e:
        print(f"simdiff: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
