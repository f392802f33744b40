"""Bits per dimension of the shipped MNIST model: the VDM ELBO, the probability-flow ODE likelihood, and the
estimators' own errors.

Tables (all on the first images of the MNIST test split, 8-bit values ``k / 127.5 - 1``, unconditional: the
class-conditional model is given its null class, the label it saw with label dropout):

1. bpd: the VDM ELBO (discrete decoder, stratified log-SNR draws, proposal fitted on 16 pilot images) on
   ``--num-elbo`` images, and the PF-ODE likelihood (RK4 uniform in log-SNR, one Rademacher probe, uniform
   dequantisation) on ``--num-ode`` images; mean, standard error over the images, the estimator's Monte-Carlo
   error, the terms, network calls and wall-clock.
2. ELBO estimator spread at equal network calls: the standard deviation of one image's diffusion-term estimate
   with ``--vr-times`` draws (mean over ``--vr-images`` images), for draws of the training schedule's time
   (VDM's estimator), of uniform log-SNR and of the fitted proposal, iid / antithetic / stratified; integrated
   from the integrand on a ``--grid``-point log-SNR grid (one noise draw per point) rather than measured from
   repeated runs, whose sample spread misses the rare large draws of a heavy-tailed estimator.
3. ODE solver steps: bpd of ``--steps-images`` images at RK4 8 / 16 / 32 steps with the same probes and
   dequantisation noise, against 64 steps.

Published MNIST figures are quoted in the notes only where they were checked against the paper.

Run::

    nice -n 10 python benchmarks/likelihood.py            # ~4 min on one CPU thread
    nice -n 10 python benchmarks/likelihood.py --quick    # a smoke run (seconds)

Writes ``benchmarks/results/likelihood.{json,md}`` (``likelihood_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.eval.likelihood import heldout_images, likelihood_of_loaded  # noqa: E402
from simdiff.likelihood import LogSNRProposal, fit_proposal  # noqa: E402
from simdiff.runs import load_model  # noqa: E402

PRETRAINED = Path(__file__).resolve().parents[1] / "simdiff" / "pretrained" / "mnist_uvit.safetensors"


def _bpd_rows(loaded, args) -> tuple[list, dict]:
    x, labels = heldout_images(loaded.config, max(args.num_elbo, args.num_ode))
    rows, raw = [], {}
    settings = [("elbo", args.num_elbo, {"num_times": args.times}),
                ("ode", args.num_ode, {"probes": 1, "steps": args.ode_steps, "solver": "rk4"})]
    for method, num, options in settings:
        start = time.perf_counter()
        r = likelihood_of_loaded(loaded, x[:num], labels[:num], method=method, seed=args.seed, **options)
        secs = time.perf_counter() - start
        s = r.summary()
        name = (f"ELBO, {args.times} stratified draws, fitted proposal" if method == "elbo"
                else f"PF-ODE, RK4 {args.ode_steps} steps, 1 probe, uniform deq.")
        terms = ", ".join(f"{k[4:]} {v:.3f}" for k, v in s.items() if k.startswith("bpd_") and k not in
                          ("bpd_se", "bpd_mc_se"))
        rows.append([name, num, s["bpd"], s["bpd_se"], s["bpd_mc_se"], terms, r.info["network_calls"], secs])
        raw[method] = {**s, **r.info, "seconds": secs}
        print(f"  {name}: {s['bpd']:.3f} +- {s['bpd_se']:.3f} bpd ({secs:.0f} s)", flush=True)
    return rows, raw


def _spread(f: torch.Tensor, lam: torch.Tensor, step: float, prop, n: int, sampling: str) -> torch.Tensor:
    """Standard deviation of an ``n``-draw estimate of ``int f dlam`` for each image.

    ``f [B, G]`` is the integrand on the uniform midpoint grid ``lam [G]`` (spacing ``step``); with ``Y = f / q``,
    ``E_q[Y] = int f``, ``E_q[Y^2] = int f^2 / q``, both by the midpoint rule. Stratified: ``n`` strata of equal
    ``q``-mass, ``Var = sum_j Var_j / n^2``, ``Var_j = n int_j f^2 / q - (n int_j f)^2``. Antithetic (uniform
    proposal only): pairs ``(lam, lam_min + lam_max - lam)``.
    """
    q = torch.exp(prop.log_density(lam))
    if sampling == "iid":
        var1 = (f**2 / q).sum(1) * step - (f.sum(1) * step) ** 2
        return (var1.clamp_min(0) / n).sqrt()
    if sampling == "antithetic":
        y = f / q
        pairs = 0.5 * (y + y.flip(1))  # q is uniform: Y and its mirror have equal weight
        return (pairs.var(1, unbiased=False) / (n // 2)).sqrt()
    bounds = prop.sample(torch.arange(1, n, dtype=torch.float64) / n)[0]
    stratum = torch.searchsorted(bounds, lam.contiguous())
    var = torch.zeros(f.shape[0], dtype=torch.float64)
    for j in range(n):
        m = stratum == j
        var += (n * (f[:, m] ** 2 / q[m]).sum(1) * step - (n * f[:, m].sum(1) * step) ** 2).clamp_min(0)
    return (var / n**2).sqrt()


def _variance_rows(loaded, args) -> tuple[list, dict]:
    """Predicted spread of the ELBO's diffusion term at ``--vr-times`` draws per image, per draw scheme.

    Rather than repeating noisy runs (whose sample spread misses the rare large draws of heavy-tailed proposals),
    the integrand is evaluated once on a dense uniform grid of ``--grid`` levels (one noise draw per level and
    image) and each estimator's variance is integrated from it (:func:`_spread`).
    """
    from simdiff.likelihood.elbo import diffusion_integrand

    x, _ = heldout_images(loaded.config, args.vr_images + 16)
    pilot, x = x[:16], x[16:16 + args.vr_images]
    null = {"labels": torch.full((x.shape[0],), loaded.num_classes)} if loaded.num_classes else {}
    pnull = {"labels": torch.full((16,), loaded.num_classes)} if loaded.num_classes else {}
    sch = loaded.schedule
    lo, hi = sch.logsnr_min, sch.logsnr_max
    fitted = fit_proposal(loaded.model, pilot, logsnr_min=lo, logsnr_max=hi, cond=pnull,
                          generator=torch.Generator().manual_seed(args.seed))
    proposals = {"schedule time (VDM)": LogSNRProposal.from_schedule(sch),
                 "uniform log-SNR": LogSNRProposal.uniform(lo, hi), "fitted proposal": fitted}
    step = (hi - lo) / args.grid
    lam = lo + (torch.arange(args.grid, dtype=torch.float64) + 0.5) * step
    f = diffusion_integrand(loaded.model, x, lam.expand(x.shape[0], -1).contiguous(), cond=null,
                            generator=torch.Generator().manual_seed(args.seed + 1))
    d = x[0].numel() * torch.log(torch.tensor(2.0, dtype=torch.float64))
    configs = [("iid", "schedule time (VDM)"), ("stratified", "schedule time (VDM)"), ("iid", "uniform log-SNR"),
               ("antithetic", "uniform log-SNR"), ("stratified", "uniform log-SNR"), ("iid", "fitted proposal"),
               ("stratified", "fitted proposal")]
    rows, raw = [], {}
    integral = float((f.sum(1) * step).mean() / d)
    for sampling, prop in configs:
        sd = float(_spread(f, lam, step, proposals[prop], args.vr_times, sampling).mean() / d)
        rows.append([f"{sampling}, {prop}", args.vr_times, sd])
        raw[f"{sampling}, {prop}"] = {"sd_bpd": sd}
    raw["integral_bpd"] = integral
    base = rows[0][2]
    for row in rows:
        row.append(base / row[2] if row[2] > 0 else float("nan"))
    return rows, raw


def _steps_rows(loaded, args) -> tuple[list, dict]:
    x, labels = heldout_images(loaded.config, args.steps_images)
    results = {}
    for steps in (8, 16, 32, 64):
        start = time.perf_counter()
        r = likelihood_of_loaded(loaded, x, labels, method="ode", seed=args.seed, probes=1, steps=steps)
        results[steps] = (r.bpd, time.perf_counter() - start)
    ref = results[64][0]
    rows = [[steps, float(b.mean()), float((b - ref).abs().max()), secs] for steps, (b, secs) in results.items()]
    return rows, {str(s): {"bpd": float(b.mean()), "max_abs_diff_vs_64": float((b - ref).abs().max())}
                  for s, (b, _) in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-elbo", type=int, default=256)
    p.add_argument("--num-ode", type=int, default=48)
    p.add_argument("--times", type=int, default=16, help="ELBO log-SNR draws per image")
    p.add_argument("--ode-steps", type=int, default=24)
    p.add_argument("--vr-images", type=int, default=8)
    p.add_argument("--vr-times", type=int, default=16)
    p.add_argument("--grid", type=int, default=256, help="log-SNR grid points for the spread table")
    p.add_argument("--steps-images", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.num_elbo, args.num_ode, args.times, args.ode_steps = 4, 2, 4, 2
        args.vr_images, args.vr_times, args.grid, args.steps_images = 2, 4, 32, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loaded = load_model(PRETRAINED)
    start = time.perf_counter()
    print("bpd of the shipped model", flush=True)
    bpd_rows, bpd_raw = _bpd_rows(loaded, args)
    print("ELBO estimator spread", flush=True)
    vr_rows, vr_raw = _variance_rows(loaded, args)
    print("ODE steps", flush=True)
    st_rows, st_raw = ([], {}) if args.quick else _steps_rows(loaded, args)
    total = time.perf_counter() - start

    h1 = ["estimator", "images", "bpd", "se (images)", "MC se", "terms (bpd)", "network calls", "seconds"]
    h2 = ["draws, proposal", "draws / image", "sd of one image (bpd)", "VDM iid sd / sd"]
    h3 = ["RK4 steps", "bpd", "max |diff| vs 64 steps", "seconds"]
    tables = [("bpd of the shipped MNIST model (unconditional)", h1, bpd_rows),
              (f"ELBO diffusion-term estimator spread at equal network calls ({args.vr_images} images)", h2,
               vr_rows)]
    if st_rows:
        tables.append((f"PF-ODE bpd vs RK4 steps ({args.steps_images} images, same probe and dequantisation)",
                       h3, st_rows))
    info = machine_info()
    text = "\n\n".join(f"{t}\n{table_text(h, r)}" for t, h, r in tables)
    md = "\n\n".join(f"**{t}**\n\n{table_markdown(h, r)}" for t, h, r in tables)
    md += f"\n\n{info['date']}, {info['processor']}, torch {info['torch']}, {args.threads} thread(s); " \
          f"total {total:.0f} s; command `{command_line()}`\n"
    print("\n" + text + f"\n\ntotal {total:.0f} s")
    name = "likelihood_quick" if args.quick else "likelihood"
    write_json(name, {"machine": info, "command": command_line(), "args": vars(args), "seconds": total,
                      "bpd": bpd_raw, "variance": vr_raw, "ode_steps": st_raw})
    write_text(f"{name}.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
