"""Inversion and editing with the shipped class-conditional MNIST model, on held-out MNIST test images.

Part 1, reconstruction: invert ``--num`` test images with their own label and re-generate with it; PSNR (peak to
peak 2 on [-1, 1] images, mean over images) against network evaluations per image (a guided call counts 2; a
forward + backward of null-text optimisation counts 1). Two regimes: unguided (the conditional model, ``w = 0``) and
guided (``w = --guidance``, what editing uses). Rows: DDIM inversion of order 1 (also with ``lookahead``), 2 and 3
(inversion unguided, re-generation at ``w``: the baseline of the null-text paper), EDICT (float32, and a float64
copy of the model), null-text inversion (10 Adam steps per grid step), negative-prompt inversion, edit-friendly DDPM
(noise maps at ``w``), the exact PF-ODE inversion (DOP853, tolerances 1e-4; unguided, between the largest step
count's grid ends) and, as the peer, diffusers' ``DDIMInverseScheduler`` + ``DDIMScheduler`` ("trailing" spacing,
``clip_sample=False``, ``alphas_cumprod`` of the model's own schedule as ``trained_betas``) stepping the same
model's eps prediction (through the same guidance wrapper).

Part 2, editing: ``--edit-num`` test images from their label ``y`` to ``(y + 1) % 10`` at strengths
``--strengths`` (fraction of the ``--edit-steps`` grid re-generated) and guidance weights ``--edit-guidance``:
editing success = the MNIST classifier of :mod:`simdiff.eval.mnist` predicts the target; faithfulness = RMSE to
the source image.

Run::

    nice -n 10 python benchmarks/inversion.py            # ~15 min on one thread of a shared 2-core machine
    nice -n 10 python benchmarks/inversion.py --gallery  # also docs/gallery/edit_mnist.png

Writes ``benchmarks/results/inversion.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.cli import PRETRAINED  # noqa: E402
from simdiff.data import build_dataset  # noqa: E402
from simdiff.eval.mnist import MNISTFeatures  # noqa: E402
from simdiff.invert import invert, regenerate  # noqa: E402
from simdiff.invert.ddim import guided  # noqa: E402
from simdiff.invert.edit import CountCalls  # noqa: E402
from simdiff.runs import load_model  # noqa: E402

F64 = torch.float64


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x.clamp(-1, 1).float() - ref.float()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return float((10 * torch.log10(4.0 / mse)).mean())


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.clamp(-1, 1).float() - ref.float()).pow(2).flatten(1).mean(1).sqrt().mean())


def diffusers_round_trip(model, schedule, x, labels, steps: int, w: float) -> tuple[torch.Tensor, float]:
    """diffusers' DDIMInverseScheduler then DDIMScheduler (eta 0) on the simdiff model's eps prediction."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    acp = torch.sigmoid(schedule.logsnr(torch.arange(1000, dtype=F64) / 999))
    betas = 1 - acp / torch.cat([torch.ones(1, dtype=F64), acp[:-1]])
    cfg = dict(num_train_timesteps=1000, trained_betas=betas.tolist(), prediction_type="epsilon", clip_sample=False,
               set_alpha_to_one=True, timestep_spacing="trailing")
    counter = CountCalls(model, x.shape[0])
    den = guided(counter, w, null_cond={"labels": model.num_classes})
    cond = {"labels": labels}
    logit = torch.log(acp) - torch.log1p(-acp)

    def eps(z, t):
        return den(z, logit[int(t)].float().expand(z.shape[0]), **cond).eps

    inv = DDIMInverseScheduler(**cfg)
    inv.set_timesteps(steps)
    z = x.clone()
    for t in inv.timesteps:
        z = inv.step(eps(z, t), t, z).prev_sample
    fwd = DDIMScheduler(**cfg)
    fwd.set_timesteps(steps)
    for t in fwd.timesteps:
        z = fwd.step(eps(z, t), t, z).prev_sample
    return z, counter.nfe


