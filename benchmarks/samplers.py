"""simdiff's default sampler (UniPC on the "auto" grid) and tuned grids vs diffusers' schedulers, on many exact
Gaussian-mixture denoisers and four training schedules.

Problems: mixtures (``simdiff.toy.GaussianMixture``, exact float64 denoiser ``E[x | z]``) x schedules (diffusers'
"linear", "scaled_linear" (Stable Diffusion's betas), "squaredcos_cap_v2" as ``LinearBetaSchedule`` curves, and
simdiff's shifted cosine, given to diffusers as ``trained_betas`` of the same ``alphas_cumprod``). Two disjoint
mixture sets: "train" (the set the "auto" policy was chosen on) and "heldout" (reported; other seeds, component
counts, widths and dimensions). Guided problems use classifier-free guidance ``x_u + w (x_c - x_u)`` with the
exact conditional and unconditional denoisers.

Every method starts from the same ``z`` at the schedule's first level (timestep 999) and ends on data. Metric:
RMSE per coordinate against a DOP853 solution of the same PF-ODE to logsnr 30 (``solve_reference``). Rows:
diffusers' multistep schedulers with their recommended settings ("trailing" spacing, final sigma zero,
lower_order_final) and Karras / Lu sigma variants, the best of them taken per cell; UniPC bh2 order 3 on the
"calibrated" grid (``simdiff.samplers.calibrate``: a logistic fitted to a 16-point pilot DDIM run of the denoiser,
its own noise), on the "auto" grid and on "uniform_t"; simdiff tuned (``fit_grids``: fitted on a calibration
batch, selected on a validation batch, reported on the test batch ``z``; only on the ``--tune`` problems). NFE =
counted calls.

Run: ``python benchmarks/samplers.py [--split heldout|train] [--quick]``; writes benchmarks/results/samplers.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CallCounter, command_line, fmt_num, machine_info, table_markdown, write_json, write_text  # noqa: E402

from simdiff.process import to_output  # noqa: E402
from simdiff.samplers import get_sampler, make_grid, solve_reference  # noqa: E402
from simdiff.samplers.calibrate import PILOT_SIZE, calibrate, calibrated_end, calibrated_grid  # noqa: E402
from simdiff.samplers.gaussian import DataMoments, GaussianDenoiser, gaussian_start, start_level  # noqa: E402
from simdiff.samplers.tuned import fit_grids  # noqa: E402
from simdiff.schedules import LinearBetaSchedule, ShiftedCosineSchedule  # noqa: E402
from simdiff.toy import GaussianMixture  # noqa: E402

F64 = torch.float64
DEFAULT = "simdiff default (unipc, calibrated, Gaussian start)"
CALIBRATED = "simdiff calibrated (unipc, calibrated, no Gaussian start)"
MOMENT_SAMPLES = 50_000
AUTO = "simdiff unipc, auto"
UNIFORM_T = "simdiff unipc, uniform_t"
TUNED = "simdiff tuned (unipc, fit_grids)"
NFES = (4, 5, 6, 8, 10, 15, 20)
LOGSNR_END = 30.0
TOL = 1e-8

SCHEDULES: dict[str, tuple[Any, dict[str, Any]]] = {
    "linear": (LinearBetaSchedule(), dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")),
    "scaled_linear": (LinearBetaSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
                      dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")),
    "squaredcos_cap_v2": (LinearBetaSchedule(beta_schedule="squaredcos_cap_v2"),
                          dict(beta_schedule="squaredcos_cap_v2")),
    "shifted_cosine": (ShiftedCosineSchedule(image_size=64, noise_size=32), {}),
}


def mixtures(split: str) -> list[tuple[str, GaussianMixture, float | None]]:
    """(name, mixture, guidance weight or None). "train" (the "auto" policy was chosen on it): seeds 0 and 1;
    "heldout" (reported): seed 2, other component counts, widths and dimensions."""
    sets = {"train": [([(2, 0.03), (2, 0.1), (64, 0.1), (64, 0.3), (64, 0.03)], 0, 8, (64, 0.1, 3.0)),
                      ([(2, 0.05), (2, 0.2), (64, 0.05), (64, 0.2), (16, 0.1)], 1, 16, (2, 0.05, 2.0))],
            "heldout": [([(2, 0.08), (2, 0.15), (8, 0.05), (32, 0.15), (64, 0.08)], 2, 12, (16, 0.1, 2.5))]}
    out: list[tuple[str, GaussianMixture, Any]] = []
    for spec, seed, k, (d, s, w) in sets[split]:
        out += [(f"{d}-D K{k} std {s}", GaussianMixture.random(d, k, std=s, seed=seed), None) for d, s in spec]
        out.append((f"{d}-D K8 std {s} cfg {w:g}", GaussianMixture.random(d, 8, std=s, num_classes=4, seed=seed), w))
    if split == "heldout":  # guidance only in EDM2-XXL's sigma interval (0.28, 1.61] = log-SNR [-0.95, 2.55]
        gm = GaussianMixture.random(16, 8, std=0.1, num_classes=4, seed=2)
        out.append(("16-D K8 std 0.1 cfg 2.5 interval", gm, (2.5, -0.95, 2.55)))
    return out


def guided(gm: Any, labels: Tensor, guidance: Any) -> Callable[..., Any]:
    """CFG with scale ``guidance`` (a float) or ``(scale, lo, hi)``: guided only where ``lo <= logsnr <= hi``.
    ``gm``: anything with ``posterior_mean(z, logsnr[, labels])`` (a mixture, or :class:`GaussianOf`)."""
    w, lo, hi = (guidance, -math.inf, math.inf) if isinstance(guidance, float) else guidance

    def denoise(z: Tensor, logsnr: Tensor, **_: Any) -> Any:
        xu, xc = gm.posterior_mean(z, logsnr), gm.posterior_mean(z, logsnr, labels)
        lam = torch.as_tensor(logsnr, dtype=z.dtype).reshape(-1)
        inside = ((lam >= lo) & (lam <= hi)).to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        return to_output("x", xc + inside * (w - 1) * (xc - xu), z=z, logsnr=logsnr)

    return denoise


class GaussianOf:
    """The Gaussian-start surrogate of a mixture as the library builds it for a model: :class:`DataMoments` of
    ``MOMENT_SAMPLES`` samples drawn from the mixture (its "training data"; per class for a class-conditional one),
    rank ``min(32, dim)``, and their :class:`GaussianDenoiser`."""

    def __init__(self, gm: GaussianMixture, conditional: bool) -> None:
        x, y = gm.sample(MOMENT_SAMPLES, generator=torch.Generator().manual_seed(3))
        classes = gm.num_classes if conditional else 0
        moments = DataMoments.from_images(x, y if conditional else None, classes, rank=min(32, gm.dim))
        self.den, self.null = GaussianDenoiser(moments), classes

    def posterior_mean(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.den(z, logsnr, labels=labels).x

    def denoise(self, z: Tensor, logsnr: Tensor, **_: Any) -> Any:
        return self.den(z, logsnr)


def gaussian_start_run(gm: GaussianMixture, w: Any, labels: Tensor | None, schedule: Any, cal: Any, steps: int,
                       z: Tensor, den: Callable[..., Any]) -> Tensor:
    """The default: the Gaussian start to ``start_level`` (no denoiser call), then UniPC on the calibrated grid."""
    start = start_level(schedule, cal.mu, calibrated_end(schedule, steps, cal), steps)
    grid = calibrated_grid(schedule, steps, cal, start=start)
    if start is not None:
        sur = GaussianOf(gm, w is not None)
        z = gaussian_start(sur.denoise if w is None else guided(sur, labels, w), z, float(schedule.logsnr_min), start)
    return get_sampler("unipc")(den, z, grid)


# ------------------------------------------------------------------------------------------------ diffusers
def diffusers_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    dpm = dict(algorithm_type="dpmsolver++", final_sigmas_type="zero")
    uni = dict(predict_x0=True, final_sigmas_type="zero")
    return {
        "DPM-Solver++ 2M": ("DPMSolverMultistepScheduler", dict(dpm, solver_order=2)),
        "DPM-Solver++ 3M": ("DPMSolverMultistepScheduler", dict(dpm, solver_order=3)),
        "DPM-Solver++ 2M Karras": ("DPMSolverMultistepScheduler", dict(dpm, solver_order=2, use_karras_sigmas=True)),
        "DPM-Solver++ 3M Lu": ("DPMSolverMultistepScheduler", dict(dpm, solver_order=3, use_lu_lambdas=True)),
        # bh1 with final_sigmas_type="zero" returns NaN in diffusers 0.42 (B(h) = h is infinite on the last step)
        "UniPC bh1 o3": ("UniPCMultistepScheduler", dict(predict_x0=True, solver_type="bh1", solver_order=3)),
        "UniPC bh2 o2": ("UniPCMultistepScheduler", dict(uni, solver_type="bh2", solver_order=2)),
        "UniPC bh2 o3": ("UniPCMultistepScheduler", dict(uni, solver_type="bh2", solver_order=3)),
        "DEIS o3": ("DEISMultistepScheduler", dict(solver_order=3)),
    }


def diffusers_config(schedule: Any, betas_cfg: dict[str, Any]) -> dict[str, Any]:
    base = dict(num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="trailing")
    if betas_cfg:
        return dict(base, **betas_cfg)
    acp = torch.sigmoid(schedule.logsnr(torch.arange(1000, dtype=F64) / 999))
    betas = 1 - acp / torch.cat([torch.ones(1, dtype=F64), acp[:-1]])
    return dict(base, trained_betas=betas.tolist())


def diffusers_run(cls_name: str, extra: dict[str, Any], config: dict[str, Any], z: Tensor, steps: int,
                  denoise: Callable[..., Any]) -> Tensor:
    import diffusers

    sched = getattr(diffusers, cls_name)(**config, **extra)
    sched.set_timesteps(steps)
    x = z * float(sched.init_noise_sigma)
    for t in sched.timesteps:
        idx = sched.step_index if sched.step_index is not None else 0
        lam = -2.0 * torch.log(sched.sigmas[idx].to(F64))
        eps = denoise(x, lam.expand(x.shape[0])).eps
        x = sched.step(eps, t, x).prev_sample
    return x


# ------------------------------------------------------------------------------------------------ the benchmark
def rmse(x: Tensor, ref: Tensor) -> float:
    v = float(((x.to(F64) - ref) ** 2).mean().sqrt())
    return v if math.isfinite(v) else math.inf


def counted(run: Callable[[Callable[..., Any]], Tensor], denoise: Callable[..., Any]) -> tuple[Tensor, int]:
    """Run and count calls; a method that fails (e.g. diffusers' Karras sigmas with repeated values on
    squaredcos_cap_v2) gives NaN, shown as inf RMSE."""
    c = CallCounter(denoise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            x = run(c)
        except (IndexError, RuntimeError, ValueError):
            return torch.full((1,), math.nan, dtype=F64), c.calls
    return x, c.calls


def bench_problem(name: str, gm: GaussianMixture, w: Any, sname: str, args: argparse.Namespace,
                  tune: bool) -> dict[str, Any]:
    schedule, betas_cfg = SCHEDULES[sname]
    gen = torch.Generator().manual_seed(21)
    n = args.n

    labels_of: dict[int, Tensor] = {}

    def batch(size: int) -> tuple[Tensor, Callable[..., Any]]:
        z = torch.randn(size, gm.dim, dtype=F64, generator=gen)
        if w is None:
            return z, gm.denoise
        labels_of[size] = torch.randint(0, gm.num_classes, (size,), generator=gen)
        return z, guided(gm, labels_of[size], w)

    def ref(z: Tensor, den: Callable[..., Any]) -> Tensor:
        return solve_reference(den, z, logsnr_start=float(schedule.logsnr_min), logsnr_end=LOGSNR_END, rtol=TOL,
                               atol=TOL)

    t0 = time.time()
    z, den = batch(n)
    x_ref = ref(z, den)
    config = diffusers_config(schedule, betas_cfg)
    res: dict[str, Any] = {"mixture": name, "schedule": sname, "n": n, "rows": {}}
    for row, (cls_name, extra) in diffusers_variants().items():
        cells = {}
        for nfe in args.nfe:
            x, calls = counted(lambda d: diffusers_run(cls_name, extra, config, z, nfe, d), den)  # noqa: B023
            cells[nfe] = {"rmse": rmse(x, x_ref), "nfe": calls}
        res["rows"][f"diffusers: {row}"] = cells
    unipc = get_sampler("unipc")
    # the "calibrated" grid's pilot: its own noise (and labels), PILOT_SIZE points, as the library draws it
    pilot_gen = torch.Generator().manual_seed(0)
    zp = torch.randn(PILOT_SIZE, gm.dim, dtype=F64, generator=pilot_gen)
    dp = gm.denoise if w is None else guided(gm, torch.randint(0, gm.num_classes, (PILOT_SIZE,), generator=pilot_gen),
                                            w)
    cal = calibrate(dp, schedule, zp)
    res["calibration"] = {"mu": cal.mu, "scale": cal.scale}
    grid_rows = ((CALIBRATED, lambda n: calibrated_grid(schedule, n, cal)),
                 (AUTO, lambda n: make_grid(schedule, n, kind="auto")),
                 (UNIFORM_T, lambda n: make_grid(schedule, n, kind="uniform_t")))
    for row, grid_fn in grid_rows:
        cells = {}
        for nfe in args.nfe:
            x, calls = counted(lambda d: unipc(d, z, grid_fn(nfe)), den)  # noqa: B023
            cells[nfe] = {"rmse": rmse(x, x_ref), "nfe": calls}
        res["rows"][row] = cells
    cells = {}
    for nfe in args.nfe:
        x, calls = counted(lambda d: gaussian_start_run(gm, w, labels_of.get(n), schedule, cal, nfe, z, d),  # noqa: B023
                           den)
        cells[nfe] = {"rmse": rmse(x, x_ref), "nfe": calls}
    res["rows"][DEFAULT] = cells
    if tune:
        zc, dc = batch(args.n_cal)
        zv, dv = batch(args.n_val)
        if w is not None:  # one label draw per batch: fit on the calibration labels, select on the validation ones
            dc_, dv_ = dc, dv
        else:
            dc_, dv_ = den, den
        steps = [s for s in args.nfe if s <= args.tune_max_nfe]
        fits = fit_grids(_split_cond(dc_, dv_), "unipc", schedule, steps, z=zc, reference=ref(zc, dc_),
                         val_z=zv, val_reference=ref(zv, dv_), iters=args.tune_iters)
        cells = {}
        for nfe, (grid, val) in fits.items():
            x, calls = counted(lambda d: unipc(d, z, grid), den)  # noqa: B023
            cells[nfe] = {"rmse": rmse(x, x_ref), "nfe": calls, "val_rmse": val, "grid": grid.tolist()}
        res["rows"][TUNED] = cells
    res["seconds"] = time.time() - t0
    return res


def _split_cond(dc: Callable[..., Any], dv: Callable[..., Any]) -> Callable[..., Any]:
    """One denoiser for fit_grids that uses the calibration labels on the calibration batch and the validation
    labels on the validation batch (told apart by batch size; the two sizes differ)."""
    def denoise(z: Tensor, logsnr: Tensor, **kw: Any) -> Any:
        return (dc if z.shape[0] == _split_cond.n_cal else dv)(z, logsnr, **kw)

    return denoise


def best_diffusers(res: dict[str, Any], nfe: int) -> tuple[float, str]:
    cands = [(r[nfe]["rmse"], k) for k, r in res["rows"].items() if k.startswith("diffusers") and nfe in r]
    return min(cands)


def render(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], cmd: str,
           wall: float) -> str:
    nfes = list(args.nfe)
    md = [f"## Samplers on exact Gaussian-mixture denoisers: simdiff default and tuned vs diffusers ({args.split})", "",
          f"Run {info['date']} on {info['platform']} ({info['cpu_count']} CPUs shared, 1 torch thread), torch "
          f"{info['torch']}, diffusers {info['diffusers']}. Command: `{cmd}`. Wall-clock {wall / 60:.1f} min.", "",
          "Cells: RMSE ratio to the best diffusers row of that cell (DPM-Solver++ 2M / 3M / 2M Karras / 3M Lu, "
          "UniPC bh1 o3 / bh2 o2 / bh2 o3, DEIS o3; all `trailing`, final sigma zero except UniPC bh1, which gives NaN "
          "with it and keeps diffusers' default `sigma_min`); below 1 = simdiff better. "
          f"N = {args.n} test points per problem; mixtures of the `{args.split}` set "
          "(the \"auto\" grid's constants and the \"calibrated\" grid's offset, scale factor and end shift were "
          "chosen on the `train` set).", ""]
    for row in (DEFAULT, CALIBRATED, AUTO, TUNED, UNIFORM_T):
        table, logs = [], {n: [] for n in nfes}
        for res in results:
            if row not in res["rows"]:
                continue
            cells = [f"{res['mixture']} / {res['schedule']}"]
            for n in nfes:
                if n in res["rows"][row]:
                    r = res["rows"][row][n]["rmse"] / best_diffusers(res, n)[0]
                    logs[n].append(math.log(r))
                    cells.append(r)
                else:
                    cells.append("-")
            table.append(cells)
        if not table:
            continue
        geo = ["geometric mean"] + [math.exp(sum(v) / len(v)) if v else "-" for v in logs.values()]
        worst = ["worst"] + [math.exp(max(v)) if v else "-" for v in logs.values()]
        md += [f"**{row}: ratio to best diffusers**", "",
               table_markdown(["problem"] + [f"NFE {n}" for n in nfes], [geo, worst] + table), ""]
    md += ["<details><summary>Best diffusers RMSE per problem (and which)</summary>", ""]
    rows = [[f"{r['mixture']} / {r['schedule']}"] + [f"{fmt_num(best_diffusers(r, n)[0])} "
                                                     f"({best_diffusers(r, n)[1][11:]})" for n in nfes]
            for r in results]
    md += [table_markdown(["problem"] + [f"NFE {n}" for n in nfes], rows), "", "</details>", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--n", type=int, default=256, help="test points per problem")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--tune", nargs="*", default=["64-D", "2-D K12 std 0.08"],
                   help="mixtures (name prefixes) to tune grids on")
    p.add_argument("--tune-max-nfe", type=int, default=10)
    p.add_argument("--tune-iters", type=int, default=40)
    p.add_argument("--n-cal", type=int, default=256)
    p.add_argument("--n-val", type=int, default=192)
    p.add_argument("--quick", action="store_true", help="smoke mode: 2 problems, NFE 5 and 10, 64 points")
    p.add_argument("--out", default="samplers", help="results file stem under benchmarks/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.nfe, args.n, args.schedules, args.tune_iters = [5, 10], 64, ["linear"], 5
    torch.set_num_threads(1)
    _split_cond.n_cal = args.n_cal
    info, cmd, t0 = machine_info(), command_line(), time.time()
    results = []
    mixes = mixtures(args.split)[: 2 if args.quick else None]
    for name, gm, w in mixes:
        for sname in args.schedules:
            tune = any(name.startswith(t) for t in args.tune)
            res = bench_problem(name, gm, w, sname, args, tune)
            results.append(res)
            ratios = {row: " ".join(f"{res['rows'][row][n]['rmse'] / best_diffusers(res, n)[0]:.2f}" for n in args.nfe)
                      for row in (DEFAULT, CALIBRATED, AUTO)}
            print(f"{name} / {sname} ({res['seconds']:.0f} s, calibration mu {res['calibration']['mu']:.2f} scale "
                  f"{res['calibration']['scale']:.2f}): / best diffusers: default {ratios[DEFAULT]}; calibrated "
                  f"{ratios[CALIBRATED]}; auto {ratios[AUTO]}", flush=True)
    wall = time.time() - t0
    md = render(results, args, info, cmd, wall)
    print(md)
    payload = {"machine": info, "command": cmd, "wall_seconds": wall, "nfe": args.nfe, "results": results}
    print("wrote", write_json(args.out, payload), "and", write_text(f"{args.out}.md", md))


if __name__ == "__main__":
    main()
