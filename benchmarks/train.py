"""simdiff training speed and quality at equal wall-clock against diffusers.

1. Throughput: images/s of one training step (forward + backward + grad-clip + AdamW) at batch 64 on 1x28x28,
   steady state after warm-up, median over timed windows, for simdiff's ``uvit``, ``residual_uvit`` and ``unet``
   (library defaults) and the ``mnist.yaml`` recipe network, each against a diffusers ``UNet2DModel`` whose
   ``block_out_channels`` are searched to match its parameter count (both counts reported).
2. Quality at equal wall-clock (both unconditional, same data, batch, seed and minutes):
   (a) simdiff recipe: ``simdiff/configs/mnist.yaml`` (residual U-ViT, v-prediction, sigmoid loss with the
       -dlogsnr/dt factor, shifted cosine schedule, AdamW 5e-4 + cosine decay, EMA half-life in images with
       EDM ramp-up) with ``num_classes=0``;
   (b) diffusers' unconditional-training example recipe: ``UNet2DModel``, ``DDPMScheduler`` (1000 steps, linear
       betas), eps-MSE at uniform integer timesteps, AdamW 1e-4 (betas 0.95/0.999, wd 1e-6) with linear warm-up +
       cosine decay, grad clip 1.0, ``EMAModel`` (decay 0.9999, warm-up inv_gamma 1, power 3/4).
   Learning-rate decays need a step count: both use the steps/s measured so far to extrapolate the total at the
   time budget. Warm-ups: ``--warmup recipe`` keeps 200 / 500 steps; ``scaled`` (default) caps each at 10% of
   the projected steps, because a CPU budget of minutes is only a few hundred steps and a 500-step warm-up
   would leave the diffusers model under-trained for reasons unrelated to the method.
   Sampling with 50 network evaluations: simdiff UniPC (uniform-t grid) and DDIM; diffusers DDIMScheduler
   (trailing spacing, set_alpha_to_one, its default clip_sample). Scores: MNIST Frechet distance (classifier
   features) and Inception FID vs MNIST test images (reference stats cached under a reference_key).

Run: ``python benchmarks/train.py [--quick] [--minutes 10]``. Writes benchmarks/results/train.{json,md} and
sample grids ``train_samples_*.png``. ``--quick`` writes ``train_quick.*`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402  # noqa: E402

from simdiff.data import build_dataset  # noqa: E402
from simdiff.eval import evaluate_samples  # noqa: E402
from simdiff.experiment import build_network, load_config  # noqa: E402
from simdiff.generate import SampleConfig, generate  # noqa: E402
from simdiff.images import save_grid  # noqa: E402
from simdiff.losses import DiffusionLoss  # noqa: E402
from simdiff.nets import build_model, count_parameters  # noqa: E402
from simdiff.train import EMA, BatchIterator, ema_decay, lr_at  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "simdiff" / "configs" / "mnist.yaml"
SHAPE = (1, 28, 28)
EMA_RAMPUP = 0.1  # simdiff EDM-style EMA ramp-up ratio used at minute-scale budgets (mnist.yaml sets none)


# --------------------------------------------------------------------------------------------------- networks
def diffusers_unet(width: int, mults: tuple[int, ...] = (1, 2, 2)):
    """A diffusers ``UNet2DModel`` for 1x28x28 shaped like its unconditional example (ResNet levels, attention at
    the low resolutions, 2 layers per block), 28 -> 14 -> 7, widths ``width * mults``."""
    from diffusers import UNet2DModel

    chans = tuple(width * m for m in mults)
    n = len(chans)
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=chans,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), norm_num_groups=8, attention_head_dim=8,
    )


_WIDTH_MULTS: dict[tuple[int, ...], tuple[int, tuple[int, ...]]] = {}  # channels -> (width, mults) found


def matched_diffusers(target: int) -> tuple[Any, int, tuple[int, ...]]:
    """The ``diffusers_unet`` (widths multiple of 8, a few width ratios) whose size is closest to ``target``."""
    best = None
    for mults in ((1, 2, 2), (1, 1, 2), (1, 2, 3), (1, 2, 4), (2, 3, 4), (2, 2, 3), (2, 3, 3), (1, 1, 1)):
        for width in range(16, 201, 8):
            n = count_parameters(diffusers_unet(width, mults))
            if best is None or abs(n - target) < abs(best[0] - target):
                best = (n, width, mults)
            if n > target:
                break
    n, width, mults = best
    _WIDTH_MULTS[tuple(width * m for m in mults)] = (width, mults)
    return diffusers_unet(width, mults), n, tuple(width * m for m in mults)


def simdiff_rows() -> list[tuple[str, Any]]:
    """(row name, DiffusionModel) for the library defaults and the mnist.yaml recipe network (unconditional)."""
    rows = [(f"{arch} (default)", build_model(arch, "v", {}, image_channels=1, image_size=28, num_classes=0))
            for arch in ("uvit", "residual_uvit", "unet")]
    rows.append(("residual_uvit (mnist.yaml)", build_network(load_config(RECIPE), image_shape=SHAPE, num_classes=0)))
    return rows


# ------------------------------------------------------------------------------------------------- throughput
def _ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def step_fns(model, kind: str, x: torch.Tensor):
    """A closure doing one full training step (loss, backward, clip, AdamW) of ``model`` on batch ``x``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(0)
    if kind == "simdiff":
        loss_fn = DiffusionLoss.from_config(dataclasses.replace(load_config(RECIPE).diffusion, cond_drop_prob=0.0))

        def loss():
            return loss_fn(model, {"x": x}, gen).mean()
    else:
        sched = _ddpm_scheduler()

        def loss():
            eps = torch.randn(x.shape, generator=gen)
            t = torch.randint(0, 1000, (x.shape[0],), generator=gen)
            return F.mse_loss(model(sched.add_noise(x, eps, t), t).sample, eps)

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def images_per_s(model, kind: str, *, batch: int, warmup: int, windows: int, steps: int) -> float:
    """Median over ``windows`` timed windows of ``steps`` training steps, after ``warmup`` untimed steps."""
    x = torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(1)) * 2 - 1
    model.train()
    step = step_fns(model, kind, x)
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def throughput(args) -> list[dict[str, Any]]:
    rows = simdiff_rows()
    if args.quick:
        rows = rows[-1:]
    out = []
    for name, model in rows:
        n_s = count_parameters(model)
        dmodel, n_d, chans = matched_diffusers(n_s)
        kw = dict(batch=args.batch, warmup=args.tp_warmup, windows=args.tp_windows, steps=args.tp_steps)
        ips_s = images_per_s(model, "simdiff", **kw)
        ips_d = images_per_s(dmodel, "diffusers", **kw)
        out.append({"simdiff": name, "simdiff_params": n_s, "diffusers_channels": list(chans), "diffusers_params": n_d,
                    "simdiff_img_s": ips_s, "diffusers_img_s": ips_d, "speedup": ips_s / ips_d})
        print(f"[throughput] {name}: {n_s} params {ips_s:.1f} img/s | diffusers {chans} {n_d} params "
              f"{ips_d:.1f} img/s | x{ips_s / ips_d:.2f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- equal-time runs
def _warmup(recipe_steps: int, projected: int, policy: str) -> int:
    return recipe_steps if policy == "recipe" else max(1, min(recipe_steps, projected // 10))


def _projected(step: int, elapsed: float, budget: float) -> int:
    """Total steps expected at the budget from the rate so far (before any step: a large placeholder)."""
    return max(step + 1, int(step * budget / elapsed)) if step > 0 and elapsed > 0 else 10**9


def train_simdiff(data: BatchIterator, budget_s: float, policy: str, seed: int) -> tuple[Any, Any, dict]:
    """simdiff recipe (mnist.yaml, unconditional) for ``budget_s`` seconds; returns (EMA model, schedule, log)."""
    cfg = load_config(RECIPE)
    torch.manual_seed(seed)
    model = build_network(cfg, image_shape=SHAPE, num_classes=0).train()
    loss_fn = DiffusionLoss.from_config(dataclasses.replace(cfg.diffusion, cond_drop_prob=0.0))
    o, tr = cfg.train.optim, cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            foreach=True)
    ema, gen = EMA(model), torch.Generator().manual_seed(seed)
    step, losses, t0 = 0, [], time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget_s:
        total = _projected(step, elapsed, budget_s)
        optim = dataclasses.replace(o, warmup_steps=_warmup(o.warmup_steps, total, policy))
        lr = lr_at(step, optim, total)
        loss = loss_fn(model, {"x": next(data)["x"]}, gen).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema.update(model, ema_decay(tr.batch_size, tr.ema_half_life_images, images_seen=step * tr.batch_size,
                                    rampup_ratio=EMA_RAMPUP))
        losses.append(loss.item())
    ema.copy_to(model)
    return model.eval(), loss_fn.schedule, {"steps": step, "seconds": time.perf_counter() - t0,
                                            "warmup_steps": optim.warmup_steps, "final_lr": lr,
                                            "loss_last50": statistics.fmean(losses[-50:])}


def diffusers_lr(step: int, base: float, warmup: int, total: int) -> float:
    """``get_cosine_schedule_with_warmup`` of diffusers' example (linear warm-up from 0, half-cosine to 0)."""
    if step < warmup:
        return base * step / max(1, warmup)
    p = (step - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0))))