def reconstruction(args, loaded, x, y) -> list[dict]:
    rows = []
    double = dataclasses.replace(loaded, model=load_model(PRETRAINED).model.to(F64))
    variants = [("DDIM o1", "ddim", {"order": 1}), ("DDIM o1 lookahead", "ddim", {"lookahead": True}),
                ("DDIM o2 (DPM-Solver++2M)", "ddim", {"order": 2}),
                ("DDIM o3", "ddim", {"order": 3}), ("EDICT p=0.93", "edict", {}),
                ("EDICT p=0.93, float64 model", "edict64", {}), ("null-text", "nulltext", {"inner_steps": 10}),
                ("negative-prompt", "negprompt", {}), ("edit-friendly DDPM", "ddpm", {}),
                ("exact PF-ODE (DOP853)", "ode", {"ode_tol": 1e-4}),
                ("diffusers DDIMInverseScheduler", "diffusers", {})]
    for w in (0.0, args.guidance):
        for name, method, opts in variants:
            if (method in ("nulltext", "negprompt") and w == 0.0) or (method == "ode" and w != 0.0):
                continue  # null-text / negative-prompt only differ from DDIM under guidance; the ODE is the reference
            for steps in args.steps:
                if method in ("nulltext", "edict64") and steps > 10:
                    continue
                if method == "ode" and steps != max(args.steps):
                    continue
                t0 = time.time()
                if method == "diffusers":
                    with torch.inference_mode():
                        rec, nfe = diffusers_round_trip(loaded.model, loaded.schedule, x, y, steps, w)
                    nfe_inv = nfe / 2
                else:
                    model, xx = (double, x.to(F64)) if method == "edict64" else (loaded, x)
                    inv = invert(model, xx, cond=y, method=method.replace("64", ""), steps=steps, guidance=w,
                                 generator=torch.Generator().manual_seed(args.seed), **opts)
                    rec, nfe_gen = regenerate(model, inv)
                    nfe_inv, nfe = inv.nfe, inv.nfe + nfe_gen
                row = {"w": w, "method": name, "steps": steps if method != "ode" else None, "nfe_inversion": nfe_inv,
                       "nfe_total": nfe, "psnr": psnr(rec, x), "seconds": time.time() - t0}
                rows.append(row)
                print(f"  w={w:g} {name:32s} steps={steps:3d} nfe={nfe:7.1f} PSNR={row['psnr']:6.2f} dB "
                      f"({row['seconds']:.0f} s)", flush=True)
    return rows


def editing(args, loaded, x, y, clf) -> list[dict]:
    rows = []
    target = (y + 1) % 10
    for w in args.edit_guidance:
        for method in ("ddim", "negprompt", "nulltext", "edict", "ddpm"):
            for s in args.strengths:
                t0 = time.time()
                inv = invert(loaded, x, cond=y, method=method, steps=args.edit_steps, strength=s, guidance=w,
                             generator=torch.Generator().manual_seed(args.seed))
                out, nfe = regenerate(loaded, inv, cond=target)
                ok = torch.isfinite(out).flatten(1).all(1)
                success = float(((clf.predict(out.clamp(-1, 1).float()) == target) & ok).float().mean())
                row = {"w": w, "method": method, "strength": s, "success": success, "rmse_to_source": rmse(out, x),
                       "nfe_total": inv.nfe + nfe, "seconds": time.time() - t0}
                rows.append(row)
                print(f"  w={w:g} {method:10s} strength={s:.1f} success={success:.2f} "
                      f"RMSE={row['rmse_to_source']:.3f} nfe={row['nfe_total']:.0f} ({row['seconds']:.0f} s)",
                      flush=True)
    return rows


