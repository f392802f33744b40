"""``simdiff unlearn``: fine-tune a copy of a run so that it forgets a concept.

    simdiff unlearn --method NAME --teacher RUN --forget FILE --retain FILE --run-dir OUT [--steps N]
        [--batch-size B] [--lr LR] [--anchor KEY] [--preserve W] [--eta ETA] [--pool-size N] [--config YAML]
        [--set key=value ...] [--device DEV] [--no-resume]

Methods: ``esd``, ``ascent``, ``graddiff``, ``salun``, ``ablation`` and their integrity-preserving ``_ip`` variants
(:mod:`simdiff.unlearn.losses`). FILE formats: :mod:`simdiff.unlearn.sets` (one prompt / class index per line, or
JSON). OUT is an ordinary run (``simdiff sample OUT``); rerunning the same command resumes it. Settings apply in the
order YAML (:class:`~simdiff.unlearn.run.UnlearnConfig` fields), ``--set``, then the explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from simdiff.configuration import ConfigError

__all__ = ["add_unlearn_parser", "cmd_unlearn", "unlearn_config_from_args", "main"]


def add_unlearn_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``unlearn`` sub-command to an ``argparse`` sub-parser set (its ``func`` is :func:`cmd_unlearn`)."""
    from simdiff.unlearn import METHODS

    p = subparsers.add_parser("unlearn", help="make a run forget a concept (prompts or class labels)",
                              description="Fine-tune a copy of a trained conditional model so that it forgets the "
                                          "concept of a forget set while keeping a retain set. Methods: "
                                          + ", ".join(METHODS) + ".")
    p.add_argument("--method", help="unlearning method (" + " | ".join(METHODS) + ")")
    p.add_argument("--teacher", help="the original run directory, checkpoint directory, exported .safetensors, or "
                   "pretrained-text (the shipped text-to-image model)")
    p.add_argument("--forget", help="forget set file (one prompt / class index per line, or JSON)")
    p.add_argument("--retain", help="retain set file (same formats)")
    p.add_argument("--run-dir", dest="run_dir", help="output run directory (default runs/unlearn_<method>)")
    p.add_argument("--config", help="YAML of UnlearnConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. pool_size=64")
    p.add_argument("--steps", type=int, help="optimiser steps (the update budget)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="forget (and retain) pairs per step")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--anchor", help="concept ablation's anchor (a prompt or class index; default: unconditional)")
    p.add_argument("--preserve", type=float, help="weight of the retain distillation term (default 1 for _ip)")
    p.add_argument("--eta", type=float, help="ESD's negative guidance strength (default 1)")
    p.add_argument("--pool-size", dest="pool_size", type=int, help="images the original draws per set")
    p.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help="refuse a run dir with checkpoints")
    p.set_defaults(func=cmd_unlearn)
    return p


def unlearn_config_from_args(args: argparse.Namespace):
    """YAML -> ``--set`` -> flags, validated (one-line ConfigError on a bad method, key or value)."""
    from simdiff.unlearn.run import load_unlearn_config

    sets = list(args.set or [])
    for name in ("method", "teacher", "forget", "retain", "anchor", "pool_size"):
        value = getattr(args, name, None)
        if value is not None:
            sets.append(f"{name}={json.dumps(value) if not isinstance(value, str) else _quote(value)}")
    for flag, key in (("steps", "train.steps"), ("batch_size", "train.batch_size"), ("lr", "train.optim.lr"),
                      ("device", "train.device"), ("preserve", "method_params.preserve"),
                      ("eta", "method_params.eta")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value) if not isinstance(value, str) else _quote(value)}")
    return load_unlearn_config(args.config, sets)


def _quote(text: str) -> str:
    """A string override that stays a string (YAML-quoted) whatever it looks like ("7", "true", "a: b")."""
    return json.dumps(text)


def cmd_unlearn(args: argparse.Namespace) -> int:
    """Run the unlearning; print a JSON summary."""
    from simdiff.shipped import resolve_source
    from simdiff.unlearn.run import unlearn

    cfg = unlearn_config_from_args(args)
    for what in ("teacher", "forget", "retain"):
        if not getattr(cfg, what):
            raise ConfigError(f"unlearn needs --{what}")
    cfg = dataclasses.replace(cfg, teacher=str(resolve_source(cfg.teacher)))  # "pretrained-text": the shipped file
    run_dir = Path(args.run_dir or f"runs/unlearn_{cfg.method}")
    summary = unlearn(cfg, run_dir, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m simdiff.unlearn.cli ...``: the ``unlearn`` command alone, with the CLI's one-line errors."""
    from simdiff.cli import _error, _Parser
    from simdiff.data import DataError
    from simdiff.train import CheckpointError, NonFiniteError

    parser = _Parser(prog="simdiff")
    sub = parser.add_subparsers(dest="command", required=True)
    add_unlearn_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, NonFiniteError, ValueError, FileNotFoundError) as e:
        return _error(e)


if __name__ == "__main__":
    import sys

    sys.exit(main())
