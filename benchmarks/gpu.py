"""The GPU path on one CUDA device: the trainer's speed per precision mode, the same U-Net against diffusers, sampling
speed, and the shipped models' training runs.

Sections (``--section``, default all, in the order train_speed, fashion_classifier, ship, sample_speed, arch: the
shipped models come before the remaining speed figures, so a run cut short keeps them):

* ``train_speed`` / ``sample_speed``: the shipped MNIST network (``simdiff/configs/mnist.yaml``: residual U-ViT,
  1x28x28, 10 classes) trained by :class:`~simdiff.train.Trainer` itself for ``--speed-steps`` steps at
  ``--batch`` per mode: fp32 (TF32 off), TF32, bf16 autocast, bf16 + ``torch.compile``. images/s is the median of
  the trainer's own 25-step log windows after the first two (the first holds compilation); the first window's
  wall-clock is reported as start-up. Sampling: ``--num`` class-conditional images, UniPC 20 steps with guidance
  w = 2 (40 network calls per image) through :func:`simdiff.generate.generate`, network eager fp32 / bf16
  autocast / bf16 + compiled.
* ``arch``: ``benchmarks/train.py``'s same-architecture U-Nets (simdiff ``UNet`` vs diffusers ``UNet2DModel`` built
  alike), the same step code for both, on CUDA in TF32 and in bf16 autocast; alternating timed windows.
* ``fashion_classifier``: trains :class:`simdiff.eval.fashion.FashionNet` and writes its float16 weights.
* ``ship``: trains each of ``--ship`` (config names in ``simdiff/configs``) on CUDA in bf16 (compiled when the speed
  section found it faster) for ``--minutes`` each: the step count is the budget times the measured rate, so the
  cosine learning-rate horizon is exact; exports float16 safetensors and checks class agreement of 1000 samples with
  the domain classifier (MNIST classifier for MNIST; the Fashion classifier just trained for Fashion-MNIST).

Run: ``python benchmarks/gpu.py --out DIR`` (``--smoke`` for a one-minute check of every section). Writes
``DIR/gpu.json`` and ``DIR/gpu.md``; ``ship`` also ``DIR/<name>.safetensors`` and ``DIR/<name>_metrics.csv``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, table_markdown  # noqa: E402

MODES = {  # name -> (tf32, bf16, compile)
    "fp32": (False, False, False),
    "tf32": (True, False, False),
    "bf16": (True, True, False),
    "bf16+compile": (True, True, True),
}


def _overrides(args, *, tf32: bool, bf16: bool, compile_: bool, steps: int, extra: list[str] = ()) -> list[str]:
    return [f"train.device={args.device}", f"train.tf32={str(tf32).lower()}", f"train.bf16={str(bf16).lower()}",
            f"train.compile={str(compile_).lower()}", f"train.batch_size={args.batch}", f"train.steps={steps}",
            "train.checkpoint_every=0", "train.sample_every=0", "train.progress=false", *extra]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def train_speed(args, out: dict) -> None:
    from simdiff.experiment import load_config, train
    from simdiff.train.logging import read_metrics

    rows = []
    for mode in args.modes:
        tf32, bf16, comp = MODES[mode]
        if comp and args.device == "cpu":  # the trainer compiles on CUDA only
            continue
        _set_tf32(tf32)
        cfg = load_config(ROOT / "simdiff/configs/mnist.yaml",
                          _overrides(args, tf32=tf32, bf16=bf16, compile_=comp, steps=args.speed_steps,
                                     extra=["train.log_every=25", "train.optim.warmup_steps=10"]))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train(cfg, Path(d) / "run", resume=False)
            wall = time.perf_counter() - t0
            rates = [float(r["images_per_s"]) for r in read_metrics(Path(d) / "run" / "metrics.csv")]
        steady = statistics.median(rates[2:]) if len(rates) > 2 else rates[-1]
        first = 25 * args.batch / rates[0]
        rows.append({"mode": mode, "img_s": steady, "steps_s": steady / args.batch, "first_window_s": first,
                     "run_wall_s": wall, "windows": rates})
        print(f"[speed] {mode}: {steady:.0f} img/s ({steady / args.batch:.1f} steps/s), first 25 steps {first:.1f}s",
              flush=True)
    out["train_speed"] = rows


def sample_speed(args, out: dict) -> None:
    from simdiff.experiment import load_config, seeded_network
    from simdiff.generate import SampleConfig, generate
    from simdiff.schedules import schedule_from_dict

    cfg = load_config(ROOT / "simdiff/configs/mnist.yaml", [])
    model = seeded_network(cfg, image_shape=(1, 28, 28), num_classes=10).to(args.device).eval()
    schedule = schedule_from_dict(cfg.diffusion.schedule)
    labels = torch.arange(args.num) % 10
    sc = SampleConfig(sampler="unipc", steps=20, guidance=2.0, batch_size=args.num, seed=0)
    _set_tf32(True)
    compiled = torch.compile(model) if args.device != "cpu" else model

    def wrap(net, bf16: bool):
        def denoise(z, lam, **c):
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
                return net(z, lam, **c)
        return denoise

    rows = []
    for mode, den in (("fp32 (TF32)", wrap(model, False)), ("bf16", wrap(model, True)),
                      ("bf16+compile", wrap(compiled, True))):
        times = []
        for _rep in range(3):
            _sync()
            t0 = time.perf_counter()
            generate(den, schedule, (1, 28, 28), sc, num=args.num, labels=labels, num_classes=10, device=args.device)
            _sync()
            times.append(time.perf_counter() - t0)
        best = min(times[1:])
        rows.append({"mode": mode, "images": args.num, "calls_per_image": 40, "s": best, "img_s": args.num / best,
                     "first_s": times[0]})
        print(f"[sample] {mode}: {args.num / best:.0f} img/s (first call {times[0]:.1f}s)", flush=True)
    out["sample_speed"] = rows


def arch(args, out: dict) -> None:
    import train as tb

    rows = []
    for precision in ("tf32", "bf16"):
        _set_tf32(True)
        for label, chans, attn in tb.LAYOUTS:
            torch.manual_seed(0)
            models = {"simdiff": tb.simdiff_unet(chans, attn), "diffusers": tb.diffusers_same_unet(chans, attn)}
            x = (torch.rand((args.batch, *tb.SHAPE), generator=torch.Generator().manual_seed(1)) * 2 - 1)
            steps = {}
            for k, m in models.items():
                m = m.to(args.device).train()
                steps[k] = _device_step(m, k, x.to(args.device), bf16=precision == "bf16")
            rates: dict[str, list[float]] = {k: [] for k in steps}
            for k in steps:
                for _ in range(args.warmup_steps):
                    steps[k]()
            for _ in range(args.windows):
                for k in steps:
                    _sync()
                    t0 = time.perf_counter()
                    for _ in range(args.window_steps):
                        steps[k]()
                    _sync()
                    rates[k].append(args.batch * args.window_steps / (time.perf_counter() - t0))
            row = {"precision": precision, "layout": label, "simdiff_img_s": statistics.median(rates["simdiff"]),
                   "diffusers_img_s": statistics.median(rates["diffusers"]),
                   "simdiff_params": tb.count_parameters(models["simdiff"]),
                   "diffusers_params": tb.count_parameters(models["diffusers"])}
            row["ratio"] = row["simdiff_img_s"] / row["diffusers_img_s"]
            rows.append(row)
            print(f"[arch] {precision} {label}: simdiff {row['simdiff_img_s']:.0f} img/s, diffusers "
                  f"{row['diffusers_img_s']:.0f} img/s, x{row['ratio']:.2f}", flush=True)
    out["arch"] = rows


def _device_step(model, kind: str, x: torch.Tensor, *, bf16: bool):
    """benchmarks/train.py's step (cosine level, eps-MSE, clip 1.0, AdamW) on the device, optionally bf16."""
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)
    gen = torch.Generator(device=x.device).manual_seed(0)

    def step() -> None:
        eps = torch.randn(x.shape, generator=gen, device=x.device)
        t = torch.rand(x.shape[0], generator=gen, device=x.device).clamp(1e-3, 1 - 1e-3)
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(z, 2 * torch.log(alpha / sigma)) if kind == "simdiff" else model(z, t * 999).sample
        F.mse_loss(out.float(), eps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fashion_classifier(args, out: dict, out_dir: Path) -> None:
    from simdiff.eval import fashion

    t0 = time.perf_counter()
    net, acc = fashion.train_fashion_classifier(epochs=args.classifier_epochs, device=args.device, progress=True)
    path = fashion.save_fashion_classifier(net, out_dir / "fashion_cnn.safetensors", test_accuracy=acc)
    # the Fashion agreement check of the ship section reads the weights from the package location
    fashion.WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, fashion.WEIGHTS)
    fashion._CACHE.clear()
    out["fashion_classifier"] = {"test_accuracy": acc, "epochs": args.classifier_epochs,
                                 "wall_s": time.perf_counter() - t0}
    print(f"[fashion classifier] test accuracy {acc:.4f} in {time.perf_counter() - t0:.0f}s", flush=True)