def gallery(args, loaded, x, y, out: Path) -> Path:
    """Inputs (top row), then the edit to (y + 1) % 10 with each method at strength 0.8 and w = guidance."""
    from simdiff.images import save_grid

    rows = [x]
    for method in ("ddim", "nulltext", "edict", "ddpm"):
        inv = invert(loaded, x, cond=y, method=method, steps=args.edit_steps, strength=args.gallery_strength,
                     guidance=args.guidance, generator=torch.Generator().manual_seed(args.seed))
        rows.append(regenerate(loaded, inv, cond=(y + 1) % 10)[0].clamp(-1, 1))
    return save_grid(torch.cat(rows).float(), out, nrow=x.shape[0], scale=2)


def show_psnr(v: float) -> str:
    return "round-off (MSE < 1e-20)" if v > 200 else f"{v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=8, help="held-out test images")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--edit-steps", type=int, default=10)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.6, 0.8, 0.9, 1.0])
    p.add_argument("--edit-num", type=int, default=12, help="images of the editing part")
    p.add_argument("--edit-guidance", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="inversion")
    p.add_argument("--gallery", action="store_true", help="also write docs/gallery/edit_mnist.png")
    p.add_argument("--gallery-strength", type=float, default=0.8)
    p.add_argument("--gallery-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    loaded = load_model(PRETRAINED)
    n = max(args.num, args.edit_num)
    ds = build_dataset(dataclasses.replace(loaded.config.data, split="test", limit=n, hflip=False))
    x, y = ds.images[: args.num].float(), ds.labels[: args.num].long()
    xe, ye = ds.images[: args.edit_num].float(), ds.labels[: args.edit_num].long()
    if args.gallery or args.gallery_only:
        path = gallery(args, loaded, x, y, Path(__file__).resolve().parent.parent / "docs/gallery/edit_mnist.png")
        print(f"wrote {path}")
        if args.gallery_only:
            return
    clf = MNISTFeatures()
    print(f"{args.num} MNIST test images, labels {y.tolist()}; reconstruction:")
    rec = reconstruction(args, loaded, x, y)
    print("editing y -> (y + 1) % 10:")
    ed = editing(args, loaded, xe, ye, clf)
    wall = time.time() - start
    info, cmd = machine_info(), command_line()
    h1 = ["method", "w", "steps", "NFE inversion", "NFE total", "PSNR dB"]
    r1 = [[r["method"], f"{r['w']:g}", str(r["steps"] or "adaptive"), r["nfe_inversion"], r["nfe_total"],
           show_psnr(r["psnr"])] for r in rec]
    h2 = ["method", "w", "strength", "edit success", "RMSE to source", "NFE total"]
    r2 = [[r["method"], f"{r['w']:g}", f"{r['strength']:.1f}", r["success"], r["rmse_to_source"], r["nfe_total"]]
          for r in ed]
    print(table_text(h1, r1))
    print(table_text(h2, r2))
    md = [f"## Inversion and editing (shipped MNIST model, {args.num} held-out test images)", "",
          f"{info['date']}, {info['platform']}, {args.threads} thread(s), torch {info['torch']}, diffusers "
          f"{info['diffusers']}. Command: `{cmd}`. Wall-clock {wall / 60:.1f} min.", "",
          "Reconstruction (invert with the image's label, re-generate with it):", "", table_markdown(h1, r1), "",
          f"Editing y -> (y + 1) % 10 on {args.edit_num} test images, {args.edit_steps} steps (success: the MNIST "
          "classifier predicts the target; RMSE on [-1, 1] pixels):", "", table_markdown(h2, r2)]
    write_text(f"{args.name}.md", "\n".join(md))
    path = write_json(args.name, {"machine": info, "command": cmd, "wall_seconds": wall, "labels": y.tolist(),
                                  "reconstruction": rec, "editing": ed, "args": vars(args)})
    print(f"wrote {path} and {RESULTS_DIR / (args.name + '.md')} in {wall / 60:.1f} min")
    if not all(math.isfinite(r["psnr"]) for r in rec):
        print("note: some reconstructions are not finite")


if __name__ == "__main__":
    main()
