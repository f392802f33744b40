"""Rolling diffusion vs standard video diffusion at an equal training budget, the same network and the same data.

Rolling diffusion (Ruhe, Heek, Salimans & Hoogeboom, ICML 2024, "Rolling Diffusion Models") gives later frames of a
window more noise and emits one frame per sweep; the baseline is standard video diffusion in the same code: the
same process class in its "uniform" phase (every future frame of the window at one noise level), trained with the
same objective, and rolled out autoregressively in chunks of ``R = W - c`` frames (:mod:`simdiff.video`). Both rows
of a data set take its config pair (``simdiff/configs/<data>_rolling.yaml`` / ``<data>_video.yaml``: windows of
``W = 6`` frames with ``c = 2`` clean context frames, the video_uvit backbone, v-prediction, sigmoid loss) with the
same ``--budget`` training steps of ``--batch`` windows, the same training seed (same initial weights and batches)
and, at test time, the same context frames, the same number of network calls per emitted frame (rolling:
``--steps`` per sweep; standard: ``R x --steps`` per chunk of ``R`` frames; DDIM, eta 0) and the same sampling seed.

Test data: ``--eval-num`` held-out sequences (split "test": other seeds, for Moving MNIST also the MNIST test
digits), each ``c`` context frames followed by ``--horizon`` ground-truth frames. Scores per lead time ``h`` (frames
after the context), averaged over sequences: MSE; for Kolmogorov flow also the vorticity correlation (Pearson, per
frame) and, over the last third of the horizon (where forecasts and truth have decorrelated), the energy-spectrum
error ``mean_k |log E_model(k) - log E_true(k)|`` over wavenumbers ``1 <= k < N / 2`` of the spectra averaged over
those frames and sequences (:func:`simdiff.data.kolmogorov.energy_spectrum`). "persistence" (repeat the last
context frame) is a reference row.

CPU run (20 minutes on one thread of 2 shared cores; the results in the repository; the configs' own budget is
600 steps)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/rolling.py --budget 300

GPU: ``--device cuda --budget 20000 --batch 64 --dim 256 --depth 8 --eval-num 64 --horizon 48 --threads 8``.
Writes ``benchmarks/results/<name>.{json,md,csv}``, ``<name>_<data>.png`` (scores vs lead time, spectra) and
``<name>_<data>_strip.png`` (ground truth, rolling and standard rollouts of one test sequence, frame by frame).
Trained rows are reused from ``--run-dir`` when run again with the same settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("kolmogorov", "moving_mnist")
METHODS = {"rolling": "_rolling.yaml", "standard": "_video.yaml"}


def overrides(args: argparse.Namespace) -> list[str]:
    """The budget settings shared by every row."""
    return [f"train.steps={args.budget}", f"train.batch_size={args.batch}", f"train.seed={args.seed}",
            f"train.device={args.device}", f"train.optim.warmup_steps={min(50, args.budget // 10)}",
            "train.ema_rampup_ratio=0.1", "train.sample_every=0", f"train.checkpoint_every={args.budget}",
            "train.keep_last=1", f"train.log_every={max(1, args.budget // 20)}",
            f"model.options.dim={args.dim}", f"model.options.depth={args.depth}",
            f"train.progress={str(args.progress).lower()}", *args.set]


def train_row(args: argparse.Namespace, data: str, method: str):
    from simdiff.experiment import load_config, load_model, train

    cfg = load_config(ROOT / "simdiff" / "configs" / f"{data}{METHODS[method]}", overrides(args))
    run_dir = Path(args.run_dir) / f"{data}_{method}_{args.budget}x{args.batch}_d{args.dim}x{args.depth}_s{args.seed}"
    done = run_dir / "trained.json"
    if done.exists():
        summary = json.loads(done.read_text())
    else:
        t0 = time.perf_counter()
        s = train(cfg, run_dir, resume=True)
        summary = {"images_seen": s.get("images_seen"), "loss": s.get("loss"), "train_s": time.perf_counter() - t0}
        done.write_text(json.dumps(summary))
    return load_model(run_dir, device=args.device), summary, run_dir


def test_sequences(args: argparse.Namespace, loaded) -> torch.Tensor:
    """``[eval_num, c + horizon, 1, H, W]`` held-out sequences with the run's data options."""
    from simdiff.data.video_sets import load_trajectories

    opts = dict(loaded.config.data.options)
    opts["trajectories" if loaded.config.data.name == "kolmogorov" else "sequences"] = args.eval_num
    opts["frames"] = loaded.process.context + args.horizon
    opts["window"] = min(opts.get("window", 1), opts["frames"])
    return load_trajectories(loaded.config.data.name, opts, split="test", progress=args.progress)


