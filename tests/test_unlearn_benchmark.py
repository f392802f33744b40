"""``benchmarks/unlearning.py --smoke`` runs on a tiny class-conditional teacher trained here: table, JSON and grids."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from simdiff import experiment
from simdiff.configuration import from_dict

ROOT = Path(__file__).resolve().parent.parent
TEACHER = {
    "name": "gmm", "data": {"name": "gmm_images", "image_size": 8, "limit": 256},
    "model": {"arch": "uvit", "parameterisation": "v",
              "options": {"channels": [8], "dim": 16, "depth": 1, "num_heads": 2, "num_res_blocks": 1}},
    "diffusion": {"schedule": {"name": "cosine"}, "weighting": "sigmoid", "cond_drop_prob": 0.1},
    "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 0, "log_every": 2, "progress": False,
              "ema_half_life_images": 0},
    "sample": {"sampler": "ddim", "steps": 3, "num": 4, "grid": "uniform_t"},
}


def _benchmark():
    spec = importlib.util.spec_from_file_location("bench_unlearning", ROOT / "benchmarks" / "unlearning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_mode_writes_table_json_and_grids(tmp_path):
    experiment.train(from_dict(experiment.ExperimentConfig, TEACHER), tmp_path / "teacher")
    out = tmp_path / "results"
    res = _benchmark().main(["--teacher", str(tmp_path / "teacher"), "--smoke", "--methods", "esd", "salun_ip",
                             "--results-dir", str(out), "--runs-dir", str(tmp_path / "runs")])
    assert set(res["results"]) == {"esd", "salun_ip"}
    doc = json.loads((out / "unlearning.json").read_text())
    assert doc["forget"] == [0] and doc["retain"] == [1, 2, 3]
    for method in ("esd", "salun_ip"):
        r = doc["results"][method]
        assert 0.0 <= r["integrity_lo"] <= r["integrity"] <= r["integrity_hi"] <= 1.0
        assert {"forget_rate", "forget_rate_before", "retain_fd", "psnr"} <= set(r)
        assert (out / f"unlearning_{method}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "runs" / method / "checkpoints" / "step_000003").is_dir()
    assert (out / "unlearning_before.png").is_file() and (out / "unlearning_grid.png").is_file()
    md = (out / "unlearning.md").read_text()
    assert "| esd |" in md and "| salun_ip |" in md and "integrity 95% CI" in md