def train_diffusers(data: BatchIterator, budget_s: float, policy: str, seed: int, width: int,
                    mults: tuple[int, ...]) -> tuple[Any, dict]:
    """diffusers' unconditional-example recipe for ``budget_s`` seconds; returns (EMA UNet2DModel, log)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = diffusers_unet(width, mults).train()
    sched = _ddpm_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8,
                            foreach=True)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    gen = torch.Generator().manual_seed(seed)
    step, losses, t0 = 0, [], time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget_s:
        total = _projected(step, elapsed, budget_s)
        warm = _warmup(500, total, policy)
        lr = diffusers_lr(step, 1e-4, warm, total)
        x = next(data)["x"]
        eps = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, 1000, (x.shape[0],), generator=gen)
        loss = F.mse_loss(model(sched.add_noise(x, eps, t), t).sample, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        step += 1
        losses.append(loss.item())
    ema.copy_to(model.parameters())
    return model.eval(), {"steps": step, "seconds": time.perf_counter() - t0, "warmup_steps": warm,
                          "final_lr": lr, "loss_last50": statistics.fmean(losses[-50:])}


@torch.no_grad()
def sample_diffusers(model, num: int, steps: int, seed: int, batch: int = 250) -> torch.Tensor:
    """DDIM (eta 0, trailing spacing, set_alpha_to_one) over the DDPM training schedule."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(steps)
    gen, out = torch.Generator().manual_seed(seed), []
    for start in range(0, num, batch):
        x = torch.randn((min(batch, num - start), *SHAPE), generator=gen)
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(x)
    return torch.cat(out).clamp(-1, 1)


