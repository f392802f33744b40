"""Cascade (low-resolution base model -> 2x super-resolution) vs a single-stage model at the final size, at an equal
training budget, and the noise-conditioning-augmentation level at sampling (the ablation of Ho et al. 2022,
"Cascaded Diffusion Models", sec. 4.3, and Imagen, Saharia et al. 2022, sec. 4.4).

``--data`` picks the data set and its recipes (:data:`DATA`):

* ``mnist`` (default): ``simdiff/configs/mnist_14.yaml`` (class-conditional 14x14 base; its network is also the
  single-stage model, at 28x28) and ``simdiff/configs/mnist_sr.yaml`` (14 -> 28 super-resolution);
* ``photos``: RGB patches of natural photos (data set ``photos``, 32x32 patches on a stride-16 grid),
  ``simdiff/configs/photos_16.yaml`` (unconditional 16x16 base; the single-stage model is its recipe at 32x32) and
  ``simdiff/configs/photos_sr.yaml`` (16 -> 32 super-resolution).

Rows:

* single-stage: the base recipe at the final size, trained for ``--steps`` x ``--batch`` images;
* cascade: the base model trained for ``round(--base-frac * steps)`` steps and the super-resolution model for
  the rest, the same batch, so both arms see the same number of training images (not the same FLOPs: a base step
  is cheaper; the train seconds are in the table).

Budget-dependent settings are scaled alike: warm-up ``min(recipe, steps // 10)``, checkpoint only at the end.
Scores at the final size on ``--num-eval`` samples (``--sampler`` with ``--sample-steps`` steps, no guidance)
against test-split images. MNIST: class-conditional samples (classes cycling 0..9), MNIST-classifier Frechet
distance and class accuracy, plus Inception FID / KID (x 1e3) with ``--fid``; the reference is the first
``max(--num-eval, 1000)`` test digits. Photos: unconditional samples, Inception FID / KID (x 1e3) always (no
classifier applies); the reference is all 1434 32x32 patches of the two test photos (chelsea, china). ``--num-ref``
sets the reference count (the first images of the test split). Augmentation ablation: the cascade sampled at each
of ``--augs`` (``none`` = no corruption) and the super-resolution model on real test images downsampled to the base
size (MNIST: the first ``--num-eval`` test digits; photos: ``--num-eval`` patches spread evenly over the reference,
which is ordered by photo); the column "low-res MSE" is ``mean (down(x) - x_low)^2`` with the super-resolution
model's own downsampling, how closely the output follows its low-res input.

Run (CPU, small)::

    nice -n 10 python benchmarks/cascade.py --steps 200 --batch 32 --num-eval 200 --threads 1
    nice -n 10 python benchmarks/cascade.py --data photos --steps 200 --batch 32 --num-eval 200 --threads 1

Writes ``<results-dir>/<name>.{json,md}`` (``--results-dir``, default ``benchmarks/results``; ``--name``, default
``cascade``, ``cascade_photos`` for photos) and ``docs/gallery/cascade.png`` (``cascade_photos.png``; ``--gallery``)
with rows: base sample upsampled, cascade output at each augmentation level. Runs go under ``--run-dir`` (default
``/tmp/cascade_bench``; photo runs are named ``photos_*``); a rerun with the same settings resumes training instead
of redoing it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    machine_info,
    table_markdown,
    table_text,
    write_json,
    write_text,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "simdiff" / "configs"


@dataclass(frozen=True)
class Data:
    """What the benchmark does differently per data set."""

    base: str  # base-model config; its recipe at ``size`` is the single-stage model
    sr: str  # super-resolution config
    low: int  # base-model resolution
    size: int  # final resolution
    classifier: tuple[str, ...]  # domain-classifier metrics, always computed (Inception FID / KID: with --fid)
    inception: bool  # Inception FID / KID always computed
    reference: int | None  # reference images: at least this many (None: the whole test split)
    ordered: bool  # the reference is ordered by source photo: real low-res inputs are spread over it
    items: str  # what a test image is, for row labels
    name: str  # default results name and gallery file
    runs: str  # prefix of the run directories under --run-dir
    title: str = ""  # added to the table titles


DATA = {
    "mnist": Data("mnist_14.yaml", "mnist_sr.yaml", 14, 28, ("mnist_fd", "accuracy"), False, 1000, False, "digits",
                  "cascade", ""),
    "photos": Data("photos_16.yaml", "photos_sr.yaml", 16, 32, (), True, None, True, "patches", "cascade_photos",
                   "photos_", " on photo patches"),
}
COLUMNS = {"mnist_fd": "MNIST-FD", "accuracy": "accuracy", "fid": "FID", "kid": "KID x1e3"}


def headers(data: Data) -> tuple[list[str], list[str]]:
    """The main table's and the augmentation table's column names."""
    scores = [COLUMNS[m] for m in data.classifier]
    return (["model", "steps x batch", "train s", *scores, "FID", "KID x1e3", "sample s"],
            ["input", "aug log-SNR", *scores, "low-res MSE", "FID", "KID x1e3"])




def _common(args, steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.batch_size={args.batch}",
            f"train.optim.warmup_steps={min(200, steps // 10)}",
            f"train.checkpoint_every={steps}", "train.sample_every=0", "train.log_every=25", "train.progress=false",
            f"train.seed={args.seed}", f"train.device={args.device}", "sample.num=10", "sample.steps=5"]


def _train(args, data: Data, name: str, steps: int) -> tuple[Path, float]:
    from simdiff.cascade import load_sr_config, train_sr
    from simdiff.experiment import load_config, train

    run = Path(args.run_dir) / f"{data.runs}{name}_{steps}x{args.batch}"
    start = time.perf_counter()
    if name == "sr":
        cfg, sr = load_sr_config(CONFIGS / data.sr, _common(args, steps))
        train_sr(cfg, sr, run)
    elif name == "base":
        train(load_config(CONFIGS / data.base, _common(args, steps)), run)
    else:  # the single-stage model: the base recipe at the final size
        s = data.size
        over = [f"data.image_size={s}", f"name={args.data}_{s}", f"diffusion.schedule.image_size={s}"]
        train(load_config(CONFIGS / data.base, [*_common(args, steps), *over]), run)
    return run, time.perf_counter() - start


def _scores(args, data: Data, x: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor, key: str
            ) -> dict[str, float]:
    from simdiff.eval import evaluate_samples

    metrics = data.classifier + (("fid", "kid") if args.fid or data.inception else ())
    if labels is None:
        metrics = tuple(m for m in metrics if m != "accuracy")
    return evaluate_samples(x, ref, metrics=metrics, labels=labels, reference_key=key, progress=False,
                            device=args.device, kid_subset_size=min(1000, len(x)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(DATA), default="mnist", help="data set and recipes (see DATA)")
    p.add_argument("--steps", type=int, default=200, help="training steps of each arm (cascade: split)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--base-frac", type=float, default=0.5, help="share of the cascade's steps for the base model")
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--num-ref", type=int, default=None,
                   help="reference images, the first of the test split (default: MNIST max(--num-eval, 1000), "
                        "photos all 1434 test patches)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--augs", nargs="+", default=["none", "6", "4", "2", "0", "-2"])
    p.add_argument("--fid", action="store_true", help="also Inception FID / KID on MNIST (slow on a CPU; photos: "
                                                      "always)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="/tmp/cascade_bench")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where <name>.json and <name>.md go")
    p.add_argument("--name", default=None, help="results name (default: cascade; photos: cascade_photos)")
    p.add_argument("--gallery", default=None,
                   help="gallery PNG (default: docs/gallery/cascade.png; photos: docs/gallery/cascade_photos.png)")
    args = p.parse_args(argv)
    data = DATA[args.data]
    args.name = args.name or data.name
    args.gallery = args.gallery or str(ROOT / "docs" / "gallery" / f"{data.name}.png")
    torch.set_num_threads(args.threads)
    from simdiff.cascade import downsample, load_cascade, load_sr, sample_cascade, sample_sr
    from simdiff.generate import SampleConfig, generate
    from simdiff.images import save_grid
    from simdiff.runs import class_null_cond, load_model, reference_images

    t0 = time.perf_counter()
    main_header, aug_header = headers(data)
    base_steps = max(1, round(args.base_frac * args.steps))
    single, t_single = _train(args, data, "single", args.steps)
    base, t_base = _train(args, data, "base", base_steps)
    sr_run, t_sr = _train(args, data, "sr", args.steps - base_steps)
    augs = [None if a.lower() == "none" else float(a) for a in args.augs]

    loaded = load_model(single)
    num_ref = args.num_ref if args.num_ref is not None else (
        None if data.reference is None else max(args.num_eval, data.reference))
    ref, key = reference_images(loaded.config, num_ref)
    n, classes = args.num_eval, loaded.num_classes
    labels = torch.arange(n) % classes if classes else None
    scfg = SampleConfig(sampler=args.sampler, steps=args.sample_steps, num=n, seed=args.seed, batch_size=100)
    start = time.perf_counter()
    x_single = generate(loaded.model, loaded.schedule, loaded.image_shape, scfg, labels=labels, num_classes=classes,
                        null_cond=class_null_cond(classes))
    s_single = time.perf_counter() - start

    def row(sc: dict[str, float]) -> list[float | None]:
        return [*(sc.get(m) for m in data.classifier), sc.get("fid"), _kid(sc)]

    rows = [[f"single-stage {data.size}x{data.size}", f"{args.steps}x{args.batch}", t_single,
             *row(_scores(args, data, x_single, labels, ref, key)), s_single]]

    spec = {"name": "bench", "num": n, "seed": args.seed, "stages": [
        {"source": str(base), "sampler": args.sampler, "steps": args.sample_steps},
        {"source": str(sr_run), "sampler": args.sampler, "steps": args.sample_steps}]}
    yml = Path(args.run_dir) / f"{data.runs}cascade.yaml"
    yml.write_text(yaml.safe_dump(spec))
    cascade = load_cascade(yml)
    default_aug = cascade.stages[1].aug_logsnr
    start = time.perf_counter()
    low, x_cascade = sample_cascade(cascade, labels=labels, return_stages=True)
    s_cascade = time.perf_counter() - start
    rows.append([f"cascade {data.low} -> {data.size} (aug {default_aug})",
                 f"{base_steps}+{args.steps - base_steps}x{args.batch}", t_base + t_sr,
                 *row(_scores(args, data, x_cascade, labels, ref, key)), s_cascade])

    size = (data.size, data.size)
    aug_rows, gallery = [], [torch.nn.functional.interpolate(low[:10], size=size, mode="nearest")]
    srm = load_sr(sr_run)
    mode = srm.sr.downsample
    real = ref[torch.linspace(0, len(ref) - 1, n).round().long()] if data.ordered else ref[:n]
    real_low = downsample(real, data.low, mode=mode)
    sr_cfg = SampleConfig(sampler=args.sampler, steps=args.sample_steps, num=n, seed=args.seed, batch_size=100)
    for a in augs:
        x = sample_cascade(cascade, labels=labels, aug_logsnr=a)
        sc = _scores(args, data, x, labels, ref, key)
        mse = float((downsample(x, data.low, mode=mode) - low).pow(2).mean())
        aug_rows.append(["cascade (base samples)", "none" if a is None else a,
                         *(sc.get(m) for m in data.classifier), mse, sc.get("fid"), _kid(sc)])
        gallery.append(x[:10])
        y = sample_sr(srm.model, srm.schedule, real_low, sr_cfg, aug_logsnr=a)
        sc = _scores(args, data, y, None, ref, key)
        mse = float((downsample(y, data.low, mode=mode) - real_low).pow(2).mean())
        aug_rows.append([f"SR of real {data.low}x{data.low} test {data.items}", "none" if a is None else a,
                         *(sc.get(m) for m in data.classifier), mse, sc.get("fid"), _kid(sc)])
    save_grid(torch.cat(gallery), args.gallery, nrow=10, scale=2)

    total = time.perf_counter() - t0
    text = (f"Cascade vs single stage{data.title} at an equal budget of training images ({args.steps} steps x "
            f"{args.batch}); {n} samples, {args.sampler} {args.sample_steps} steps per stage\n"
            + table_text(main_header, rows) + "\n\nAugmentation level at sampling\n"
            + table_text(aug_header, aug_rows))
    print(text)
    md = (f"**Cascade vs single stage{data.title}** ({args.steps} steps x {args.batch} images each arm; {n} samples)"
          "\n\n" + table_markdown(main_header, rows) + "\n\n**Noise-conditioning augmentation level at sampling**\n\n"
          + table_markdown(aug_header, aug_rows) + f"\n\nWall-clock of the whole script: {total:.0f} s.\n")
    out = Path(args.results_dir)
    write_text(f"{args.name}.md", md, out)
    write_json(args.name, {"command": command_line(), "machine": machine_info(), "main": rows,
                           "augmentation": aug_rows, "header": main_header, "aug_header": aug_header,
                           "seconds": total, "args": vars(args)}, out)
    return 0


def _kid(sc: dict[str, float]) -> float | None:
    return None if sc.get("kid") is None else 1e3 * sc["kid"]


if __name__ == "__main__":
    sys.exit(main())
