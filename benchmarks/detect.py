"""DIRE detection of generated MNIST digits (Wang et al. 2023): a CNN on reconstruction-error maps, its
training-free mean, and a CNN on raw pixels, tested on held-out images and on generators not seen in training.

Reconstruction model: the shipped model (``load_model('pretrained')``), null class, deterministic DDIM inversion and
reconstruction (``simdiff.invert``) on a ``--steps``-step "uniform_t" grid, ``2 * steps`` network calls per image.

Data (all 1x28x28 in [-1, 1]):

* real: the MNIST *test* split (not seen by the generator), the first ``--num-train`` images for training and the
  next ``--num-test`` held out;
* seen generator: the shipped model with its own sampler (UniPC, 20 steps, no guidance, classes cycling 0..9),
  ``--num-train`` images for training and ``--num-test`` held-out ones (other seed);
* unseen generators, ``--num-test`` images each, test only:
  "shipped, DDPM 50": the same network sampled with 50 ancestral DDPM steps (another sampler);
  "shipped, guided w=2": UniPC 20 with classifier-free guidance weight 2;
  "demo model": a different, smaller network (``--unseen-model``; by default the run of ``simdiff demo``: a
  0.85M-parameter U-ViT trained for ~4 minutes, UniPC 20), when the path exists.

Each detector is trained once on real-train vs seen-train (CNN: 30 epochs, AdamW, batch 64) and scored on the
real test images against each generated test set: AUROC, and accuracy at the threshold fitted on the training
set (logit 0 for the CNNs; the best training threshold for the training-free score).

Run (one thread)::

    nice -n 10 python benchmarks/detect.py
    nice -n 10 python benchmarks/detect.py --sweep 10:1 20:1 40:1 10:2 20:2 --name detect_sweep

``--sweep STEPS:ORDER ...`` measures only the training-free score (mean DIRE of ``--sweep-num`` real and generated
images) for each inversion setting and writes ``detect_sweep.{json,md}`` (with ``--name detect_sweep``).

Writes ``benchmarks/results/detect.{json,md}``, ``benchmarks/results/detect_maps.png`` (rows: real, DIRE of real,
generated, DIRE of generated) and ``benchmarks/results/detect_classifier.safetensors`` (for
``simdiff detect --method dire --classifier``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.cli import PRETRAINED  # noqa: E402
from simdiff.detect import (  # noqa: E402
    accuracy,
    auroc,
    best_threshold,
    classifier_scores,
    dire_maps,
    dire_score,
    save_classifier,
    train_classifier,
)
from simdiff.generate import generate  # noqa: E402
from simdiff.images import save_grid  # noqa: E402
from simdiff.runs import class_null_cond, load_model, reference_images  # noqa: E402
from simdiff.samplers import make_grid  # noqa: E402


def sample(loaded, num: int, seed: int, **changes) -> torch.Tensor:
    cfg = dataclasses.replace(loaded.config.sample, seed=seed, **changes)
    labels = torch.arange(num) % loaded.num_classes
    return generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, num=num, labels=labels,
                    num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes),
                    process=loaded.process)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-train", type=int, default=400, help="real and generated training images (each)")
    p.add_argument("--num-test", type=int, default=200, help="held-out images per set")
    p.add_argument("--steps", type=int, default=10, help="DIRE inversion / reconstruction steps")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--unseen-model", default="runs/demo", help="another model's run (skipped when absent)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="detect")
    p.add_argument("--sweep", nargs="+", metavar="STEPS:ORDER",
                   help="instead: the training-free score only, for each inversion setting (e.g. 10:1 20:1 40:1 10:2)")
    p.add_argument("--sweep-num", type=int, default=50, help="real and generated images of the sweep (each)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args)
    t_start = time.time()
    loaded = load_model(PRETRAINED)
    grid = make_grid(loaded.schedule, args.steps, kind="uniform_t")
    n_tr, n_te = args.num_train, args.num_test
    null = {"labels": torch.full((n_tr + n_te,), loaded.num_classes)}
    timing: dict[str, float] = {}

    def maps_of(x: torch.Tensor) -> torch.Tensor:
        t0 = time.time()
        m = dire_maps(loaded.model, x, grid, cond={"labels": null["labels"][: x.shape[0]]}, order=args.order)
        timing["dire s/img"] = (time.time() - t0) / x.shape[0]
        return m

    real, _ = reference_images(loaded.config, n_tr + n_te, split="test")
    real = real[: n_tr + n_te].float()
    sets = {"real": real}
    t0 = time.time()
    sets["seen"] = torch.cat([sample(loaded, n_tr, 0), sample(loaded, n_te, 1)])
    timing["sample s/img (UniPC 20)"] = (time.time() - t0) / (n_tr + n_te)
    unseen = {"shipped, DDPM 50": sample(loaded, n_te, 2, sampler="ddpm", steps=50),
              "shipped, guided w=2": sample(loaded, n_te, 3, guidance=2.0)}
    other = Path(args.unseen_model)
    if (other / "checkpoints").exists() or other.is_file():
        demo = load_model(other)
        unseen["demo model"] = sample(demo, n_te, 4)
    maps = {k: maps_of(v) for k, v in {**sets, **unseen}.items()}
    images = {**sets, **unseen}

    tr_gen, tr_real = maps["seen"][:n_tr], maps["real"][:n_tr]
    t0 = time.time()
    cnn = train_classifier(generated=tr_gen, real=tr_real, epochs=args.epochs, seed=0)
    raw = train_classifier(generated=images["seen"][:n_tr] + 1, real=images["real"][:n_tr] + 1,
                           epochs=args.epochs, seed=0)  # pixels shifted to [0, 2] (the scale is set from the mean)
    timing["train both CNNs s"] = time.time() - t0
    y_tr = torch.cat([torch.ones(n_tr), torch.zeros(n_tr)])
    free_thr = best_threshold(-dire_score(torch.cat([tr_gen, tr_real])), y_tr)

    test_sets = {"seen generator (held out)": "seen", **{f"unseen: {k}": k for k in unseen}}
    header = ["generated test set", "detector", "AUROC", "accuracy", "mean DIRE generated", "mean DIRE real"]
    rows = []
    real_te = slice(n_tr, n_tr + n_te)
    for label, key in test_sets.items():
        gen_te = slice(n_tr, n_tr + n_te) if key == "seen" else slice(0, n_te)
        y = torch.cat([torch.ones(n_te), torch.zeros(n_te)])
        m = torch.cat([maps[key][gen_te], maps["real"][real_te]])
        x = torch.cat([images[key][gen_te], images["real"][real_te]]) + 1
        mg, mr = float(dire_score(maps[key][gen_te]).mean()), float(dire_score(maps["real"][real_te]).mean())
        for det, s, thr in (("DIRE + CNN", classifier_scores(cnn, m), 0.0),
                            ("DIRE mean (training-free)", -dire_score(m), free_thr),
                            ("raw pixels + CNN", classifier_scores(raw, x), 0.0)):
            rows.append([label, det, auroc(s, y), accuracy(s, y, thr), mg, mr])
    text = table_text(header, rows)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    save_classifier(cnn, RESULTS_DIR / f"{args.name}_classifier.safetensors",
                    info={"model": "pretrained", "steps": args.steps, "grid": "uniform_t", "order": args.order,
                          "cond": "null class", "trained_on": f"{n_tr} MNIST test images vs {n_tr} UniPC-20 samples"})
    pics = [images["real"][:10], maps["real"][:10] * 2 - 1, images["seen"][:10], maps["seen"][:10] * 2 - 1]
    save_grid(torch.cat(pics).clamp(-1, 1), RESULTS_DIR / f"{args.name}_maps.png", nrow=10, scale=2)
    wall = time.time() - t_start
    md = (f"Reconstruction: shipped model, null class, DDIM inversion + reconstruction, {args.steps} steps "
          f"(uniform_t), order {args.order}. Train: {n_tr} real (MNIST test split) vs {n_tr} shipped-model samples; "
          f"test: {n_te} held-out real vs {n_te} per generated set.\n\n" + table_markdown(header, rows)
          + "\n\nTimes: " + ", ".join(f"{k} {v:.3g}" for k, v in timing.items())
          + f". Wall-clock {wall:.0f} s, {args.threads} thread(s). Command: `{command_line()}`\n")
    write_text(f"{args.name}.md", md)
    write_json(args.name, {"machine": machine_info(), "command": command_line(), "args": vars(args), "wall_s": wall,
                           "timing": timing, "rows": [dict(zip(header, r)) for r in rows]})
    print(f"wrote {RESULTS_DIR / (args.name + '.md')} ({wall:.0f} s)")


def sweep(args) -> None:
    """Mean DIRE of real test digits (from index 600) and of shipped-model samples (seed 7) per steps / order."""
    t_start = time.time()
    loaded = load_model(PRETRAINED)
    n = args.sweep_num
    real = reference_images(loaded.config, 600 + n, split="test")[0][600: 600 + n].float()
    fake = sample(loaded, n, 7)
    x, y = torch.cat([fake, real]), torch.cat([torch.ones(n), torch.zeros(n)])
    null = {"labels": torch.full((2 * n,), loaded.num_classes)}
    header = ["steps", "order", "network calls / image", "mean DIRE generated", "mean DIRE real",
              "AUROC (low error = generated)", "s / image"]
    rows = []
    for item in args.sweep:
        steps, order = (int(v) for v in item.split(":"))
        t0 = time.time()
        grid = make_grid(loaded.schedule, steps, kind="uniform_t")
        s = dire_score(dire_maps(loaded.model, x, grid, cond=null, order=order))
        rows.append([steps, order, 2 * steps, float(s[:n].mean()), float(s[n:].mean()), auroc(-s, y),
                     (time.time() - t0) / (2 * n)])
        print(table_text(header, rows[-1:]), flush=True)
    wall = time.time() - t_start
    md = (f"{n} real MNIST test digits vs {n} shipped-model samples (UniPC 20), null class, uniform_t grid.\n\n"
          + table_markdown(header, rows)
          + f"\n\nWall-clock {wall:.0f} s, {args.threads} thread(s). Command: `{command_line()}`\n")
    write_text(f"{args.name}.md", md)
    write_json(args.name, {"machine": machine_info(), "command": command_line(), "args": vars(args), "wall_s": wall,
                           "rows": [dict(zip(header, r)) for r in rows]})
    print(table_text(header, rows))


if __name__ == "__main__":
    main()
