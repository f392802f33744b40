"""Command line of cascades: ``simdiff cascade train-sr | sample | pack`` and the ``simdiff sample CASCADE`` hook.

    simdiff cascade train-sr CONFIG [--run-dir DIR] [--set key=value ...] [--no-resume]
    simdiff cascade sample CASCADE [--num N] [--seed S] [--labels 1,2] [--aug-logsnr L|none] [--out F] [--strip]
    simdiff cascade pack CASCADE.yaml OUT.safetensors

CASCADE is a cascade YAML (``simdiff/configs/mnist_cascade.yaml``) or a one-file cascade written by ``pack``.
Errors are ``ConfigError`` / ``CheckpointError`` with one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from simdiff.configuration import ConfigError

__all__ = ["add_cascade_parser", "add_cascade_flags", "is_sr_config", "cmd_sample_cascade", "cmd_train_sr", "cmd_pack",
           "main"]


#: ``simdiff sample`` flags that a cascade takes per stage from its file (given on the command line: refused).
_STAGE_FLAGS = ("sampler", "steps", "grid", "guidance", "interval", "rescale", "eta", "batch_size")


def is_sr_config(path: str | Path) -> bool:
    """True for a YAML training config with an ``sr:`` section (``simdiff train`` hands it to
    :func:`cmd_train_sr`)."""
    from simdiff.configuration import load_yaml

    path = Path(path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        data = load_yaml(path)
    except ConfigError:
        return False
    return isinstance(data, dict) and "sr" in data


def _aug(text: str) -> float | None:
    if text.lower() in ("none", "null", "inf", "+inf"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'none', got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("must be a number or 'none', got nan")
    return value


def add_cascade_flags(p: argparse.ArgumentParser) -> None:
    """Flags ``simdiff sample`` needs for a cascade source besides its own (--num, --seed, --labels, --out,
    --out-dir, --device, --info): ``--aug-logsnr`` and ``--strip``."""
    p.add_argument("--aug-logsnr", dest="aug_logsnr", type=_aug, default=argparse.SUPPRESS,
                   help="cascade: noise-conditioning-augmentation log-SNR of every super-resolution stage "
                        "('none': no corruption; default: each stage's own)")
    p.add_argument("--strip", action="store_true",
                   help="cascade: write every stage's output (low-res rows upsampled) in one picture")


def cmd_sample_cascade(args: argparse.Namespace) -> int:
    """``simdiff sample CASCADE``: run the cascade and write a grid (or a stage strip with ``--strip``)."""
    from simdiff.devices import resolve_device
    from simdiff.images import check_output, save_grid, save_images

    from .cascade import load_cascade, sample_cascade

    given = [f"--{k.replace('_', '-')}" for k in _STAGE_FLAGS if getattr(args, k, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: a cascade samples each stage with the sampler, steps and guidance "
                          "of its stage in the cascade file; set them there")
    device = resolve_device(getattr(args, "device", "cpu") or "cpu", what="--device")
    out_dir = getattr(args, "out_dir", None)
    out = getattr(args, "out", None)
    if out_dir:
        check_output(out_dir, what="--out-dir", directory=True)
    if out or not out_dir:
        check_output(out or "samples.png", what="--out", image=True)
    num = getattr(args, "num", None)
    if num is not None and num < 1:
        raise ConfigError(f"--num must be >= 1, got {num}")
    cascade = load_cascade(args.source, device=device)
    if getattr(args, "info", False):
        print(json.dumps({"name": cascade.name, "stages": [
            {"kind": s.kind, "source": s.source, "image_shape": list(s.image_shape), "sampler": s.sample.sampler,
             "steps": s.sample.steps, "aug_logsnr": s.aug_logsnr} for s in cascade.stages]}))
        return 0
    labels = None
    text = getattr(args, "labels", None)
    n = cascade.num if num is None else num
    if text:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--labels must be comma-separated integers, got {text!r}") from None
        labels = torch.tensor(values).repeat((n + len(values) - 1) // len(values))[:n]
    aug = getattr(args, "aug_logsnr", "unset")
    kwargs = {} if aug == "unset" else {"aug_logsnr": aug}
    start = time.perf_counter()
    outs = sample_cascade(cascade, num=n, seed=getattr(args, "seed", None), labels=labels, device=device,
                          return_stages=True, progress=True, **kwargs)
    secs = time.perf_counter() - start
    final = outs[-1]
    if out_dir:
        save_images(final, out_dir)
        print(f"wrote {len(final)} images to {out_dir}")
    if out or not out_dir:
        path = Path(out or "samples.png")
        size = final.shape[-2:]
        if getattr(args, "strip", False):
            rows = [torch.nn.functional.interpolate(x, size=size, mode="nearest") for x in outs]
            save_grid(torch.cat(rows), path, nrow=n, scale=max(1, 64 // size[-1]))
            print(f"wrote a {len(outs)}-stage strip of {n} images to {path}")
        else:
            save_grid(final, path, scale=max(1, 64 // size[-1]))
            print(f"wrote grid of {n} images to {path}")
    print(f"cascade {cascade.name} ({' -> '.join(str(s.image_shape[-1]) for s in cascade.stages)}): "
          f"{n / secs:.2f} samples/s")
    return 0


def cmd_train_sr(args: argparse.Namespace) -> int:
    """``simdiff cascade train-sr CONFIG``: train a super-resolution model."""
    from .train import load_sr_config, train_sr

    cfg, sr = load_sr_config(args.config, args.set or [])
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    summary = train_sr(cfg, sr, run_dir, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """``simdiff cascade pack CASCADE OUT``: write the whole cascade to one safetensors file."""
    from .cascade import load_cascade, save_cascade

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; give the output file's path")
    path = save_cascade(load_cascade(args.source), out)
    print(f"wrote cascade to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_cascade_parser(sub) -> argparse.ArgumentParser:
    """Register ``simdiff cascade {train-sr, sample, pack}`` on the CLI's sub-parsers."""
    p = sub.add_parser("cascade", help="cascaded super-resolution: train an SR stage, sample or pack a cascade")
    inner = p.add_subparsers(dest="cascade_command", required=True)
    t = inner.add_parser("train-sr", help="train a super-resolution model from a YAML config with an sr: section")
    t.add_argument("config")
    t.add_argument("--run-dir", help="output directory (default runs/<name>)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. sr.aug_max=6")
    t.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    t.set_defaults(func=cmd_train_sr)
    s = inner.add_parser("sample", help="run a cascade (YAML or packed file)")
    s.add_argument("source")
    s.add_argument("--num", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--labels", help="comma-separated base-model class labels (cycled)")
    s.add_argument("--out", help="grid PNG path (default samples.png)")
    s.add_argument("--out-dir", help="also write individual PNGs here")
    s.add_argument("--device", default="auto")
    s.add_argument("--info", action="store_true", help="print the stages and exit")
    add_cascade_flags(s)
    s.set_defaults(func=cmd_sample_cascade)
    k = inner.add_parser("pack", help="write a cascade (its YAML) to one .safetensors file")
    k.add_argument("source")
    k.add_argument("out")
    k.set_defaults(func=cmd_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m simdiff.cascade ...`` (the same commands as ``simdiff cascade ...``)."""
    from simdiff.train import CheckpointError

    parser = argparse.ArgumentParser(prog="python -m simdiff.cascade")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cascade_parser(sub)
    args = parser.parse_args(["cascade", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"simdiff: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
