"""The tiny class-conditional U-ViT experiment on the 8x8 digits that the CLI / distillation / config tests train."""

from __future__ import annotations

from typing import Any


def tiny_uvit(name: str, *, steps: int, checkpoint_every: int = 0, log_every: int = 5, sampler: str = "ddim",
              sample_steps: int = 2, sample_num: int = 2) -> dict[str, Any]:
    """An experiment config dict (a few seconds of CPU training)."""
    return {
        "name": name,
        "data": {"name": "digits", "image_size": 8},
        "model": {"arch": "uvit", "parameterisation": "v",
                  "options": {"channels": [16], "dim": 32, "depth": 1, "num_heads": 2, "num_res_blocks": 1}},
        "diffusion": {"schedule": {"name": "shifted_cosine", "image_size": 8, "noise_size": 32},
                      "weighting": "sigmoid", "cond_drop_prob": 0.1},
        "train": {"steps": steps, "batch_size": 16, "checkpoint_every": checkpoint_every, "log_every": log_every,
                  "progress": False, "ema_half_life_images": 100},
        "sample": {"sampler": sampler, "steps": sample_steps, "num": sample_num},
    }
