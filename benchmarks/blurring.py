"""Blurring diffusion vs standard diffusion at an equal training budget, the same network and the same recipe.

Blurring diffusion (Hoogeboom & Salimans, ICLR 2023, "Blurring Diffusion Models") dissipates the signal per DCT
frequency (heat equation plus noise); with ``sigma_B_max = 0`` its per-frequency coefficient ``d_t(k)`` is 1 and the
process is standard (isotropic, variance-preserving) diffusion: the test suite checks loss, one reverse step and a
whole sampling run against the isotropic process to 1e-12, so the ``sigma_B_max = 0`` row is the control. It runs
through the same DCT code path as the blurred rows, so only the process differs between rows.

Every row takes the data set's blurring config (``simdiff/configs/mnist_blur.yaml`` or ``fashion_blur.yaml``:
class-conditional residual U-ViT, v-prediction, sigmoid loss, shifted cosine schedule, AdamW + cosine decay, EMA)
with ``diffusion.process.sigma_B_max`` set to the row's value, and the same budget in **images seen**
(``--steps`` x ``--batch``, not wall-clock, so that load from other processes does not bias the comparison), the
same training seed (same initial weights and batches), and the same sampling seed. Budget-dependent settings are
scaled for every row alike: the warm-up is ``min(recipe, steps // 10)`` steps and the EMA half-life is capped at 10%
of the images seen (``train.ema_rampup_ratio = 0.1``) so that a short run's EMA does not average in its first
steps; the learning-rate decay follows ``--steps``.

Scores, on ``--num-eval`` class-conditional samples (classes cycling 0..9; ``--sampler`` with ``--sample-steps``
steps, no guidance) against as many test-split images: Inception FID, KID (x 1e3) and k-NN precision / recall
(k = 3, Inception features), plus for MNIST the MNIST-classifier Frechet distance and class accuracy
(``simdiff.runs.evaluate_model``). One PNG holds a sample row per setting (classes 0..9, same seed in every row).

Run (CPU, small)::

    nice -n 10 python benchmarks/blurring.py --datasets mnist --sigmas 0 20 --steps 300 --batch 64 --num-eval 1000

and at paper-like scale on a GPU: ``--device cuda --steps 20000 --batch 256 --num-eval 10000 --threads 8``.
Checkpoints go under ``--run-dir`` (default ``/tmp/blur_bench``, outside the repository); a finished row is not
retrained when the script is run again with the same settings (the trainer resumes from its last checkpoint),
nor re-scored (its timing and scores are stored in its run directory; ``--rescore`` recomputes the scores), so a
sweep can be extended by running again with more ``--sigmas``.
Writes ``benchmarks/results/<name>.{json,md}`` (``--name``, default ``blurring``) after every row, and
``<name>_grid.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.configuration import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"mnist": ROOT / "simdiff" / "configs" / "mnist_blur.yaml",
           "fashion_mnist": ROOT / "simdiff" / "configs" / "fashion_blur.yaml"}
HEADER = ["data", "sigma_B_max", "steps x batch", "train s", "loss", "FID", "KID x1e3", "precision", "recall",
          "MNIST-FD", "accuracy", "eval s"]


def overrides(args: argparse.Namespace, sigma: float, recipe_warmup: int) -> list[str]:
    """The ``a.b=value`` overrides of one row: the process's ``sigma_B_max`` plus the shared budget settings."""
    return [f"diffusion.process.sigma_B_max={sigma}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.seed={args.seed}", f"train.device={args.device}", f"train.optim.warmup_steps="
            f"{min(recipe_warmup, args.steps // 10)}", "train.ema_rampup_ratio=0.1", "train.sample_every=0",
            f"train.checkpoint_every={args.steps}", "train.keep_last=1", f"train.log_every={max(1, args.steps // 20)}",
            f"train.progress={str(args.progress).lower()}", *args.set]


def data_available(cfg) -> str | None:
    """``None`` when the config's data set loads, else a one-line reason."""
    from simdiff.data import build_dataset

    try:
        build_dataset(dataclasses.replace(cfg.data, limit=16))
    except (ConfigError, ValueError, OSError) as e:
        return str(e).splitlines()[0]
    return None


