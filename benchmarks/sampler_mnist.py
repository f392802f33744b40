"""Step grids on the shipped MNIST model: MNIST-FD (or RMSE to the PF-ODE solution) vs network calls.

Rows (every row from the same starting noise, seed 0, labels cycling 0..9, no guidance): the default (UniPC on the
calibrated grid after the Gaussian start, ``simdiff.samplers.gaussian``, with the data moments the shipped file
carries), UniPC on the "calibrated" grid (``simdiff.samplers.calibrate``: logistic fitted to a pilot run of the
model), UniPC on the mixture-chosen "auto" grid, UniPC on "uniform_t" (what diffusers' UniPC with "trailing" spacing
computes), DPM-Solver++(2M) on "uniform_logsnr", and with ``--tune`` UniPC on grids fitted by ``fit_grids`` (the
``simdiff tune-grid`` procedure; small calibration batches, fitted for this benchmark).

Metrics: ``--metric fd``: MNIST-FD of ``--num`` samples against the test split (``simdiff.runs.evaluate_model``);
``--metric rmse``: RMSE per pixel of ``--num`` samples against UniPC with ``--ref-steps`` uniform log-SNR steps from
the same noise (a fine PF-ODE solution; precise with few samples, but it rewards landing early).

Run: ``python benchmarks/sampler_mnist.py --metric fd --num 500`` (writes benchmarks/results/sampler_mnist_fd.{json,md}
after every row).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, fmt_num, machine_info, table_markdown, write_json, write_text  # noqa: E402

from simdiff.generate import SampleConfig  # noqa: E402
from simdiff.runs import evaluate_model, load_model  # noqa: E402
from simdiff.samplers import get_sampler, make_grid  # noqa: E402
from simdiff.samplers.calibrate import PILOT_SIZE, calibrate, calibrated_end, calibrated_grid  # noqa: E402
from simdiff.samplers.gaussian import GaussianDenoiser, gaussian_start, start_level  # noqa: E402

PRETRAINED = Path(__file__).resolve().parents[1] / "simdiff" / "pretrained" / "mnist_uvit.safetensors"
F64 = torch.float64


def labelled(loaded: Any, labels: torch.Tensor) -> Any:
    def denoise(z: torch.Tensor, logsnr: torch.Tensor, **_: Any) -> Any:
        return loaded.model(z, logsnr, labels=labels[: z.shape[0]].to(z.device))

    return denoise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metric", choices=("fd", "rmse"), default="fd")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10, 15, 20])
    p.add_argument("--num", type=int, default=None, help="samples per cell (default 500 for fd, 32 for rmse)")
    p.add_argument("--ref-steps", type=int, default=160)
    p.add_argument("--rows", nargs="+", default=["calibrated + Gaussian start", "calibrated", "dpmpp_2m/uniform_logsnr",
                                                 "uniform_t", "auto"])
    p.add_argument("--tune", action="store_true", help="also fit grids (fit_grids) for --tune-nfe")
    p.add_argument("--tune-nfe", type=int, nargs="+", default=[5, 8, 10])
    p.add_argument("--end-shift", type=float, default=None,
                   help="override simdiff.samplers.calibrate.END_SHIFT for the calibrated row (a candidate rule)")
    p.add_argument("--model", default=str(PRETRAINED))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    num = args.num or (500 if args.metric == "fd" else 32)
    out = args.out or f"sampler_mnist_{args.metric}"
    torch.set_num_threads(1)
    if args.end_shift is not None:
        import simdiff.samplers.calibrate as calibrate_module

        calibrate_module.END_SHIFT = args.end_shift
    info, cmd, t0 = machine_info(), command_line(), time.time()
    loaded = load_model(args.model)
    sch = loaded.schedule
    labels = torch.arange(max(num, 64)) % max(loaded.num_classes, 1)
    den = labelled(loaded, labels) if loaded.num_classes else loaded.model
    pilot_z = torch.randn((PILOT_SIZE, *loaded.image_shape), generator=torch.Generator().manual_seed(1))
    tc = time.time()
    cal = calibrate(den, sch, pilot_z)
    cal_secs = time.time() - tc
    print(f"calibration mu {cal.mu:.3f} scale {cal.scale:.3f} ({cal_secs:.0f} s)", flush=True)
    moments = getattr(loaded.model, "data_moments", None)

    def started(n: int) -> Any:
        start = start_level(sch, cal.mu, calibrated_end(sch, n, cal), n) if moments is not None else None
        return calibrated_grid(sch, n, cal, start=start)

    grids: dict[str, tuple[str, Any]] = {
        "calibrated + Gaussian start": ("unipc", started),
        "calibrated": ("unipc", lambda n: calibrated_grid(sch, n, cal)),
        "auto": ("unipc", lambda n: make_grid(sch, n, kind="auto")),
        "uniform_t": ("unipc", lambda n: make_grid(sch, n, kind="uniform_t")),
        "dpmpp_2m/uniform_logsnr": ("dpmpp_2m", lambda n: make_grid(sch, n, kind="uniform_logsnr")),
    }
    z = ref = None
    if args.metric == "rmse":
        z = torch.randn((num, *loaded.image_shape), generator=torch.Generator().manual_seed(11))
        lo, hi = float(sch.logsnr_min), float(sch.logsnr_max)
        fine = torch.cat([torch.linspace(lo, hi, args.ref_steps, dtype=F64), torch.tensor([math.inf], dtype=F64)])
        with torch.inference_mode():
            ref = get_sampler("unipc")(den, z, fine)
    rows: dict[str, dict[int, float]] = {}
    if args.tune:
        from simdiff.samplers.tuned import fit_grids

        gen = torch.Generator().manual_seed(7)
        zc = torch.randn((16, *loaded.image_shape), generator=gen)
        zv = torch.randn((16, *loaded.image_shape), generator=gen)
        unipc = get_sampler("unipc")
        fine = make_grid(sch, 100, kind="auto")
        with torch.no_grad():
            rc, rv = unipc(den, zc, fine), unipc(den, zv, fine)
        fits = fit_grids(den, "unipc", sch, args.tune_nfe, z=zc, reference=rc, val_z=zv, val_reference=rv, iters=10,
                         restarts=2)
        tuned = {n: g for n, (g, _) in fits.items()}
        grids["tuned (fit_grids)"] = ("unipc", lambda n: tuned[n])
        args.rows.append("tuned (fit_grids)")
    for row in args.rows:
        sampler, grid_fn = grids[row]
        rows[row] = {}
        for n in args.nfe:
            if row.startswith("tuned") and n not in args.tune_nfe:
                continue
            tr = time.time()
            grid = grid_fn(n)
            if args.metric == "fd":
                cfg = SampleConfig(sampler=sampler, steps=n, grid="uniform_t", num=num, seed=0, batch_size=250)
                value = evaluate_model(loaded, cfg, num=num, metrics=("mnist_fd",), progress=False,
                                       logsnrs=grid)["mnist_fd"]
            else:
                with torch.inference_mode():
                    zs = z
                    if grid[0] > sch.logsnr_min:  # the Gaussian start, as generate() does it
                        zs = gaussian_start(GaussianDenoiser(moments), z, float(sch.logsnr_min), float(grid[0]),
                                            cond={"labels": labels[:num]} if loaded.num_classes else None)
                    x = get_sampler(sampler)(den, zs, grid)
                value = float((x - ref).pow(2).mean().sqrt())
            rows[row][n] = value
            print(f"{row} {n} calls: {value:.4g} ({time.time() - tr:.0f} s)", flush=True)
        wall = time.time() - t0
        name = "MNIST-FD" if args.metric == "fd" else "RMSE to the PF-ODE solution"
        md = [f"## {name} vs network calls on the shipped MNIST model ({num} samples per cell)", "",
              f"Run {info['date']} on {info['platform']} ({info['cpu_count']} CPUs shared, 1 torch thread), torch "
              f"{info['torch']}. Command: `{cmd}`. Wall-clock {wall / 60:.1f} min (so far). Calibration: mu "
              f"{cal.mu:.2f}, scale {cal.scale:.2f} from a {PILOT_SIZE}-sample pilot ({cal_secs:.0f} s).", "",
              table_markdown(["sampler / grid"] + [f"{n} calls" for n in args.nfe],
                             [[("unipc / " if grids[r][0] == "unipc" else "") + r]
                              + [rows[r].get(n, "-") for n in args.nfe] for r in rows],
                             fmt=lambda v: v if isinstance(v, str) else fmt_num(v, 4)), ""]
        write_text(f"{out}.md", "\n".join(md))
        write_json(out, {"machine": info, "command": cmd, "wall_seconds": wall, "num": num, "metric": args.metric,
                         "calibration": {"mu": cal.mu, "scale": cal.scale, "seconds": cal_secs},
                         "rows": {r: {str(n): v for n, v in c.items()} for r, c in rows.items()}})
    print("\n".join(md))


if __name__ == "__main__":
    main()
