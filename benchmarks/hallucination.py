"""Hallucination scores by trajectory variance (Aithal et al. 2024) on the mode-interpolation toys and on MNIST.

Toys (``simdiff.detect.toys``): a 1-D mixture of three Gaussians at -1, 0, 1 (std 0.05) and 2-D 3x3 and 5x5 grids of
Gaussians on [-1, 1]^2 (std 0.05; modes 20 and 10 standard deviations apart). A residual MLP (``MLPDenoiser``,
v-output) is trained with the v-weighted denoising loss on fresh mixture samples, then ``--num`` samples are drawn
with each sampler of ``--samplers`` (``--steps`` steps, cosine schedule, "uniform_t" grid). A sample is out of
support when it is more than 4 standard deviations (Mahalanobis) from every mode. The score of a sample is the
variance of its x-prediction over the last K sampler steps (``simdiff.detect.TrajectoryVariance``); the tables give
the out-of-support rate, the AUROC of the score for "out of support", and what dropping the samples above a score
quantile removes and keeps. The exact mixture denoiser is the reference row (its out-of-support samples come from
the sampler's discretisation only).

MNIST: ``--mnist-num`` samples of the shipped model (its own sampler and steps, classes cycling 0..9, seed 0) with
scores for each K of ``--mnist-lasts``; the grid PNG shows the most suspicious (top rows) and least suspicious
(bottom rows). Without ground truth for "hallucinated digit", the MNIST classifier's confidence (max softmax) stands
in: its mean over the most and least suspicious 10%, and the AUROC of the score for "confidence < 0.9"; and the rank
correlation of the score with the amount of ink (mean brightness), a confound.

Run (one thread)::

    nice -n 10 python benchmarks/hallucination.py
    nice -n 10 python benchmarks/hallucination.py --skip-toys --name hallucination_mnist   # the MNIST part only

Writes ``benchmarks/results/hallucination.{json,md}``, ``docs/gallery/hallucination_toy.png`` and
``docs/gallery/hallucination_mnist.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.detect import auroc, filter_table  # noqa: E402
from simdiff.detect.toys import grid_mixture, line_mixture, out_of_support, train_toy_denoiser  # noqa: E402
from simdiff.samplers import get_sampler, make_grid  # noqa: E402
from simdiff.schedules import get_schedule  # noqa: E402

GALLERY = Path(__file__).resolve().parent.parent / "docs" / "gallery"
QUANTILES = (0.8, 0.9, 0.95)


def run_sampler(name: str, denoise, z: torch.Tensor, grid: torch.Tensor, lasts: tuple[int, ...], seed: int, **opts):
    """Samples and, per K of ``lasts``, the trajectory variance (all x-predictions kept once, K sliced after)."""
    xs: list[torch.Tensor] = []
    if name in ("ddpm", "sde"):
        opts["generator"] = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = get_sampler(name)(denoise, z, grid, callback=lambda d: xs.append(d["x"].double()), **opts)
    traj = torch.stack(xs)
    scores = {k: traj[-k:].var(0, unbiased=False).reshape(z.shape[0], -1).mean(1) for k in lasts}
    return x, scores


def toy_rows(name: str, gm, net, args, lasts) -> tuple[list[list], list[dict], dict]:
    sched = get_schedule("cosine")
    grid = make_grid(sched, args.steps)
    z = torch.randn(args.num, gm.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    rows, filt, keep = [], [], {}
    for den_name, den in (("trained MLP", net), ("exact denoiser", gm.denoise)):
        for sampler in args.samplers:
            t0 = time.time()
            x, scores = run_sampler(sampler, den, z, grid, lasts, args.seed + 2)
            out = out_of_support(gm, x)
            rate = float(out.double().mean())
            for k in lasts:
                au = auroc(scores[k], out) if 0 < int(out.sum()) < out.numel() else float("nan")
                rows.append([name, den_name, sampler, k, rate, au, time.time() - t0])
                if k == args.last and int(out.sum()) > 0:
                    for r in filter_table(scores[k], out, QUANTILES):
                        filt.append({"toy": name, "denoiser": den_name, "sampler": sampler, "K": k, **r})
            if den_name == "trained MLP" and sampler == args.samplers[0]:
                keep = {"x": x, "out": out, "score": scores[args.last]}
    return rows, filt, keep


def toy_figure(panels: list[tuple[str, object, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    for ax, (title, gm, d) in zip(axes, panels):
        x, out, s = d["x"].float(), d["out"], d["score"]
        thr = float(torch.quantile(s, 0.9))
        drop = s > thr
        if gm.dim == 1:
            bins = torch.linspace(-1.4, 1.4, 141)
            ax.hist(x[:, 0].numpy(), bins=bins.numpy(), color="0.6", label="all samples")
            ax.hist(x[~drop, 0].numpy(), bins=bins.numpy(), color="tab:blue", alpha=0.8,
                    label="kept (score <= 90% quantile)")
            ax.set_yscale("log")
            ax.set_xlabel("x")
        else:
            ax.scatter(x[~drop, 0], x[~drop, 1], s=1, c="tab:blue", label="kept")
            ax.scatter(x[drop, 0], x[drop, 1], s=2, c="tab:red", label="removed (top 10% score)")
            ax.scatter(gm.means[:, 0], gm.means[:, 1], s=12, marker="x", c="k", label="modes")
            ax.set_aspect("equal")
        rm = float((drop & out).sum() / max(int(out.sum()), 1))
        ax.set_title(f"{title}: {float(out.double().mean()):.1%} out of support,\n"
                     f"top-10% filter removes {rm:.0%} of them")
        ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no tie correction; the scores are continuous)."""
    ra, rb = (torch.argsort(torch.argsort(v)).double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def mnist_part(args) -> dict:
    from simdiff.cli import PRETRAINED
    from simdiff.eval.mnist import MNISTFeatures
    from simdiff.images import save_grid
    from simdiff.runs import load_model

    loaded = load_model(PRETRAINED)
    cfg = loaded.config.sample
    lasts = sorted(set(args.mnist_lasts) | {args.mnist_last})
    labels = torch.arange(args.mnist_num) % loaded.num_classes
    grid = make_grid(loaded.schedule, cfg.steps, kind=cfg.grid)
    gen = torch.Generator().manual_seed(cfg.seed)
    xs, scores = [], {k: [] for k in lasts}
    t0 = time.time()
    for start in range(0, args.mnist_num, 250):
        n = min(250, args.mnist_num - start)
        z = torch.randn((n, *loaded.image_shape), generator=gen)
        with torch.inference_mode():
            x, sc = run_sampler(cfg.sampler, loaded.model, z, grid, tuple(lasts), start,
                                cond={"labels": labels[start: start + n]})
        xs.append(x.clamp(-1, 1))
        for k in lasts:
            scores[k].append(sc[k])
    wall = time.time() - t0
    x = torch.cat(xs)
    scores = {k: torch.cat(v) for k, v in scores.items()}
    s = scores[args.mnist_last]
    conf = torch.softmax(MNISTFeatures("cpu").logits(x), 1).max(1).values
    order = torch.argsort(s, descending=True)
    tenth = max(1, args.mnist_num // 10)
    low = conf < 0.9
    save_grid(torch.cat([x[order[:20]], x[order.flip(0)[:20]]]), GALLERY / "hallucination_mnist.png", nrow=10,
              scale=2)
    ink = ((x + 1) / 2).reshape(x.shape[0], -1).mean(1).double()  # fraction of the image lit
    per_k = []
    for k in lasts:
        o = torch.argsort(scores[k], descending=True)
        per_k.append({"K": k, "ink_rank_corr": rank_corr(scores[k], ink),
                      "conf_most_suspicious_10pct": float(conf[o[:tenth]].mean()),
                      "conf_least_suspicious_10pct": float(conf[o[-tenth:]].mean()),
                      "auroc_conf_below_0.9": auroc(scores[k], low) if 0 < int(low.sum()) < low.numel()
                      else float("nan")})
    return {"sampler": cfg.sampler, "steps": cfg.steps, "K": args.mnist_last, "num": args.mnist_num, "per_K": per_k,
            "wall_s": wall, "conf_most_suspicious_10pct": float(conf[order[:tenth]].mean()),
            "conf_least_suspicious_10pct": float(conf[order[-tenth:]].mean()), "conf_all": float(conf.mean()),
            "frac_conf_below_0.9": float(low.double().mean()),
            "auroc_conf_below_0.9": auroc(s, low) if 0 < int(low.sum()) < low.numel() else float("nan"),
            "score_median": float(s.median()), "score_max": float(s.max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=20000, help="toy samples per row")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--last", type=int, default=10, help="K of the filtering table")
    p.add_argument("--lasts", type=int, nargs="+", default=[3, 10, 30])
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--mnist-num", type=int, default=500)
    p.add_argument("--mnist-last", type=int, default=5, help="K of the MNIST picture")
    p.add_argument("--mnist-lasts", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="hallucination")
    p.add_argument("--skip-toys", action="store_true", help="MNIST only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lasts = tuple(sorted(set(args.lasts) | {args.last}))
    t_start = time.time()
    toys = [("1-D, 3 modes", line_mixture(3, std=0.05), {"hidden": 64, "depth": 2}),
            ("2-D, 3x3 grid", grid_mixture(3, std=0.05), {"hidden": 128, "depth": 3}),
            ("2-D, 5x5 grid", grid_mixture(5, std=0.05), {"hidden": 128, "depth": 3})]
    rows, filt, panels, train_s = [], [], [], {}
    for name, gm, net_kw in [] if args.skip_toys else toys:
        t0 = time.time()
        net = train_toy_denoiser(gm, steps=args.train_steps, seed=args.seed, **net_kw)
        train_s[name] = time.time() - t0
        r, f, keep = toy_rows(name, gm, net, args, lasts)
        rows += r
        filt += f
        panels.append((name, gm, keep))
    GALLERY.mkdir(parents=True, exist_ok=True)
    if panels:
        toy_figure(panels, GALLERY / "hallucination_toy.png")
    mnist = mnist_part(args) if args.mnist_num > 0 else {}

    h1 = ["toy", "denoiser", "sampler", "K", "out-of-support rate", "AUROC (score -> out)", "sample s"]
    h2 = ["toy", "denoiser", "sampler", "drop above quantile", "kept", "out-of-support removed", "in-support kept",
          "out rate after"]
    r2 = [[f["toy"], f["denoiser"], f["sampler"], f["quantile"], f["kept"], f["out_removed"], f["in_kept"],
           f["out_rate_after"]] for f in filt]
    h3 = ["samples", "sampler/steps", "K", "conf. most susp. 10%", "conf. least susp. 10%", "conf. all",
          "AUROC (score -> conf < 0.9)", "rank corr. with ink"]
    r3 = [[mnist["num"], f"{mnist['sampler']}/{mnist['steps']}", r["K"], r["conf_most_suspicious_10pct"],
           r["conf_least_suspicious_10pct"], mnist["conf_all"], r["auroc_conf_below_0.9"], r["ink_rank_corr"]]
          for r in mnist.get("per_K", [])]
    parts = ([table_text(h1, rows), table_text(h2, r2)] if rows else []) + ([table_text(h3, r3)] if r3 else [])
    text = "\n\n".join(parts)
    print(text)
    wall = time.time() - t_start
    md = ((f"Toys: {args.num} samples per row, {args.steps} steps, MLP trained {args.train_steps} steps "
           f"({', '.join(f'{k}: {v:.0f} s' for k, v in train_s.items())}). Filtering table at K = {args.last}.\n\n"
           + table_markdown(h1, rows) + "\n\n" + table_markdown(h2, r2) if rows else "")
          + ("\n\nMNIST (shipped model):\n\n" + table_markdown(h3, r3) if r3 else "")
          + f"\n\nWall-clock {wall:.0f} s, {args.threads} thread(s). Command: `{command_line()}`\n")
    write_text(f"{args.name}.md", md)
    write_json(args.name, {"machine": machine_info(), "command": command_line(), "args": vars(args),
                           "wall_s": wall, "train_s": train_s, "rows": [dict(zip(h1, r)) for r in rows],
                           "filter": filt, "mnist": mnist})
    print(f"wrote {RESULTS_DIR / (args.name + '.md')} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