def run_row(args: argparse.Namespace, data: str, sigma: float) -> tuple[dict[str, Any], torch.Tensor]:
    """Train (or resume) one setting, score it, and sample its grid row."""
    from simdiff.experiment import load_config, load_model, train
    from simdiff.generate import generate
    from simdiff.runs import class_null_cond, evaluate_model

    base = load_config(CONFIGS[data])
    cfg = load_config(CONFIGS[data], overrides(args, sigma, base.train.optim.warmup_steps))
    run_dir = Path(args.run_dir) / f"{data}_sB{sigma:g}_{args.steps}x{args.batch}_seed{args.seed}"
    done = run_dir / "trained.json"
    if done.exists():  # an earlier run of this row finished training: reuse its checkpoint and timing
        summary = json.loads(done.read_text())
    else:
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, resume=True)
        summary = {"images_seen": summary.get("images_seen"), "loss": summary.get("loss"),
                   "train_s": time.perf_counter() - t0}
        done.write_text(json.dumps(summary))
    train_s = summary["train_s"]
    loaded = load_model(run_dir, device=args.device)
    sample_cfg = dataclasses.replace(cfg.sample, sampler=args.sampler, steps=args.sample_steps, seed=args.seed,
                                     guidance=0.0)
    metrics = ("mnist_fd", "fid", "kid", "precision_recall", "accuracy") if data == "mnist" else \
        ("fid", "kid", "precision_recall")
    cached = run_dir / f"scores_{args.sampler}{args.sample_steps}_n{args.num_eval}_seed{args.seed}.json"
    if cached.exists() and not args.rescore:  # written by an earlier run of this row with the same evaluation
        scores = json.loads(cached.read_text())
        eval_s = scores.pop("eval_s")
    else:
        t0 = time.perf_counter()
        scores = evaluate_model(loaded, sample_cfg, num=args.num_eval, metrics=metrics, device=args.device,
                                progress=args.progress)
        eval_s = time.perf_counter() - t0
        cached.write_text(json.dumps({**scores, "eval_s": eval_s}))
    labels = torch.arange(10) % max(loaded.num_classes, 1) if loaded.num_classes > 0 else None
    row = generate(loaded.model, loaded.schedule, loaded.image_shape, sample_cfg, num=10, labels=labels,
                   num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes), device=args.device,
                   progress=False, process=loaded.process)
    result = {"data": data, "sigma_B_max": sigma, "steps": args.steps, "batch": args.batch,
              "images_seen": int(summary.get("images_seen", args.steps * args.batch)), "train_s": train_s,
              "final_loss": summary.get("loss"), "eval_s": eval_s, "run_dir": str(run_dir), **scores}
    return result, row.cpu()


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    def g(r, k, scale=1.0):
        v = r.get(k)
        return None if v is None else float(v) * scale

    return [[r["data"], f"{r['sigma_B_max']:g}", f"{r['steps']} x {r['batch']}", g(r, "train_s"), g(r, "final_loss"),
             g(r, "fid"), g(r, "kid", 1e3), g(r, "precision"), g(r, "recall"), g(r, "mnist_fd"), g(r, "accuracy"),
             g(r, "eval_s")] for r in results]


def write_results(args, info, results, skipped, grid_path) -> None:
    rows = table_rows(results)
    budget = (f"{args.steps} steps x batch {args.batch} = {args.steps * args.batch} images seen per model "
              f"(equal images, not equal wall-clock), training seed {args.seed}")
    md = [f"### Blurring vs standard diffusion ({info['date']})", "",
          f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, "
          f"{info['torch_threads']} torch thread(s), device `{args.device}`.", "",
          f"Command: `{command_line()}`", "", f"Budget: {budget}. Scores on {args.num_eval} samples "
          f"({args.sampler}, {args.sample_steps} steps, no guidance) vs {args.num_eval} test images; "
          "`sigma_B_max = 0` is standard diffusion (the control). `train s`: training wall-clock including data "
          "loading; `loss`: the last logged training-loss window (not comparable across `sigma_B_max`, whose "
          "targets differ); KID x 1e3.", "", table_markdown(HEADER, rows)]
    md += [""] + [f"- {d}: skipped ({why})" for d, why in skipped]
    if grid_path is not None:
        order = ", ".join(f"{r['data']} sigma_B_max={r['sigma_B_max']:g}" for r in results)
        md += ["", f"Sample grid `{grid_path.name}`, one row per setting (classes 0..9), top to bottom: {order}."]
    write_text(f"{args.name}.md", "\n".join(md))
    write_json(args.name, {"machine": info, "command": command_line(), "budget": budget, "args": vars(args),
                           "results": results, "skipped": [{"data": d, "reason": w} for d, w in skipped]})
    print(table_text(HEADER, rows), flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=sorted(CONFIGS))
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 5.0, 20.0],
                   help="sigma_B_max values (0 = standard diffusion, the control)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model")
    p.add_argument("--batch", type=int, default=64, help="batch size (budget = steps x batch images per model)")
    p.add_argument("--num-eval", type=int, default=1000, help="samples (and test images) per score")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (the same for every row)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ... (training, sampling and scoring)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--run-dir", default="/tmp/blur_bench", help="scratch directory for checkpoints")
    p.add_argument("--name", default="blurring", help="result file stem under benchmarks/results/")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides a.b=value for every row")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--rescore", action="store_true",
                   help="re-evaluate rows whose scores an earlier run stored in their run directory")
    args = p.parse_args(argv)
    for k in ("steps", "batch", "num_eval", "sample_steps", "threads"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if any(s < 0 for s in args.sigmas):
        p.error("--sigmas must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from simdiff.experiment import load_config
    from simdiff.images import save_grid

    info = machine_info()
    results: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    rows: list[torch.Tensor] = []
    grid_path = None
    for data in args.datasets:
        why = data_available(load_config(CONFIGS[data]))
        if why is not None:
            print(f"[blurring] {data}: data set not available, skipped ({why})", flush=True)
            skipped.append((data, why))
            continue
        for sigma in args.sigmas:
            print(f"[blurring] {data}, sigma_B_max = {sigma:g}: training {args.steps} x {args.batch}", flush=True)
            result, row = run_row(args, data, sigma)
            results.append(result)
            rows.append(row)
            grid_path = save_grid(torch.cat(rows), RESULTS_DIR / f"{args.name}_grid.png", nrow=10, scale=2)
            write_results(args, info, results, skipped, grid_path)
    if not results:
        write_results(args, info, results, skipped, grid_path)


if __name__ == "__main__":
    main()