def ship(args, out: dict, out_dir: Path) -> None:
    from simdiff.experiment import load_config, train
    from simdiff.runs import load_model
    from simdiff.train.checkpoint import export_inference

    speed = {r["mode"]: r for r in out.get("train_speed", [])}
    eager, comp = speed.get("bf16"), speed.get("bf16+compile")
    budget = args.minutes * 60
    use_compile = bool(comp and eager and
                       comp["steps_s"] * (budget - comp["first_window_s"]) > eager["steps_s"] * budget)
    rate = (comp if use_compile else eager or {"steps_s": 10.0})["steps_s"]
    steps = max(50, int(0.92 * rate * (budget - (comp["first_window_s"] if use_compile else 5))))
    results = []
    for name in args.ship:
        extra = [f"train.log_every={args.log_every}", f"train.optim.lr={args.lr}",
                 f"train.optim.warmup_steps={min(1000, steps // 20)}",
                 f"train.ema_half_life_images={args.ema_images}", f"train.ema_rampup_ratio={args.ema_rampup}",
                 f"train.checkpoint_every={max(steps // 4, 1)}", "train.keep_last=1"]
        cfg = load_config(ROOT / f"simdiff/configs/{name}.yaml",
                          _overrides(args, tf32=True, bf16=True, compile_=use_compile, steps=steps, extra=extra))
        run_dir = Path(tempfile.mkdtemp()) / name
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, resume=False)
        wall = time.perf_counter() - t0
        export = out_dir / f"{cfg.name}.safetensors"
        export_inference(run_dir, export, dtype=torch.float16)
        shutil.copyfile(run_dir / "metrics.csv", out_dir / f"{cfg.name}_metrics.csv")
        row = {"config": name, "name": cfg.name, "steps": steps, "batch": args.batch, "compile": use_compile,
               "lr": args.lr, "train_wall_s": wall, "images_seen": steps * args.batch,
               "final_loss": summary.get("loss")}
        row.update(_agreement(load_model(export, device=args.device), cfg, args))
        results.append(row)
        print(f"[ship] {json.dumps(row)}", flush=True)
    out["ship"] = results


