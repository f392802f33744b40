"""``simdiff tune-grid RUN``: fit robust step grids for a trained model and cache them with the run.

The grids are fitted by :func:`simdiff.samplers.tuned.fit_grids` (several inits, Adam through the sampler on a
calibration batch of starting noise, selection on a separate validation batch). The regression target is the same
sampler on the "auto" grid with ``--ref-steps`` steps from the same noise (a fine-grid solution of the PF-ODE; the
network is differentiable in its log-SNR input). Results go to ``RUN/tuned_grids.json``:

    {"<sampler>/<steps>/<guidance>": {"logsnrs": [...], "val_rmse": float, "ref_steps": int, "n_cal": int, ...}}

(+inf written as the string "inf"); :func:`load_tuned_grid` reads one back (JSON only, never a pickle). The same
file holds the "calibrated" grid's fitted logistic under ``"calibration/<guidance>"``
(:mod:`simdiff.samplers.calibrate`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.samplers.tuned import fit_grids

__all__ = ["add_tune_grid_parser", "cmd_tune_grid", "grid_key", "load_tuned_grid", "save_entry", "save_tuned_grid",
           "tuned_grid_for"]

FILE = "tuned_grids.json"


def grid_key(sampler: str, steps: int, guidance: float) -> str:
    """The cache key ``"<sampler>/<steps>/<guidance>"``."""
    return f"{sampler}/{int(steps)}/{float(guidance):g}"


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of tuned grids")
    return data


def save_entry(path: str | Path, key: str, entry: dict) -> Path:
    """Set ``key`` to ``entry`` (JSON-serialisable) in the grids file ``path``, keeping its other entries (atomic)."""
    from simdiff.train.rundir import atomic_write_bytes

    path = Path(path)
    data = _read(path)
    data[key] = entry
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


def save_tuned_grid(run_dir: str | Path, key: str, grid: Tensor, **info: object) -> Path:
    """Store ``grid`` (``[steps + 1]``, last +inf) under ``key`` in ``run_dir/tuned_grids.json`` (atomically)."""
    return save_entry(Path(run_dir) / FILE, key,
                      {"logsnrs": ["inf" if math.isinf(v) else v for v in grid.tolist()], **info})


def tuned_grid_for(source: str | Path, sampler: str, steps: int, guidance: float) -> Tensor:
    """The grid ``simdiff tune-grid`` stored for ``(sampler, steps, guidance)`` in run directory ``source``.

    Raises:
        ConfigError: ``source`` is not a run directory with that grid (the message lists the grids it has and the
            command that fits the missing one), or the stored entry is malformed.
    """
    from simdiff.configuration import ConfigError

    run = Path(source)
    if not run.is_dir():
        raise ConfigError(f"--grid tuned reads the grids `simdiff tune-grid` stored in a run directory; {run} is not "
                          "one")
    key = grid_key(sampler, steps, guidance)
    try:
        grid = load_tuned_grid(run, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if grid is None:
        have = sorted(k for k in _read(run / FILE) if not k.startswith("calibration/"))
        raise ConfigError(f"{run}: no tuned grid for {key} (has: {', '.join(have) or 'none'}); fit it with: simdiff "
                          f"tune-grid {run} --sampler {sampler} --steps {steps} --guidance {guidance:g}")
    return grid


def load_tuned_grid(run_dir: str | Path, key: str) -> Tensor | None:
    """The grid stored under ``key`` (float64, strictly increasing, last +inf), or ``None`` if there is none.

    Raises:
        ValueError: the file or the entry is malformed.
    """
    entry = _read(Path(run_dir) / FILE).get(key)
    if entry is None:
        return None
    try:
        values = [math.inf if v == "inf" else float(v) for v in entry["logsnrs"]]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{Path(run_dir) / FILE}: entry {key!r} has no valid 'logsnrs' list") from None
    grid = torch.tensor(values, dtype=torch.float64)
    if grid.shape[0] < 2 or grid[-1] != math.inf or not bool((torch.diff(grid[:-1]) > 0).all()):
        raise ValueError(f"{Path(run_dir) / FILE}: entry {key!r} is not an increasing grid ending at inf")
    return grid


def add_tune_grid_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tune-grid RUN [--sampler S] [--steps N ...] [--n-cal K] [--n-val K] [--ref-steps R] ...``."""
    p = subparsers.add_parser("tune-grid", help="fit step grids for a trained run and store them in the run")
    p.add_argument("run", help="run directory")
    p.add_argument("--sampler", default="unipc", help="deterministic sampler to tune for (default unipc)")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 6, 8, 10], help="step counts (default 5 6 8 10)")
    p.add_argument("--n-cal", type=int, default=64, help="calibration noise batch (default 64)")
    p.add_argument("--n-val", type=int, default=32, help="validation noise batch (default 32)")
    p.add_argument("--ref-steps", type=int, default=200, help="steps of the reference solution (default 200)")
    p.add_argument("--iters", type=int, default=40, help="Adam iterations per fit (default 40)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight the grids are fitted for (class-conditional models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_tune_grid)
    return p


def _denoiser(loaded, guidance: float):
    """The denoiser the grids are fitted through: a class-conditional model gets the labels 0, 1, ... in turn
    (guided with weight ``guidance`` against the null class), an unconditional one is used as it is."""
    from simdiff.guidance import classifier_free_guidance
    from simdiff.runs import class_null_cond

    if loaded.num_classes == 0:
        if guidance != 0.0:
            raise ConfigError(f"tune-grid: --guidance {guidance:g} needs a class-conditional model")
        return loaded.model
    guided = loaded.model if guidance == 0.0 else classifier_free_guidance(
        loaded.model, weight=guidance, null_cond=class_null_cond(loaded.num_classes))

    def denoise(z: Tensor, lam: Tensor, **cond):
        labels = torch.arange(z.shape[0], device=z.device) % loaded.num_classes
        return guided(z, lam, labels=labels, **cond)

    return denoise


def cmd_tune_grid(args: argparse.Namespace) -> int:
    """Fit and store the grids; prints one line per step count."""
    from simdiff.runs import load_model
    from simdiff.samplers import SAMPLERS, get_sampler, make_grid

    if min(args.steps) < 2 or args.n_cal < 2 or args.n_val < 1 or args.ref_steps < 2 * max(args.steps):
        raise ConfigError("tune-grid: need --steps >= 2, --n-cal >= 2, --n-val >= 1 and --ref-steps >= 2 x steps")
    if args.sampler not in SAMPLERS:
        raise ConfigError(f"tune-grid: unknown sampler {args.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")
    if not math.isfinite(args.guidance):
        raise ConfigError(f"tune-grid: --guidance must be a finite number, got {args.guidance}")
    if not Path(args.run).is_dir():
        raise ConfigError(f"tune-grid: {args.run} is not a run directory (the grids are stored in it)")
    loaded = load_model(args.run, device=args.device)
    if loaded.process is not None and not loaded.process.isotropic:
        raise ConfigError("tune-grid: the run's process is not isotropic; tuned grids are log-SNR grids")
    model, schedule = _denoiser(loaded, args.guidance), loaded.schedule
    sampler = get_sampler(args.sampler)
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn((args.n_cal, *loaded.image_shape), generator=gen).to(args.device)
    zv = torch.randn((args.n_val, *loaded.image_shape), generator=gen).to(args.device)
    fine = make_grid(schedule, args.ref_steps, kind="auto")
    with torch.no_grad():
        ref, ref_v = sampler(model, z, fine), sampler(model, zv, fine)
    fits = fit_grids(model, args.sampler, schedule, args.steps, z=z, reference=ref, val_z=zv, val_reference=ref_v,
                     iters=args.iters)
    for steps, (grid, val) in fits.items():
        path = save_tuned_grid(args.run, grid_key(args.sampler, steps, args.guidance), grid, val_rmse=val,
                               ref_steps=args.ref_steps, n_cal=args.n_cal, n_val=args.n_val, iters=args.iters)
        print(f"{args.sampler}, {steps} steps: validation RMSE {val:.4g} -> {path}")
    return 0
