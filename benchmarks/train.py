"""simdiff vs diffusers training: the same architecture's speed, the Trainer's own overhead, and recipes at equal time.

Sections (``--section``, default ``arch overhead``; ``recipe`` is long and must be asked for):

* ``arch``: **the same architecture in both libraries.** simdiff's :class:`~simdiff.nets.unet.UNet` and diffusers'
  ``UNet2DModel`` configured alike: the same channels per level, 2 ResNet blocks per level down and 3 up,
  strided-conv downsampling and nearest + conv upsampling, scale-shift time conditioning, GroupNorm(32), self-
  attention (head width 32) at the same resolutions plus in the middle block. Both are trained by the same step
  code (noise, forward, eps-MSE, backward, clip 1.0, foreach AdamW) on the same batch; images/s is the median of
  timed windows that alternate between the two libraries (so load from other processes hits both alike), after
  warm-up steps. Parameter counts are reported side by side (they differ only in the time-embedding MLP and the
  attention projections' layout).
* ``overhead``: the :class:`~simdiff.train.Trainer` around a small U-Net (steps/s from ``metrics.csv``), optionally
  also for another source tree (``--baseline-src``, e.g. an export of an earlier commit) to compare the loop itself.
* ``recipe``: **a recipe comparison, not a library speed-up.** Quality at equal wall-clock of simdiff's MNIST
  recipe (``simdiff/configs/mnist.yaml``: residual U-ViT, v-prediction, sigmoid loss, shifted cosine schedule, AdamW
  5e-4 + cosine decay, EMA in images with ramp-up) against diffusers' unconditional-training example recipe
  (``UNet2DModel`` sized to the same parameter count, DDPM linear betas, eps-MSE, AdamW 1e-4, EMAModel). The two
  recipes differ in network, objective, schedule and optimiser settings at once, so the table says which recipe
  reaches which score in the same minutes, not which library is faster. Learning-rate decays need a step count:
  both extrapolate the total from the steps/s so far. ``--warmup recipe`` keeps 200 / 500 warm-up steps;
  ``scaled`` (default) caps each at 10% of the projected steps. Sampling with 50 network evaluations: simdiff
  UniPC and DDIM (uniform-t grid); diffusers DDIMScheduler (trailing). Scores: MNIST Frechet distance (classifier
  features) and Inception FID vs MNIST test images.

Run: ``python benchmarks/train.py [--section arch overhead recipe] [--threads 1]``. Writes
``benchmarks/results/train.{json,md}`` (arch + overhead) and ``train_recipe.{json,md}`` (recipe, with sample grids
``train_samples_*.png``); ``--out NAME`` writes ``NAME.*``, ``NAME_recipe.*`` and ``NAME_samples_*.png`` instead, so
the runs of a study keep their own files, and ``--fid-samples 0`` scores MNIST-FD only. ``--quick`` is a smoke run
writing ``train_quick*`` files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.nets import count_parameters  # noqa: E402
from simdiff.train import EMA, BatchIterator, ema_decay, lr_at  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "simdiff" / "configs" / "mnist.yaml"
SHAPE = (1, 28, 28)
EMA_RAMPUP = 0.1  # simdiff EDM-style EMA ramp-up ratio used at minute-scale budgets (mnist.yaml sets none)

#: The same-architecture layouts: (label, channels per level, attention levels (0 = 28x28)).
LAYOUTS = (
    ("U-Net (32, 64, 128), attention at 7x7 + middle", (32, 64, 128), (2,)),
    ("U-Net (64, 128, 128), attention at 14x14, 7x7 + middle", (64, 128, 128), (1, 2)),
)
HEAD_DIM = 32


# ------------------------------------------------------------------------------------------- same architecture
def simdiff_unet(channels: tuple[int, ...], attention: tuple[int, ...]):
    """simdiff's U-Net backbone (unconditional) for 1x28x28 with ``channels`` and ``attention`` levels."""
    from simdiff.nets.unet import UNet, UNetConfig

    cfg = UNetConfig(channels=channels, num_res_blocks=2, attention_levels=attention,
                     num_heads=max(channels[lv] for lv in attention) // HEAD_DIM, mid_attention=True)
    return UNet(cfg, image_channels=SHAPE[0], image_size=SHAPE[1], num_classes=0)


def diffusers_same_unet(channels: tuple[int, ...], attention: tuple[int, ...]):
    """diffusers' ``UNet2DModel`` with the layout of :func:`simdiff_unet` (blocks, channels, attention levels)."""
    from diffusers import UNet2DModel

    n = len(channels)
    down = tuple("AttnDownBlock2D" if lv in attention else "DownBlock2D" for lv in range(n))
    up = tuple("AttnUpBlock2D" if lv in attention else "UpBlock2D" for lv in reversed(range(n)))
    return UNet2DModel(sample_size=SHAPE[1], in_channels=SHAPE[0], out_channels=SHAPE[0], layers_per_block=2,
                       block_out_channels=channels, down_block_types=down, up_block_types=up, norm_num_groups=32,
                       attention_head_dim=HEAD_DIM, resnet_time_scale_shift="scale_shift", add_attention=True)


def make_step(model, kind: str, x: torch.Tensor, seed: int = 0):
    """One training step of ``model`` on ``x``, identical outside the network for both libraries: noise at a
    cosine level, forward, eps-MSE, backward, clip 1.0, foreach AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(seed)

    def step() -> None:
        eps = torch.randn(x.shape, generator=gen)
        t = torch.rand(x.shape[0], generator=gen).clamp(1e-3, 1 - 1e-3)
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        if kind == "simdiff":
            out = model(z, 2 * torch.log(alpha / sigma))  # conditioned on log-SNR
        else:
            out = model(z, t * 999).sample  # conditioned on a (continuous) timestep
        F.mse_loss(out, eps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def same_architecture(args) -> list[dict[str, Any]]:
    """images/s of both libraries on each layout, alternating timed windows."""
    x = torch.rand((args.batch, *SHAPE), generator=torch.Generator().manual_seed(1)) * 2 - 1
    rows = []
    for label, chans, attn in LAYOUTS[: 1 if args.quick else None]:
        torch.manual_seed(0)
        models = {"simdiff": simdiff_unet(chans, attn).train(), "diffusers": diffusers_same_unet(chans, attn).train()}
        with torch.no_grad():  # same input and output shapes
            t = torch.full((2,), 0.5)
            assert models["simdiff"](x[:2], t).shape == models["diffusers"](x[:2], t).sample.shape == x[:2].shape
        steps = {k: make_step(m, k, x) for k, m in models.items()}
        for k in steps:
            for _ in range(args.warmup_steps):
                steps[k]()
        rates: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.windows):
            for k in steps:
                t0 = time.perf_counter()
                for _ in range(args.window_steps):
                    steps[k]()
                rates[k].append(args.batch * args.window_steps / (time.perf_counter() - t0))
        row = {"layout": label, "channels": list(chans), "attention_levels": list(attn),
               "simdiff_params": count_parameters(models["simdiff"]),
               "diffusers_params": count_parameters(models["diffusers"]),
               "simdiff_img_s": statistics.median(rates["simdiff"]),
               "diffusers_img_s": statistics.median(rates["diffusers"]), "windows": rates,
               "simdiff_best_img_s": max(rates["simdiff"]), "diffusers_best_img_s": max(rates["diffusers"])}
        row["ratio"] = row["simdiff_img_s"] / row["diffusers_img_s"]
        rows.append(row)
        print(f"[arch] {label}: simdiff {row['simdiff_params']} params {row['simdiff_img_s']:.1f} img/s | diffusers "
              f"{row['diffusers_params']} params {row['diffusers_img_s']:.1f} img/s | x{row['ratio']:.2f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- trainer overhead
OVERHEAD_SNIPPET = r"""
import json, math, statistics, sys, tempfile, torch
import simdiff
from simdiff.nets.unet import UNet, UNetConfig
from simdiff.train import BatchIterator, OptimConfig, TrainConfig, Trainer
from simdiff.train.logging import read_metrics
steps, batch, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
net = UNet(UNetConfig(channels=(16, 32), attention_levels=(1,), num_heads=2), image_channels=1, image_size=16,
           num_classes=0)
data = {"x": torch.rand(512, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1}

def loss_fn(model, b, g):
    x = b["x"]
    eps = torch.randn(x.shape, generator=g)
    lam = torch.rand(x.shape[0], generator=g) * 16 - 8
    a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    pred = model(a[:, None, None, None] * x + s[:, None, None, None] * eps, lam)
    return (pred - eps).pow(2).flatten(1).mean(1)

cfg = TrainConfig(steps=steps, batch_size=batch, seed=0, optim=OptimConfig(lr=1e-4, warmup_steps=10),
                  ema_half_life_images=5000.0, checkpoint_every=0, log_every=10, progress=False, device="cpu")
with tempfile.TemporaryDirectory() as d:
    Trainer(net, loss_fn, BatchIterator(data, batch, seed=0), cfg, d).fit()
    rates = [float(r["images_per_s"]) / batch for r in read_metrics(d + "/metrics.csv")][1:]
print(json.dumps({"src": simdiff.__file__, "steps_per_s": statistics.median(rates), "windows": rates}))
"""


def trainer_overhead(args) -> list[dict[str, Any]]:
    """Trainer steps/s (median over 10-step log windows after the first) on this tree and ``--baseline-src``."""
    rows = []
    trees = [("this tree", None)] + ([(args.baseline_label, args.baseline_src)] if args.baseline_src else [])
    for label, src in trees:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if src:
            env["PYTHONPATH"] = str(Path(src).resolve())
        cmd = [sys.executable, "-c", OVERHEAD_SNIPPET, str(args.overhead_steps), "16", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"tree": label, "source": src or str(ROOT), **res})
        print(f"[overhead] {label}: {res['steps_per_s']:.2f} steps/s ({res['src']})", flush=True)
    return rows


# ------------------------------------------------------------------- the diffusers recipe network (recipe section)
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


def _ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


# ------------------------------------------------------------------------------ recipes at equal wall-clock
def _warmup(recipe_steps: int, projected: int, policy: str) -> int:
    return recipe_steps if policy == "recipe" else max(1, min(recipe_steps, projected // 10))


def _projected(step: int, elapsed: float, budget: float) -> int:
    """Total steps expected at the budget from the rate so far (before any step: a large placeholder)."""
    return max(step + 1, int(step * budget / elapsed)) if step > 0 and elapsed > 0 else 10**9


def recipe_config(args):
    """The simdiff recipe's config: ``--recipe-config`` (default mnist.yaml) with ``--set`` overrides, unconditional."""
    from simdiff.experiment import load_config

    return load_config(args.recipe_config, [*args.set, "model.class_conditional=false"])


def train_simdiff(data: BatchIterator, budget_s: float, policy: str, seed: int, cfg) -> tuple[Any, Any, dict]:
    """The simdiff recipe ``cfg`` (unconditional) for ``budget_s`` seconds; returns (EMA model, schedule, log)."""
    from simdiff.experiment import build_network
    from simdiff.losses import DiffusionLoss

    torch.manual_seed(seed)
    model = build_network(cfg, image_shape=SHAPE, num_classes=10).train()  # unconditional by the config switch
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
        ema.update(model, ema_decay(data.batch_size, tr.ema_half_life_images, images_seen=step * data.batch_size,
                                    rampup_ratio=EMA_RAMPUP if tr.ema_rampup_ratio is None else tr.ema_rampup_ratio))
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
    from simdiff.eval import evaluate_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fd = evaluate_samples(x, refs["fd"][0], metrics=("mnist_fd",), reference_key=refs["fd"][1], progress=False)
        fid = (evaluate_samples(x[:n_fid], refs["fid"][0], metrics=("fid",), reference_key=refs["fid"][1],
                                progress=False) if n_fid > 0 else {"fid": math.nan})
    return {**fd, **fid}


def quality(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    budget = args.minutes * 60.0
    from simdiff.data import build_dataset
    from simdiff.experiment import build_network

    train = build_dataset({"name": "mnist", "split": "train+valid"})
    n_ref = max(args.fd_ref, args.fid_ref)
    test = build_dataset({"name": "mnist", "split": "test", "limit": n_ref + args.fd_samples}).images
    refs = {"fd": (test[: args.fd_ref], f"bench-mnist-test-first{args.fd_ref}"),
            "fid": (test[: args.fid_ref], f"bench-mnist-test-first{args.fid_ref}")}
    cfg = recipe_config(args)
    info: dict[str, Any] = {"budget_minutes": args.minutes, "warmup_policy": args.warmup,
                            "recipe_config": str(args.recipe_config), "overrides": list(args.set)}
    rows = []
    if args.floor:  # real held-out digits (after the reference images) scored exactly like the samples
        real = test[n_ref: n_ref + args.fd_samples]
        m = score(real, refs, args.fid_samples)
        rows.append({"model": "real test digits (the floor)", "sampler": "-", "nfe": 0, "train_steps": 0,
                     "mnist_fd": m["mnist_fd"], "fid": m["fid"], "sample_seconds": 0.0, "grid": None})
        print(f"[quality] floor: MNIST-FD {m['mnist_fd']:.3f}  FID {m['fid']:.2f}", flush=True)

    print(f"[quality] training simdiff recipe ({Path(args.recipe_config).name} {' '.join(args.set)}) for "
          f"{args.minutes} min", flush=True)
    s_model, schedule, s_log = train_simdiff(BatchIterator({"x": train.images}, args.batch, seed=args.seed),
                                             budget, args.warmup, args.seed, cfg)
    print(f"[quality] simdiff: {s_log}", flush=True)
    info["simdiff_train"] = {**s_log, "params": count_parameters(s_model)}
    runs = [("simdiff recipe", f"{name}, {args.grid}", name) for name in args.samplers]
    if not args.skip_diffusers:
        recipe_params = count_parameters(build_network(cfg, image_shape=SHAPE, num_classes=10))
        _, _, chans = matched_diffusers(recipe_params)
        width, mults = _WIDTH_MULTS[chans]
        print(f"[quality] training diffusers recipe for {args.minutes} min", flush=True)
        d_model, d_log = train_diffusers(BatchIterator({"x": train.images}, args.batch, seed=args.seed), budget,
                                         args.warmup, args.seed, width, mults)
        print(f"[quality] diffusers: {d_log}", flush=True)
        info["diffusers_train"] = {**d_log, "params": count_parameters(d_model), "channels": list(chans)}
        runs.append(("diffusers DDPM recipe", "DDIMScheduler, trailing", None))

    from simdiff.generate import SampleConfig, generate
    from simdiff.images import save_grid

    for model_name, sampler_name, sampler in runs:
        t0 = time.perf_counter()
        with torch.no_grad():
            if sampler is None:
                x = sample_diffusers(d_model, args.fd_samples, args.sample_steps, args.seed)
            else:
                scfg = SampleConfig(sampler=sampler, steps=args.sample_steps, grid=args.grid, num=args.fd_samples,
                                    seed=args.seed, batch_size=250)
                x = generate(s_model, schedule, SHAPE, scfg)
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


def recipe_comparison(args, info: dict[str, Any], threads: int) -> None:
    """Run the recipe comparison and write ``<name>_recipe.{json,md}``."""
    q, qinfo = quality(args)
    floor = next((r for r in q if r["grid"] is None), None)
    fid = args.fid_samples > 0
    head_q = (["recipe", "sampler", "NFE", "train steps", "MNIST-FD"] + (["FID"] if fid else [])
              + ([("FID" if fid else "MNIST-FD") + " / floor"] if floor else []))
    key = "fid" if fid else "mnist_fd"
    rows_q = [[r["model"], r["sampler"], str(r["nfe"]), str(r["train_steps"]), r["mnist_fd"]]
              + ([r["fid"]] if fid else []) + ([f"{r[key] / floor[key]:.2f}x"] if floor else []) for r in q]
    print("\n" + table_text(head_q, rows_q))
    s = qinfo["simdiff_train"]
    md = _header(info, threads, "Recipes at equal wall-clock (a recipe comparison, not a library speed-up)")
    text = (f"{args.minutes:g} min of training each, unconditional, batch {args.batch}, MNIST train+valid. simdiff "
            f"recipe ({Path(args.recipe_config).name}{' with ' + ', '.join(args.set) if args.set else ''}, "
            f"{s['params']} params): {s['steps']} steps, warm-up {s['warmup_steps']}")
    if "diffusers_train" in qinfo:
        d = qinfo["diffusers_train"]
        text += (f"; diffusers DDPM recipe (UNet2DModel {tuple(d['channels'])}, {d['params']} params): {d['steps']} "
                 f"steps, warm-up {d['warmup_steps']} (warm-up policy `{args.warmup}`). The recipes differ in network, "
                 "objective, schedule and optimiser at once")
    text += f". MNIST-FD: {args.fd_samples} samples vs {args.fd_ref} MNIST test images"
    if fid:
        text += (f"; FID (Inception): the first {args.fid_samples} of them vs {args.fid_ref} test images (small-sample "
                 "FID is biased upwards; compare rows, not with published numbers)")
    if floor:
        text += (f". The floor: {args.fd_samples} real test digits that follow the reference images, scored the same "
                 "way")
    text += ". Grids: " + ", ".join(f"`benchmarks/results/{r['grid']}`" for r in q if r["grid"]) + "."
    md += [text, "", table_markdown(head_q, rows_q), ""]
    write_text(f"{args.name}_recipe.md", "\n".join(md))
    write_json(f"{args.name}_recipe", {"machine": info, "command": command_line(), "threads": threads,
                                       "args": vars(args), "quality": q, "quality_info": qinfo})


# ------------------------------------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", nargs="+", choices=("arch", "overhead", "recipe"), default=["arch", "overhead"])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds), writes train_quick*")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (figures are per-thread-count)")
    p.add_argument("--warmup-steps", type=int, default=3, help="arch: untimed steps per library")
    p.add_argument("--windows", type=int, default=6, help="arch: timed windows per library")
    p.add_argument("--window-steps", type=int, default=5, help="arch: steps per timed window")
    p.add_argument("--overhead-steps", type=int, default=120)
    p.add_argument("--baseline-src", default=None, help="overhead: a source tree holding another simdiff package")
    p.add_argument("--baseline-label", default="baseline", help="overhead: how to name --baseline-src in the table")
    p.add_argument("--minutes", type=float, default=10.0, help="recipe: training wall-clock per recipe")
    p.add_argument("--warmup", choices=("scaled", "recipe"), default="scaled")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--fd-samples", type=int, default=2000)
    p.add_argument("--fd-ref", type=int, default=2000)
    p.add_argument("--fid-samples", type=int, default=500, help="recipe: samples scored by FID (0: MNIST-FD only)")
    p.add_argument("--fid-ref", type=int, default=1000)
    p.add_argument("--recipe-config", default=str(RECIPE), help="recipe: the simdiff config to train (unconditional)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe: override a value of --recipe-config, e.g. train.optim.lr=1e-3 (repeatable)")
    p.add_argument("--samplers", nargs="+", default=["unipc", "ddim"], help="recipe: simdiff samplers to score")
    p.add_argument("--grid", default="uniform_t", help="recipe: simdiff step grid")
    p.add_argument("--skip-diffusers", action="store_true", help="recipe: train and score the simdiff recipe only")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="recipe: skip the real-digits floor row (held-out test digits vs the same reference)")
    p.add_argument("--out", default=None, help="results file stem under benchmarks/results/ (default train, or "
                   "train_quick with --quick): a study's runs do not overwrite each other")
    a = p.parse_args(argv)
    a.name = a.out or ("train_quick" if a.quick else "train")
    if a.quick:
        a.minutes, a.fd_samples, a.fd_ref, a.fid_samples, a.fid_ref = 0.05, 16, 64, 4, 8
        a.batch, a.warmup_steps, a.windows, a.window_steps, a.overhead_steps = 8, 1, 2, 1, 30
    return a


def _header(info: dict[str, Any], threads: int, what: str) -> list[str]:
    return [f"### {what}", "",
            f"{info['date']}; {info['platform']}, {info['cpu_count']} CPUs (shared with other jobs), "
            f"**{threads} torch thread(s), CPU only**; torch {info['torch']}, diffusers {info['diffusers']}.",
            f"Command: `OMP_NUM_THREADS={threads} {command_line()}`", ""]


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    info, threads = machine_info(), torch.get_num_threads()
    arch = same_architecture(args) if "arch" in args.section else []
    over = trainer_overhead(args) if "overhead" in args.section else []
    if arch or over:
        md = _header(info, threads, "Training step: the same architecture in simdiff and diffusers (CPU)")
        if arch:
            head = ["layout (1x28x28)", "simdiff params", "diffusers params", "simdiff img/s", "diffusers img/s",
                    "simdiff / diffusers", "best window simdiff", "best window diffusers"]
            rows = [[r["layout"], str(r["simdiff_params"]), str(r["diffusers_params"]), r["simdiff_img_s"],
                     r["diffusers_img_s"], f"{r['ratio']:.2f}x", r["simdiff_best_img_s"], r["diffusers_best_img_s"]]
                    for r in arch]
            print("\n" + table_text(head, rows))
            md += [f"Batch {args.batch}; one step = noise + forward + eps-MSE + backward + clip + foreach AdamW, the "
                   "same code for both; median of "
                   f"{args.windows} timed windows x {args.window_steps} steps per library (windows alternate between "
                   f"the libraries) after {args.warmup_steps} warm-up steps; the best window is the least disturbed "
                   "by other load on the shared machine. Same blocks, channels, attention resolutions (head width "
                   "32), scale-shift conditioning, batch and image size.", "",
                   table_markdown(head, rows), ""]
        if over:
            head = ["Trainer source", "steps/s"]
            rows = [[r["tree"], r["steps_per_s"]] for r in over]
            print("\n" + table_text(head, rows))
            md += [f"Trainer loop on a small U-Net ((16, 32), 16x16, batch 16, EMA on), {args.overhead_steps} "
                   "steps, median steps/s over 10-step log windows after the first:", "",
                   table_markdown(head, rows), ""]
        write_text(f"{args.name}.md", "\n".join(md))
        write_json(args.name, {"machine": info, "command": command_line(), "threads": threads, "args": vars(args),
                               "same_architecture": arch, "trainer_overhead": over})
        print(f"\nwrote {RESULTS_DIR / (args.name + '.json')} and .md", flush=True)
    if "recipe" in args.section:
        recipe_comparison(args, info, threads)


if __name__ == "__main__":
    main()
