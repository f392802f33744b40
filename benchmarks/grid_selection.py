"""Is a step grid picked per model from a family, by a pilot with a reference solution, a better default?

The "calibrated" default fits two numbers (a logistic's centre and scale in log-SNR) to a pilot run with no
reference solution. This benchmark measures the next richer, still cheap policy: per problem and step count, pick
from a fixed family of grids the one with the lowest RMSE on ``P`` pilot noises against a fine reference (UniPC on
192 uniform log-SNR steps, as a library could afford on a model), then report its RMSE on the benchmark's test
noise against the DOP853 solution, as a ratio to the best diffusers row of ``benchmarks/samplers.py``.

Family (per step count ``n``): the calibrated logistic with its centre moved by -3..+2, its scale times 0.6 / 1 /
1.6 and its end moved by -2..+4 (108 grids), plus the uniform_t, uniform_logsnr, edm and quadratic_t grids. The
sampler is the default (UniPC bh2, order 3). The problems, test noise (256 points, seed 21)
and calibration (its 16-point pilot, seed 0) are exactly those of ``benchmarks/samplers.py`` (the
selection noises are another draw, seed 1), whose results file gives the diffusers rows (run it
first, same ``--split``).

Run: ``python benchmarks/grid_selection.py [--split heldout|train] [--pilot 16 128]``; writes
``benchmarks/results/grid_selection.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samplers as bench  # noqa: E402
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, write_json, write_text  # noqa: E402

from simdiff.samplers import get_sampler, make_grid, solve_reference  # noqa: E402
from simdiff.samplers.calibrate import PILOT_SIZE, calibrate, calibrated_grid  # noqa: E402
from simdiff.samplers.policy import END_BASE, END_SLOPE, logistic_levels  # noqa: E402

F64 = torch.float64
CENTRE_MOVES = (-3, -2, -1, 0, 1, 2)
SCALE_FACTORS = (0.6, 1.0, 1.6)
END_MOVES = (-2, -1, 0, 1, 2, 4)
KINDS = ("uniform_t", "uniform_logsnr", "edm", "quadratic_t")
REFERENCE_STEPS = 192


def family(schedule: Any, n: int, mu: float, scale: float) -> list[tuple[str, Tensor]]:
    """The candidate grids for ``n`` calls around the calibration ``(mu, scale)`` (module doc)."""
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    inf = torch.tensor([math.inf], dtype=F64)
    out = []
    for dm, fs, de in itertools.product(CENTRE_MOVES, SCALE_FACTORS, END_MOVES):
        end = min(hi, END_BASE + END_SLOPE * n + de)
        if n >= 2 and end > lo:
            out.append((f"mu{dm:+d} s*{fs:g} end{de:+d}",
                        torch.cat([logistic_levels(lo, end, n, mu=mu + dm, scale=scale * fs), inf])))
    return out + [(k, make_grid(schedule, n, kind=k)) for k in KINDS]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--pilot", type=int, nargs="+", default=[16, 128], help="pilot noises used to pick the grid")
    p.add_argument("--nfe", type=int, nargs="+", default=list(bench.NFES))
    p.add_argument("--out", default="grid_selection")
    p.add_argument("--quick", action="store_true", help="smoke mode: one problem, 5 calls, 16 pilot noises")
    args = p.parse_args(argv)
    if args.quick:
        args.nfe, args.pilot, args.out = [5], [16], "grid_selection_quick"
    torch.set_num_threads(1)
    src = RESULTS_DIR / ("samplers.json" if args.split == "heldout" else "samplers_train.json")
    if not src.is_file():
        print(f"grid_selection: {src} is missing; run benchmarks/samplers.py --split {args.split} first",
              file=sys.stderr)
        raise SystemExit(2)
    best = {(r["mixture"], r["schedule"]): r for r in json.loads(src.read_text())["results"]}
    unipc = get_sampler("unipc")
    info, cmd, t0 = machine_info(), command_line(), time.time()
    results = []
    for name, gm, w in bench.mixtures(args.split)[: 1 if args.quick else None]:
        for sname in list(bench.SCHEDULES)[: 1 if args.quick else None]:
            schedule, _ = bench.SCHEDULES[sname]
            gen = torch.Generator().manual_seed(21)  # the test batch of benchmarks/samplers.py
            z = torch.randn(256, gm.dim, dtype=F64, generator=gen)
            den = gm.denoise if w is None else bench.guided(gm, torch.randint(0, gm.num_classes, (256,), generator=gen),
                                                             w)
            x_ref = solve_reference(den, z, logsnr_start=float(schedule.logsnr_min), logsnr_end=bench.LOGSNR_END,
                                    rtol=bench.TOL, atol=bench.TOL)
            res: dict[str, Any] = {"mixture": name, "schedule": sname, "cells": {}}
            pg = torch.Generator().manual_seed(0)  # the calibration pilot of benchmarks/samplers.py
            zc = torch.randn(PILOT_SIZE, gm.dim, dtype=F64, generator=pg)
            cal = calibrate(gm.denoise if w is None else bench.guided(
                gm, torch.randint(0, gm.num_classes, (PILOT_SIZE,), generator=pg), w), schedule, zc)
            for size in args.pilot:
                sg = torch.Generator().manual_seed(1)  # the selection noises (and labels): their own draw
                zs = torch.randn(size, gm.dim, dtype=F64, generator=sg)
                ds = gm.denoise if w is None else bench.guided(gm, torch.randint(0, gm.num_classes, (size,),
                                                                                 generator=sg), w)
                pref = unipc(ds, zs, make_grid(schedule, REFERENCE_STEPS, kind="uniform_logsnr"))
                for n in args.nfe:
                    bd = min(float(v[str(n)]["rmse"]) for k, v in best[(name, sname)]["rows"].items()
                             if k.startswith("diffusers"))
                    scored = [(bench.rmse(unipc(ds, zs, g), pref), label, g)
                              for label, g in family(schedule, n, cal.mu, cal.scale)]
                    pilot_err, label, g = min(scored, key=lambda c: c[0])
                    cell = res["cells"].setdefault(str(n), {"best_diffusers": bd,
                                                            "calibrated": bench.rmse(unipc(den, z, calibrated_grid(
                                                                schedule, n, cal)), x_ref) / bd})
                    cell[f"selected_{size}"] = bench.rmse(unipc(den, z, g), x_ref) / bd
                    cell[f"choice_{size}"] = label
            results.append(res)
            print(f"{name} / {sname}: " + " ".join(
                f"{n}:" + "/".join(f"{res['cells'][str(n)][f'selected_{s}']:.2f}" for s in args.pilot)
                + f"({res['cells'][str(n)]['calibrated']:.2f})" for n in args.nfe), flush=True)
    wall = time.time() - t0
    rows = []
    for key in ["calibrated"] + [f"selected_{s}" for s in args.pilot]:
        vals = {n: [r["cells"][str(n)][key] for r in results] for n in args.nfe}
        label = "calibrated (the default)" if key == "calibrated" else f"selected on {key[9:]} pilot noises"
        rows.append([f"{label}, geometric mean"] + [math.exp(sum(map(math.log, v)) / len(v)) for v in vals.values()])
        rows.append([f"{label}, worst"] + [max(v) for v in vals.values()])
        rows.append([f"{label}, cells > 1.0x"] + [sum(x > 1.0 for x in v) for v in vals.values()])
    md = [f"## A grid selected per problem from a family by a pilot with a reference ({args.split})", "",
          f"Run {info['date']} on {info['platform']} ({info['cpu_count']} CPUs shared, 1 torch thread), torch "
          f"{info['torch']}. Command: `{cmd}`. Wall-clock {wall / 60:.1f} min. Ratio of the test RMSE to the best "
          f"diffusers row of `{src.name}` per cell, {len(results)} problems.", "",
          table_markdown(["policy"] + [f"NFE {n}" for n in args.nfe], rows), ""]
    text = "\n".join(md)
    print(text)
    print("wrote", write_json(args.out, {"machine": info, "command": cmd, "wall_seconds": wall, "results": results}),
          "and", write_text(f"{args.out}.md", text))


if __name__ == "__main__":
    main()