def _agreement(loaded, cfg, args) -> dict[str, Any]:
    from simdiff.generate import SampleConfig, generate

    if cfg.data.name == "mnist":
        from simdiff.eval.mnist import MNISTFeatures as Features
    else:
        from simdiff.eval.fashion import FashionFeatures as Features
    feats = Features(args.device)
    labels = torch.arange(args.agree_num) % 10
    res = {"agreement_num": args.agree_num}
    for w in (0.0, 2.0):
        sc = SampleConfig(sampler="unipc", steps=20, guidance=w, batch_size=1000, seed=1)
        x = generate(loaded.model, loaded.schedule, loaded.image_shape, sc, num=args.agree_num, labels=labels,
                     num_classes=loaded.num_classes, device=args.device)
        res[f"agreement_w{w:g}"] = feats.accuracy(x, labels)
    return res


def report(out: dict, out_dir: Path) -> None:
    lines = [f"# GPU path ({out['info'].get('gpu')})", ""]
    if "train_speed" in out:
        lines += ["## Trainer, shipped MNIST network", "",
                  table_markdown(["mode", "img/s", "steps/s", "first 25 steps (s)"],
                                 [[r["mode"], r["img_s"], r["steps_s"], r["first_window_s"]]
                                  for r in out["train_speed"]]), ""]
    if "sample_speed" in out:
        lines += ["## Sampling", "", table_markdown(["network", "img/s", "first call (s)"],
                                                    [[r["mode"], r["img_s"], r["first_s"]]
                                                     for r in out["sample_speed"]]), ""]
    if "arch" in out:
        lines += ["## Same U-Net, simdiff vs diffusers", "",
                  table_markdown(["precision", "layout", "simdiff img/s", "diffusers img/s", "ratio"],
                                 [[r["precision"], r["layout"], r["simdiff_img_s"], r["diffusers_img_s"], r["ratio"]]
                                  for r in out["arch"]]), ""]
    (out_dir / "gpu.md").write_text("\n".join(lines))
    (out_dir / "gpu.json").write_text(json.dumps(out, indent=1, default=str))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--section", nargs="+",
                   default=["train_speed", "fashion_classifier", "ship", "sample_speed", "arch"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="train_speed modes")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--speed-steps", dest="speed_steps", type=int, default=150)
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=10)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-steps", dest="window_steps", type=int, default=20)
    p.add_argument("--classifier-epochs", dest="classifier_epochs", type=int, default=12)
    p.add_argument("--ship", nargs="+", default=["mnist", "fashion"])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema-images", dest="ema_images", type=float, default=250_000)
    p.add_argument("--ema-rampup", dest="ema_rampup", type=float, default=0.1)
    p.add_argument("--log-every", dest="log_every", type=int, default=100)
    p.add_argument("--agree-num", dest="agree_num", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks every section runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.speed_steps, args.num, args.windows, args.window_steps, args.warmup_steps = 75, 200, 1, 3, 2
        args.classifier_epochs, args.minutes, args.log_every, args.agree_num = 1, 0.15, 10, 20
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    out: dict[str, Any] = {"info": {**machine_info(), "gpu": gpu, "torch": torch.__version__, "args": vars(args)}}
    print(json.dumps(out["info"], default=str), flush=True)
    sections = {"train_speed": lambda: train_speed(args, out), "sample_speed": lambda: sample_speed(args, out),
                "arch": lambda: arch(args, out),
                "fashion_classifier": lambda: fashion_classifier(args, out, out_dir),
                "ship": lambda: ship(args, out, out_dir)}
    for name in args.section:
        t0 = time.perf_counter()
        try:
            sections[name]()
        except Exception:  # keep going: one failed section must not lose the others' figures
            out.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"[{name}] FAILED\n{traceback.format_exc()}", flush=True)
        print(f"[{name}] {time.perf_counter() - t0:.0f}s", flush=True)
        report(out, out_dir)


if __name__ == "__main__":
    main()