def plot(data: str, results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mse"] + (["corr", "spectrum"] if data == "kolmogorov" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, what in zip(axes[0], panels):
        for name, r in results.items():
            if what == "spectrum":
                if "spectrum_model" in r:
                    ax.loglog(np.arange(1, len(r["spectrum_model"])), r["spectrum_model"][1:], label=name)
                continue
            if what in r:
                ax.plot(np.arange(1, len(r[what]) + 1), r[what], marker=".", label=name)
        if what == "spectrum":
            truth = next(r for r in results.values() if "spectrum_true" in r)["spectrum_true"]
            ax.loglog(np.arange(1, len(truth)), truth[1:], "k--", label="ground truth")
            ax.set(xlabel="wavenumber k", ylabel="E(k), last third of horizon", title="energy spectrum")
        else:
            title = {"mse": "MSE", "corr": "vorticity correlation"}[what]
            ax.set(xlabel="lead time (frames)", ylabel=what, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data}: rolling vs standard video diffusion")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def strip(data: str, truth: torch.Tensor, rows: dict[str, torch.Tensor], path: Path, columns: int = 12) -> None:
    """One test sequence: ground truth, then each method, every ``ceil(H / columns)``-th frame."""
    from PIL import Image

    from simdiff.video import _strip_image, frames_to_rgb

    h = truth.shape[0]
    idx = list(range(0, h, max(1, -(-h // columns))))
    scale = max(1, 64 // truth.shape[-1])

    def rgb(x):
        return frames_to_rgb(x[idx], data=data).repeat(scale, -3).repeat(scale, -2)

    Image.fromarray(_strip_image([rgb(truth)] + [rgb(r) for r in rows.values()])).save(path)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--budget", type=int, default=300, help="training steps per model (the same for every row)")
    p.add_argument("--batch", type=int, default=16, help="windows per training step")
    p.add_argument("--dim", type=int, default=64, help="video_uvit width")
    p.add_argument("--depth", type=int, default=3, help="video_uvit blocks")
    p.add_argument("--eval-num", type=int, default=16, help="held-out test sequences")
    p.add_argument("--horizon", type=int, default=24, help="frames forecast after the context")
    p.add_argument("--steps", type=int, default=8, help="rolling: network calls per sweep (standard: R x this per "
                                                         "chunk of R frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--run-dir", default="/tmp/rolling_bench", help="scratch directory for checkpoints")
    p.add_argument("--name", default="rolling", help="result file stem under benchmarks/results/")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides a.b=value for every row")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from simdiff.video import forecast_scores as scores
    from simdiff.video import rollout

    args = parse(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    start = time.perf_counter()
    table, csv_rows, payload = [], [], {}
    for data in args.datasets:
        per_method: dict[str, dict[str, Any]] = {}
        rollouts: dict[str, torch.Tensor] = {}
        truth = None
        for method in METHODS:
            loaded, summary, run_dir = train_row(args, data, method)
            proc = loaded.process
            seqs = test_sequences(args, loaded)
            c, r = proc.context, proc.window - proc.context
            ctx, truth = seqs[:, :c], seqs[:, c:]
            steps = args.steps if method == "rolling" else r * args.steps
            mode = "rolling" if method == "rolling" else "uniform"
            g = torch.Generator(args.device).manual_seed(args.seed)
            t0 = time.perf_counter()
            pred = rollout(loaded.model, proc, context=ctx, frames=args.horizon, steps=steps, mode=mode,
                           sampler="ddim", generator=g, device=args.device, progress=args.progress)
            sample_s = time.perf_counter() - t0
            rollouts[method] = pred
            per_method[method] = {**scores(pred, truth, data), "train_s": summary["train_s"],
                                  "final_loss": summary.get("loss"), "sample_s": sample_s, "steps": steps,
                                  "run_dir": str(run_dir)}
            if method == "rolling":
                per_method["persistence"] = scores(ctx[:, -1:].expand_as(truth), truth, data)
            print(f"[{data}] {method}: train {summary['train_s']:.0f} s, rollout {sample_s:.0f} s", flush=True)
        plot(data, per_method, RESULTS_DIR / f"{args.name}_{data}.png")
        strip(data, truth[0], {m: rollouts[m][0] for m in METHODS}, RESULTS_DIR / f"{args.name}_{data}_strip.png")
        for name, res in per_method.items():
            mse = res["mse"]
            h = len(mse)
            marks = sorted({1, max(1, h // 4), max(1, h // 2), h})
            row = [data, name] + [mse[i - 1] for i in marks]
            row += [res["corr"][i - 1] for i in marks] if "corr" in res else [None] * len(marks)
            row += [res.get("spectrum_err"), res.get("train_s"), res.get("sample_s")]
            table.append(row)
            for i in range(h):
                csv_rows.append([data, name, i + 1, mse[i], res["corr"][i] if "corr" in res else ""])
        payload[data] = per_method
    marks_txt = [f"h={m}" for m in sorted({1, max(1, args.horizon // 4), max(1, args.horizon // 2), args.horizon})]
    header = (["data", "method"] + [f"MSE {m}" for m in marks_txt] + [f"corr {m}" for m in marks_txt]
              + ["spectrum err", "train s", "rollout s"])
    total = time.perf_counter() - start
    budget = (f"{args.budget} steps x {args.batch} windows per model, video_uvit dim {args.dim} depth {args.depth}, "
              f"seed {args.seed}; rollouts: {args.eval_num} test sequences, {args.horizon} frames, DDIM, "
              f"{args.steps} network calls per emitted frame")
    md = [f"### Rolling vs standard video diffusion ({info['date']})", "",
          f"Machine: {info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, {args.threads} torch "
          f"thread(s), device `{args.device}`. Wall-clock of the whole run: {total / 60:.1f} min.", "",
          f"Command: `{command_line()}`", "", f"Budget: {budget}.", "", table_markdown(header, table), "",
          "MSE / correlation at lead times h (frames after the 2 context frames); spectrum err: mean |log E(k) "
          "ratio| over the last third of the horizon (Kolmogorov). Per-lead-time curves: "
          f"`{args.name}.csv`, plots `{args.name}_<data>.png`, strips `{args.name}_<data>_strip.png` (rows: ground "
          "truth, rolling, standard)."]
    write_text(f"{args.name}.md", "\n".join(md))
    write_json(args.name, {"machine": info, "command": command_line(), "budget": budget, "args": vars(args),
                           "wall_s": total, "results": payload})
    with open(RESULTS_DIR / f"{args.name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["data", "method", "lead_time", "mse", "corr"])
        w.writerows(csv_rows)
    print(table_text(header, table), flush=True)
    print(f"total {total / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
