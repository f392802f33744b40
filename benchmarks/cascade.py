"""Cascade (14x14 base -> 14 -> 28 super-resolution) vs a single-stage 28x28 model at an equal training budget, and
the noise-conditioning-augmentation level at sampling (the ablation of Ho et al. 2022, "Cascaded Diffusion Models",
sec. 4.3, and Imagen, Saharia et al. 2022, sec. 4.4).

Rows, all on MNIST with the recipes of ``simdiff/configs/mnist_14.yaml`` (base; its network is also the single-stage
model, at 28x28) and ``simdiff/configs/mnist_sr.yaml`` (super-resolution):

* single-stage: class-conditional 28x28 model trained for ``--steps`` x ``--batch`` images;
* cascade: the 14x14 base model trained for ``round(--base-frac * steps)`` steps and the super-resolution model for
  the rest, the same batch, so both arms see the same number of training images (not the same FLOPs: a 14x14 step
  is cheaper; the train seconds are in the table).

Budget-dependent settings are scaled alike: warm-up ``min(recipe, steps // 10)``, checkpoint only at the end.
Scores at 28x28 on ``--num-eval`` class-conditional samples (classes cycling 0..9, ``--sampler`` with
``--sample-steps`` steps, no guidance) against test-split images: MNIST-classifier Frechet distance and class
accuracy, plus Inception FID / KID (x 1e3) with ``--fid``. Augmentation ablation: the cascade sampled at each of
``--augs`` (``none`` = no corruption) and the super-resolution model on real test images downsampled to 14x14; the
column "low-res MSE" is ``mean (area(x_28) - x_14)^2``, how closely the output follows its low-res input.

Run (CPU, small)::

    nice -n 10 python benchmarks/cascade.py --steps 200 --batch 32 --num-eval 200 --threads 1

Writes ``benchmarks/results/<name>.{json,md}`` (``--name``, default ``cascade``) and ``docs/gallery/cascade.png``
(rows: base 14x14 sample upsampled, cascade output at each augmentation level). Runs go under ``--run-dir``
(default ``/tmp/cascade_bench``); a rerun with the same settings resumes training instead of redoing it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "simdiff" / "configs"
MAIN_HEADER = ["model", "steps x batch", "train s", "MNIST-FD", "accuracy", "FID", "KID x1e3", "sample s"]
AUG_HEADER = ["input", "aug log-SNR", "MNIST-FD", "accuracy", "low-res MSE", "FID", "KID x1e3"]


def _common(args, steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.batch_size={args.batch}",
            f"train.optim.warmup_steps={min(200, steps // 10)}",
            f"train.checkpoint_every={steps}", "train.sample_every=0", "train.log_every=25", "train.progress=false",
            f"train.seed={args.seed}", f"train.device={args.device}", "sample.num=10", "sample.steps=5"]


def _train(args, name: str, steps: int) -> tuple[Path, float]:
    from simdiff.cascade import load_sr_config, train_sr
    from simdiff.experiment import load_config, train

    run = Path(args.run_dir) / f"{name}_{steps}x{args.batch}"
    start = time.perf_counter()
    if name == "sr":
        cfg, sr = load_sr_config(CONFIGS / "mnist_sr.yaml", _common(args, steps))
        train_sr(cfg, sr, run)
    elif name == "base":
        train(load_config(CONFIGS / "mnist_14.yaml", _common(args, steps)), run)
    else:  # the single-stage model: the base recipe at 28x28
        over = ["data.image_size=28", "name=mnist_28", "diffusion.schedule.image_size=28"]
        train(load_config(CONFIGS / "mnist_14.yaml", [*_common(args, steps), *over]), run)
    return run, time.perf_counter() - start


def _scores(args, x: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor, key: str) -> dict[str, float]:
    from simdiff.eval import evaluate_samples

    metrics = ("mnist_fd", "accuracy") + (("fid", "kid") if args.fid else ())
    if labels is None:
        metrics = tuple(m for m in metrics if m != "accuracy")
    return evaluate_samples(x, ref, metrics=metrics, labels=labels, reference_key=key, progress=False,
                            device=args.device, kid_subset_size=min(1000, len(x)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps of each arm (cascade: split)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--base-frac", type=float, default=0.5, help="share of the cascade's steps for the base model")
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--augs", nargs="+", default=["none", "6", "4", "2", "0", "-2"])
    p.add_argument("--fid", action="store_true", help="also Inception FID / KID (slow on a CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="/tmp/cascade_bench")
    p.add_argument("--name", default="cascade")
    p.add_argument("--gallery", default=str(ROOT / "docs" / "gallery" / "cascade.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from simdiff.cascade import downsample, load_cascade, load_sr, sample_cascade, sample_sr
    from simdiff.generate import SampleConfig, generate
    from simdiff.images import save_grid
    from simdiff.runs import class_null_cond, load_model, reference_images

    t0 = time.perf_counter()
    base_steps = max(1, round(args.base_frac * args.steps))
    single, t_single = _train(args, "single", args.steps)
    base, t_base = _train(args, "base", base_steps)
    sr_run, t_sr = _train(args, "sr", args.steps - base_steps)
    augs = [None if a.lower() == "none" else float(a) for a in args.augs]

    loaded = load_model(single)
    ref, key = reference_images(loaded.config, max(args.num_eval, 1000))
    n = args.num_eval
    labels = torch.arange(n) % 10
    scfg = SampleConfig(sampler=args.sampler, steps=args.sample_steps, num=n, seed=args.seed, batch_size=100)
    start = time.perf_counter()
    x_single = generate(loaded.model, loaded.schedule, loaded.image_shape, scfg, labels=labels, num_classes=10,
                        null_cond=class_null_cond(10))
    s_single = time.perf_counter() - start
    rows = [["single-stage 28x28", f"{args.steps}x{args.batch}", t_single,
             *_row(_scores(args, x_single, labels, ref, key)), s_single]]

    spec = {"name": "bench", "num": n, "seed": args.seed, "stages": [
        {"source": str(base), "sampler": args.sampler, "steps": args.sample_steps},
        {"source": str(sr_run), "sampler": args.sampler, "steps": args.sample_steps}]}
    yml = Path(args.run_dir) / "cascade.yaml"
    yml.write_text(yaml.safe_dump(spec))
    cascade = load_cascade(yml)
    default_aug = cascade.stages[1].aug_logsnr
    start = time.perf_counter()
    low, x_cascade = sample_cascade(cascade, labels=labels, return_stages=True)
    s_cascade = time.perf_counter() - start
    rows.append([f"cascade 14 -> 28 (aug {default_aug})", f"{base_steps}+{args.steps - base_steps}x{args.batch}",
                 t_base + t_sr, *_row(_scores(args, x_cascade, labels, ref, key)), s_cascade])

    aug_rows, gallery = [], [torch.nn.functional.interpolate(low[:10], size=(28, 28), mode="nearest")]
    real = ref[:n]
    real_low = downsample(real, 14)
    srm = load_sr(sr_run)
    sr_cfg = SampleConfig(sampler=args.sampler, steps=args.sample_steps, num=n, seed=args.seed, batch_size=100)
    for a in augs:
        x = sample_cascade(cascade, labels=labels, aug_logsnr=a)
        sc = _scores(args, x, labels, ref, key)
        mse = float((downsample(x, 14) - low).pow(2).mean())
        aug_rows.append(["cascade (base samples)", "none" if a is None else a, sc.get("mnist_fd"), sc.get("accuracy"),
                         mse, sc.get("fid"), _kid(sc)])
        gallery.append(x[:10])
        y = sample_sr(srm.model, srm.schedule, real_low, sr_cfg, aug_logsnr=a)
        sc = _scores(args, y, None, ref, key)
        mse = float((downsample(y, 14) - real_low).pow(2).mean())
        aug_rows.append(["SR of real 14x14 test digits", "none" if a is None else a, sc.get("mnist_fd"), None, mse,
                         sc.get("fid"), _kid(sc)])
    save_grid(torch.cat(gallery), args.gallery, nrow=10, scale=2)

    total = time.perf_counter() - t0
    text = (f"Cascade vs single stage at an equal budget of training images ({args.steps} steps x {args.batch}); "
            f"{n} samples, {args.sampler} {args.sample_steps} steps per stage\n"
            + table_text(MAIN_HEADER, rows) + "\n\nAugmentation level at sampling\n" + table_text(AUG_HEADER, aug_rows))
    print(text)
    md = (f"**Cascade vs single stage** ({args.steps} steps x {args.batch} images each arm; {n} samples)\n\n"
          + table_markdown(MAIN_HEADER, rows) + "\n\n**Noise-conditioning augmentation level at sampling**\n\n"
          + table_markdown(AUG_HEADER, aug_rows) + f"\n\nWall-clock of the whole script: {total:.0f} s.\n")
    write_text(f"{args.name}.md", md)
    write_json(args.name, {"command": command_line(), "machine": machine_info(), "main": rows,
                                      "augmentation": aug_rows, "header": MAIN_HEADER, "aug_header": AUG_HEADER,
                                      "seconds": total, "args": vars(args)})
    return 0


def _kid(sc: dict[str, float]) -> float | None:
    return None if sc.get("kid") is None else 1e3 * sc["kid"]


def _row(sc: dict[str, float]) -> list[float | None]:
    return [sc.get("mnist_fd"), sc.get("accuracy"), sc.get("fid"), _kid(sc)]


if __name__ == "__main__":
    sys.exit(main())