def score(x: torch.Tensor, refs: dict[str, tuple[torch.Tensor, str]], n_fid: int) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fd = evaluate_samples(x, refs["fd"][0], metrics=("mnist_fd",), reference_key=refs["fd"][1], progress=False)
        fid = evaluate_samples(x[:n_fid], refs["fid"][0], metrics=("fid",), reference_key=refs["fid"][1],
                               progress=False)
    return {**fd, **fid}


def quality(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    budget = args.minutes * 60.0
    train = build_dataset({"name": "mnist", "split": "train+valid"})
    n_ref = max(args.fd_ref, args.fid_ref)
    test = build_dataset({"name": "mnist", "split": "test", "limit": n_ref}).images
    refs = {"fd": (test[: args.fd_ref], f"bench-mnist-test-first{args.fd_ref}"),
            "fid": (test[: args.fid_ref], f"bench-mnist-test-first{args.fid_ref}")}
    recipe_params = count_parameters(build_network(load_config(RECIPE), image_shape=SHAPE, num_classes=0))
    _, _, chans = matched_diffusers(recipe_params)
    width, mults = _WIDTH_MULTS[chans]
    info: dict[str, Any] = {"budget_minutes": args.minutes, "warmup_policy": args.warmup}

    print(f"[quality] training simdiff recipe for {args.minutes} min", flush=True)
    s_model, schedule, s_log = train_simdiff(BatchIterator({"x": train.images}, args.batch, seed=args.seed),
                                             budget, args.warmup, args.seed)
    print(f"[quality] simdiff: {s_log}", flush=True)
    print(f"[quality] training diffusers recipe for {args.minutes} min", flush=True)
    d_model, d_log = train_diffusers(BatchIterator({"x": train.images}, args.batch, seed=args.seed), budget,
                                     args.warmup, args.seed, width, mults)
    print(f"[quality] diffusers: {d_log}", flush=True)
    info.update(simdiff_train={**s_log, "params": count_parameters(s_model)},
                diffusers_train={**d_log, "params": count_parameters(d_model), "channels": list(chans)})

    rows = []
    runs = [("simdiff recipe", "UniPC, uniform-t", "unipc"), ("simdiff recipe", "DDIM, uniform-t", "ddim"),
            ("diffusers DDPM recipe", "DDIMScheduler, trailing", None)]
    for model_name, sampler_name, sampler in runs:
        t0 = time.perf_counter()
        with torch.no_grad():
            if sampler is None:
                x = sample_diffusers(d_model, args.fd_samples, args.sample_steps, args.seed)
            else:
                cfg = SampleConfig(sampler=sampler, steps=args.sample_steps, grid="uniform_t", num=args.fd_samples,
                                   seed=args.seed, batch_size=250)
                x = generate(s_model, schedule, SHAPE, cfg)
        t_sample = time.perf_counter() - t0
        tag = "diffusers_ddim" if sampler is None else f"simdiff_{sampler}"
        save_grid(x[:64], RESULTS_DIR / f"{args.name}_samples_{tag}.png", nrow=8)
        m = score(x, refs, args.fid_samples)
        log = s_log if sampler is not None else d_log
        rows.append({"model": model_name, "sampler": sampler_name, "nfe": args.sample_steps,
                     "train_steps": log["steps"], "mnist_fd": m["mnist_fd"], "fid": m["fid"],
                     "sample_seconds": t_sample,
                     "grid": f"{args.name}_samples_{tag}.png"})
        print(f"[quality] {model_name} / {sampler_name}: MNIST-FD {m['mnist_fd']:.3f}  FID {m['fid']:.2f}", flush=True)
    return rows, info


# ------------------------------------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 2 min), writes train_quick.*")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock per recipe")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", choices=("scaled", "recipe"), default="scaled")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--fd-samples", type=int, default=2000)
    p.add_argument("--fd-ref", type=int, default=2000)
    p.add_argument("--fid-samples", type=int, default=500)
    p.add_argument("--fid-ref", type=int, default=1000)
    p.add_argument("--tp-warmup", type=int, default=2)
    p.add_argument("--tp-windows", type=int, default=3)
    p.add_argument("--tp-steps", type=int, default=2)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (figures are per-thread-count)")
    a = p.parse_args(argv)
    a.name = "train_quick" if a.quick else "train"
    if a.quick:
        a.minutes, a.fd_samples, a.fd_ref, a.fid_samples, a.fid_ref = 0.05, 16, 64, 4, 8
        a.tp_warmup, a.tp_windows, a.tp_steps = 1, 2, 1
    return a


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    tp, q, qinfo = [], [], {}
    if not args.skip_throughput:
        tp = throughput(args)
    if not args.skip_quality:
        q, qinfo = quality(args)
    info = machine_info()
    head_tp = ["simdiff net", "params", "img/s", "diffusers UNet2DModel", "params", "img/s", "speed-up"]
    rows_tp = [[r["simdiff"], str(r["simdiff_params"]), r["simdiff_img_s"], str(tuple(r["diffusers_channels"])),
                str(r["diffusers_params"]), r["diffusers_img_s"], f"{r['speedup']:.2f}x"] for r in tp]
    head_q = ["trained model", "sampler", "NFE", "train steps", "MNIST-FD", "FID"]
    rows_q = [[r["model"], r["sampler"], str(r["nfe"]), str(r["train_steps"]), r["mnist_fd"], r["fid"]] for r in q]
    for h, rows in ((head_tp, rows_tp), (head_q, rows_q)):
        if rows:
            print("\n" + table_text(h, rows))
    threads = torch.get_num_threads()
    md = [f"### Training: simdiff vs diffusers ({'quick smoke run' if args.quick else 'CPU'})", "",
          f"{info['date']}; {info['platform']}, {info['cpu_count']} CPUs, **{threads} torch thread(s), CPU only** "
          f"(another job used the other core); torch {info['torch']}, diffusers {info['diffusers']}.",
          f"Command: `OMP_NUM_THREADS={threads} {command_line()}`", ""]
    if rows_tp:
        md += [f"Training throughput, batch {args.batch}, 1x28x28, forward + backward + clip + AdamW, median of "
               f"{args.tp_windows} windows x {args.tp_steps} steps after {args.tp_warmup} warm-up steps. The diffusers "
               "UNet2DModel (example layout: ResNet levels, attention at 14x14 and 7x7, 2 layers per block) has its "
               "widths searched to the closest parameter count.", "", table_markdown(head_tp, rows_tp), ""]
    if rows_q:
        s, d = qinfo["simdiff_train"], qinfo["diffusers_train"]
        md += [f"Quality at equal wall-clock: {args.minutes:g} min of training each, unconditional, batch "
               f"{args.batch}, MNIST train+valid. simdiff recipe (mnist.yaml residual U-ViT, {s['params']} params): "
               f"{s['steps']} steps, warm-up {s['warmup_steps']}; diffusers DDPM recipe (UNet2DModel "
               f"{tuple(d['channels'])}, "
               f"{d['params']} params): {d['steps']} steps, warm-up {d['warmup_steps']} (warm-up policy "
               f"`{args.warmup}`). MNIST-FD: {args.fd_samples} samples vs {args.fd_ref} MNIST test images; FID "
               f"(Inception): the first {args.fid_samples} of them vs {args.fid_ref} test images (small-sample FID "
               "is biased upwards; compare rows, not with published numbers). Grids: "
               + ", ".join(f"`results/{r['grid']}`" for r in q) + ".", "", table_markdown(head_q, rows_q), ""]
    write_text(f"{args.name}.md", "\n".join(md))
    write_json(args.name, {"machine": info, "command": command_line(), "threads": threads, "args": vars(args),
                           "throughput": tp, "quality": q, "quality_info": qinfo})
    print(f"\nwrote {RESULTS_DIR / (args.name + '.json')} and .md", flush=True)


if __name__ == "__main__":
    main()
