"""``simdiff tune-grid RUN``: fit robust step grids for a trained model and cache them with the run.

The grids are fitted by :func:`simdiff.samplers.tuned.fit_grids` (several inits, Adam through the sampler on a
calibration batch of starting noise, selection on a separate validation batch). The regression target is the same
sampler on the "auto" grid with ``--ref-steps`` steps from the same noise (a fine-grid solution of the PF-ODE; the
network is differentiable in its log-SNR input). Results go to ``RUN/tuned_grids.json``:

    {"<sampler>/<steps>/<guidance>": {"logsnrs": [...], "val_rmse": float, "ref_steps": int, "n_cal": int, ...}}

(+inf written as the string "inf"); :func:`load_tuned_grid` reads one back (JSON only, never a pickle).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from simdiff.samplers.tuned import fit_grids

__all__ = ["add_tune_grid_parser", "cmd_tune_grid", "grid_key", "load_tuned_grid", "save_tuned_grid"]

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


def save_tuned_grid(run_dir: str | Path, key: str, grid: Tensor, **info: object) -> Path:
    """Store ``grid`` (``[steps + 1]``, last +inf) under ``key`` in ``run_dir/tuned_grids.json``."""
    path = Path(run_dir) / FILE
    data = _read(path)
    data[key] = {"logsnrs": ["inf" if math.isinf(v) else v for v in grid.tolist()], **info}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_tune_grid)
    return p


def cmd_tune_grid(args: argparse.Namespace) -> int:
    """Fit and store the grids; prints one line per step count. Unconditional (guidance 0) models only here."""
    from simdiff.runs import load_model
    from simdiff.samplers import get_sampler, make_grid

    if min(args.steps) < 2 or args.n_cal < 2 or args.n_val < 1 or args.ref_steps < 2 * max(args.steps):
        raise ValueError("tune-grid: need --steps >= 2, --n-cal >= 2, --n-val >= 1 and --ref-steps >= 2 x steps")
    if args.n_cal == args.n_val:
        raise ValueError("tune-grid: --n-cal and --n-val must differ")
    loaded = load_model(args.run, device=args.device)
    if loaded.process is not None and not loaded.process.isotropic:
        raise ValueError("tune-grid: the run's process is not isotropic; tuned grids are log-SNR grids")
    model, schedule = loaded.model, loaded.schedule
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
        path = save_tuned_grid(args.run, grid_key(args.sampler, steps, 0.0), grid, val_rmse=val,
                               ref_steps=args.ref_steps, n_cal=args.n_cal, n_val=args.n_val, iters=args.iters)
        print(f"{args.sampler}, {steps} steps: validation RMSE {val:.4g} -> {path}")
    return 0
