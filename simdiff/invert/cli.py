"""``simdiff edit IMAGE ...``: invert real images with one class and re-generate them with another.

    simdiff edit IMAGE [IMAGE ...] --source-label 3 --target-label 8[,5,...] [--model SOURCE]
        [--method ddim|edict|nulltext|negprompt|ddpm|ode] [--steps N] [--strength S | --skip K] [--guidance W]
        [--order 1|2|3] [--lookahead] [--mixing P] [--seed N] [--device D] --out grid.png

SOURCE is what ``simdiff sample`` takes (a run, checkpoint, export or ``pretrained``, the shipped class-conditional
MNIST model, the default). The grid has one column per image: the inputs in the first row, then one row per target
label. A JSON summary (methods, network evaluations per image) is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from simdiff.configuration import ConfigError
from simdiff.invert.edict import DEFAULT_MIXING
from simdiff.invert.edit import METHODS

__all__ = ["add_edit_parser", "cmd_edit", "main"]


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``edit`` sub-command to an ``argparse`` sub-parser set (its ``func`` is :func:`cmd_edit`)."""
    p = subparsers.add_parser("edit", help="edit real images: invert with one class, re-generate with another",
                              description="Invert images with the source label and re-generate them with the target "
                                          "label(s); writes a before/after grid.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s), resized and cropped to the model's size")
    p.add_argument("--model", default="pretrained", help="run, checkpoint, export or 'pretrained' (default)")
    p.add_argument("--source-label", dest="source_label", type=int, required=True, help="class of the input images")
    p.add_argument("--target-label", dest="target_label", required=True,
                   help="class to edit to; comma-separated for several (one grid row each)")
    p.add_argument("--method", choices=METHODS, default="ddim", help="inversion method (default ddim)")
    p.add_argument("--steps", type=int, default=20, help="grid steps (default 20)")
    p.add_argument("--strength", type=float, default=1.0, help="fraction of the steps re-generated, in (0, 1]")
    p.add_argument("--skip", type=int, help="noisiest steps skipped (overrides --strength)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance weight w of the re-generation (default 2)")
    p.add_argument("--order", type=int, choices=(1, 2, 3), default=1, help="ddim: inversion order")
    p.add_argument("--lookahead", action="store_true",
                   help="ddim, negprompt: network at the level stepped to (better at few steps)")
    p.add_argument("--mixing", type=float, default=DEFAULT_MIXING, help="edict: mixing p in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="ddpm: seed of the noise draws")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--out", default="edit.png", help="grid PNG path (default edit.png)")
    p.set_defaults(func=cmd_edit)
    return p


def _targets(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--target-label must be integers separated by commas, got {text!r}") from None
    if not values:
        raise ConfigError("--target-label is empty")
    return values


def _check(args: argparse.Namespace) -> list[int]:
    """Every flag checked (by name) before the model is loaded."""
    targets = _targets(args.target_label)
    for path in args.images:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such image file")
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.skip is None and not 0.0 < args.strength <= 1.0:
        raise ConfigError(f"--strength must be in (0, 1], got {args.strength}")
    if args.skip is not None and not 0 <= args.skip < args.steps:
        raise ConfigError(f"--skip must be in [0, {args.steps - 1}] for --steps {args.steps}, got {args.skip}")
    if not 0.0 < args.mixing <= 1.0:
        raise ConfigError(f"--mixing must be in (0, 1], got {args.mixing}")
    if args.guidance < 0:
        raise ConfigError(f"--guidance must be >= 0, got {args.guidance}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {args.out}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out: {out.parent} is not a folder")
    return targets


def _model_path(source: str) -> Path:
    from simdiff.shipped import resolve_source

    return resolve_source(source)


def cmd_edit(args: argparse.Namespace) -> int:
    """Run ``simdiff edit``; returns the exit status (errors are raised as one-line ConfigError / ValueError)."""
    from simdiff.devices import resolve_device
    from simdiff.images import load_image, save_grid
    from simdiff.invert.edit import invert, regenerate
    from simdiff.runs import load_model

    targets = _check(args)
    device = resolve_device(args.device, what="--device")
    loaded = load_model(_model_path(args.model), device=device)
    c, h, w = loaded.image_shape
    if loaded.num_classes <= 0:
        raise ConfigError(f"{args.model}: the model is unconditional; editing by label needs a class-conditional one")
    for name, label in [("--source-label", args.source_label)] + [("--target-label", t) for t in targets]:
        if not 0 <= label < loaded.num_classes:
            raise ConfigError(f"{name} {label} is not a class of this model (0..{loaded.num_classes - 1})")
    if h != w:
        raise ConfigError(f"the model's images are {h}x{w}; editing supports square images")
    x = torch.stack([load_image(p, size=h, channels=c) for p in args.images]).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    inv = invert(loaded, x, cond=args.source_label, method=args.method, steps=args.steps, strength=args.strength,
                 skip=args.skip, guidance=args.guidance, order=args.order, mixing=args.mixing, generator=gen,
                 lookahead=args.lookahead)
    rows, nfe = [x], 0.0
    for t in targets:
        out, nfe = regenerate(loaded, inv, cond=t)
        rows.append(out.clamp(-1, 1))
    path = save_grid(torch.cat(rows).float().cpu(), args.out, nrow=len(args.images), scale=max(1, 64 // w))
    print(json.dumps({"out": str(path), "method": args.method, "source_label": args.source_label,
                      "target_labels": targets, "steps": args.steps, "grid_levels": int(inv.grid.shape[0]),
                      "nfe_inversion": inv.nfe, "nfe_generation": nfe}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m simdiff.invert.cli edit ...``: the sub-command on its own, with the CLI's error convention (one
    line on stderr, exit status 2)."""
    parser = argparse.ArgumentParser(prog="simdiff")
    add_edit_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from simdiff.train import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"simdiff: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
