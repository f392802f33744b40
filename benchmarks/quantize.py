"""Post-training quantisation of the shipped MNIST model (Q-Diffusion, Li et al. 2023): quality, size, speed.

Rows: the float model; W8A16 (int8 per-channel weights, activations rounded to float16: needs no calibration); and
W8A8 and W4A8 (int4 weights in groups of ``--group-size``) with int8 per-tensor activations calibrated on each of

* "trajectory": ``--num-calib`` inputs taken uniformly over the steps of the float model's own sampling runs
  (Q-Diffusion's calibration);
* "single": ``--num-calib`` inputs from one step of those runs only (the middle step of the grid);
* "data": ``--num-calib`` training images noised at random levels ``t ~ U(0, 1)``.

Both recorded strategies come from one recording of ``--num-calib`` float sampling runs with the benchmark's
sampler and step count (seed different from the evaluation's). Every row samples the same ``--num`` images from
the same starting noise (classes cycling 0..9, no guidance) and is scored against 1000 test images: MNIST-classifier
Frechet distance (MNIST-FD) and accuracy, Inception FID and KID (x 1e3). FID / KID on a few hundred samples are
biased upwards: compare rows within the table, not with published numbers. Two paired measures need no reference
set: the pixel RMSE of each row's samples against the float model's samples from the same noise, and the relative
error of one denoiser call (``||v_q - v||/||v||``) on held-out trajectory inputs (other runs, other seed), split
into the noisiest, middle and cleanest third of the steps.

Size: the ``.safetensors`` file (the float row: its float32 state dict in the same format). Time: wall-clock of
sampling ``--num`` images on this CPU with ``--threads`` threads (noisy on a shared machine).

Run::

    nice -n 10 python benchmarks/quantize.py --num 500
    nice -n 10 python benchmarks/quantize.py --timing --num 100   # sampling time only (quant_timing.{json,md})
    nice -n 10 python benchmarks/quantize.py --num 300 --steps 10 --adaround --name quant_adaround

``--timing`` times sampling (best of ``--repeats`` round-robin runs, which discounts other processes' load) for the
float model, W8A8 with and without the int8 GEMM, W8A16 and W4A8, with trajectory calibration, and scores nothing.

Writes ``benchmarks/results/quant.{json,md}`` and ``benchmarks/results/quant_grid.png`` (top two rows float, bottom
two rows W8A8 with trajectory calibration; same noise, classes 0..9).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.cli import PRETRAINED  # noqa: E402
from simdiff.generate import generate  # noqa: E402
from simdiff.images import save_grid  # noqa: E402
from simdiff.runs import class_null_cond, load_model, reference_images  # noqa: E402

HEADER = ["weights/acts", "calibration", "MNIST-FD", "FID", "KID x1e3", "accuracy", "pixel RMSE vs float",
          "call err noisy", "call err mid", "call err clean", "size MB", "sample s/img"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=500, help="samples per row")
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--act-range", default="minmax", choices=["minmax", "percentile", "mse"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="quant")
    p.add_argument("--skip-fid", action="store_true", help="MNIST metrics only (Inception is slow on a CPU)")
    p.add_argument("--timing", action="store_true", help="only time sampling (see the module docstring)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adaround", action="store_true",
                   help="rows: float and W4A8 (trajectory) with AdaRound-learned rounding (--recon-iters steps/layer)")
    p.add_argument("--recon-iters", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing:
        return timing(args)
    from simdiff.eval import evaluate_samples
    from simdiff.quant import QuantConfig, build_calibration, quantize_model, save_quantized
    from simdiff.quant.io import record_float_trajectories

    t_all = time.perf_counter()
    loaded = load_model(PRETRAINED)
    scfg = dataclasses.replace(loaded.config.sample, sampler=args.sampler, steps=args.steps, guidance=0.0,
                               seed=args.seed, num=args.num, batch_size=250)
    labels = torch.arange(args.num) % loaded.num_classes
    ref, key = reference_images(loaded.config, 1000)
    metrics = ("mnist_fd", "accuracy") if args.skip_fid else ("mnist_fd", "fid", "kid", "accuracy")
    base = QuantConfig(num_calib=args.num_calib, calib_runs=args.num_calib, calib_sampler=args.sampler,
                       calib_steps=args.steps, group_size=args.group_size, act_range=args.act_range, seed=args.seed)
    t0 = time.perf_counter()
    recorded = record_float_trajectories(loaded, base)
    record_s = time.perf_counter() - t0
    held_out = record_float_trajectories(loaded, dataclasses.replace(base, calib_runs=20, seed=args.seed + 7))
    n_steps = int(held_out.step.max()) + 1
    thirds = [(held_out.step < n_steps / 3), (held_out.step >= n_steps / 3) & (held_out.step < 2 * n_steps / 3),
              (held_out.step >= 2 * n_steps / 3)]
    with torch.inference_mode():
        v_ref = loaded.model(held_out.z, held_out.logsnr, **held_out.cond).v

    rows, table, x_float, x_grid = [], [], None, None
    settings = [("float32", None, None), ("W8A16", "n/a (weight-only)", {"activations": "float16"})]
    for wb in (8, 4):
        for cal in ("trajectory", "single", "data"):
            settings.append((f"W{wb}A8", cal, {"weight_bits": wb, "calibration": cal}))
    if args.adaround:
        settings = [settings[0], ("W4A8 + AdaRound", "trajectory", {"weight_bits": 4, "calibration": "trajectory",
                                                                    "reconstruction": "adaround",
                                                                    "recon_iters": args.recon_iters})]
    tmp = Path(tempfile.mkdtemp(prefix="quant_bench_"))
    for label, cal, changes in settings:
        row_t = time.perf_counter()
        if changes is None:
            model = loaded.model
            from safetensors.torch import save as st_save

            path = tmp / "float.safetensors"
            path.write_bytes(st_save({k: v.contiguous() for k, v in model.state_dict().items()}))
            quant_s = 0.0
        else:
            qcfg = dataclasses.replace(base, **changes)
            t0 = time.perf_counter()
            calib = build_calibration(loaded, qcfg, recorded=recorded) if qcfg.activations == "int8" else \
                build_calibration(loaded, dataclasses.replace(qcfg, calibration="trajectory"), recorded=recorded)
            model = quantize_model(loaded.model, calib, qcfg)
            quant_s = time.perf_counter() - t0
            path = save_quantized(dataclasses.replace(loaded, model=model), tmp / f"{label}_{cal}.safetensors")
        with torch.inference_mode():
            v = model(held_out.z, held_out.logsnr, **held_out.cond).v
        call_err = [float((v[m] - v_ref[m]).norm() / v_ref[m].norm()) for m in thirds]
        t0 = time.perf_counter()
        x = generate(model, loaded.schedule, loaded.image_shape, scfg, labels=labels,
                     num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes))
        sample_s = time.perf_counter() - t0
        if x_float is None:
            x_float = x
        if label == "W8A8" and cal == "trajectory":
            x_grid = x
        if x_grid is None and changes is not None:
            x_grid = x
        scores = evaluate_samples(x, ref, metrics=metrics, labels=labels, reference_key=key, progress=False,
                                  kid_subset_size=min(args.num, 1000))
        rmse = float((x - x_float).square().mean().sqrt())
        row = {"setting": label, "calibration": cal or "-", **scores, "pixel_rmse_vs_float": rmse,
               "call_rel_err": call_err, "bytes": path.stat().st_size, "sample_s_per_img": sample_s / args.num,
               "quantize_s": quant_s, "row_s": time.perf_counter() - row_t}
        rows.append(row)
        table.append([label, cal or "-", scores["mnist_fd"], scores.get("fid"),
                      None if "kid" not in scores else 1e3 * scores["kid"], scores["accuracy"], rmse, *call_err,
                      row["bytes"] / 1e6, row["sample_s_per_img"]])
        print(table_text(HEADER, table[-1:]), flush=True)
        write_results(args, rows, table, record_s, time.perf_counter() - t_all)
    grid = torch.cat([x_float[:20], x_grid[:20]])
    save_grid(grid, RESULTS_DIR / f"{args.name}_grid.png", nrow=10, scale=2)
    print(table_text(HEADER, table))


def timing(args) -> None:
    """Best-of-``repeats`` sampling time per image of the float model and the quantised variants."""
    from simdiff.quant import QuantConfig, build_calibration, quantize_model

    t_all = time.perf_counter()
    loaded = load_model(PRETRAINED)
    scfg = dataclasses.replace(loaded.config.sample, sampler=args.sampler, steps=args.steps, guidance=0.0,
                               seed=args.seed, num=args.num, batch_size=250)
    labels = torch.arange(args.num) % loaded.num_classes
    base = QuantConfig(num_calib=args.num_calib, calib_runs=32, calib_sampler=args.sampler, calib_steps=args.steps,
                       group_size=args.group_size, seed=args.seed)
    calib = build_calibration(loaded, base)
    variants = [("float32", None), ("W8A8, int8 GEMM for Linear", {}), ("W8A8, all fake-quantised",
                {"int8_kernels": False}), ("W8A16 (weight-only)", {"activations": "float16"}),
                ("W4A8", {"weight_bits": 4})]
    header, table = ["model", f"sample s/img (best of {args.repeats})"], []
    models = [(label, loaded.model if changes is None else
               quantize_model(loaded.model, calib, dataclasses.replace(base, **changes)))
              for label, changes in variants]
    best = {label: float("inf") for label, _ in models}
    for _ in range(args.repeats):  # round-robin, so that every variant sees the same spread of machine load
        for label, model in models:
            t0 = time.perf_counter()
            generate(model, loaded.schedule, loaded.image_shape, scfg, labels=labels,
                     num_classes=loaded.num_classes)
            best[label] = min(best[label], time.perf_counter() - t0)
    table = [[label, best[label] / args.num] for label, _ in models]
    info = machine_info()
    wall = time.perf_counter() - t_all
    write_json(f"{args.name}_timing", {"machine": info, "command": command_line(), "args": vars(args),
                                       "wall_s": wall, "rows": [dict(zip(header, r)) for r in table]})
    write_text(f"{args.name}_timing.md", f"Date: {info['date']}; {info['processor']}, {info['cpu_count']} CPUs, "
               f"torch {info['torch']}, {args.threads} thread(s); command: `{command_line()}`; wall-clock "
               f"{wall / 60:.1f} min. {args.num} images, {args.sampler} {args.steps} steps, batch 250.\n\n"
               + table_markdown(header, table))
    print(table_text(header, table))


def write_results(args, rows, table, record_s, wall_s) -> None:
    info = machine_info()
    payload = {"machine": info, "command": command_line(), "args": vars(args), "record_s": record_s,
               "wall_s": wall_s, "rows": rows}
    write_json(args.name, payload)
    text = (f"Date: {info['date']}; machine: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']}, "
            f"{args.threads} thread(s); command: `{command_line()}`; wall-clock {wall_s / 60:.1f} min.\n"
            f"{args.num} samples per row ({args.sampler}, {args.steps} steps, no guidance, same noise in every row); "
            f"{args.num_calib} calibration inputs; int4 groups of {args.group_size}; activation ranges "
            f"{args.act_range}.\n\n" + table_markdown(HEADER, table))
    write_text(f"{args.name}.md", text)


if __name__ == "__main__":
    main()
