"""Every YAML config shipped in ``simdiff/configs`` is parsed by its loader and runs for one trainer step.

Training configs keep their model, diffusion and optimiser sections and train one step on a few 8x8 digits
resized to 28x28 (sequence, text and photo configs: on a tiny version of their own data); distillation configs
(``distill_*.yaml``) distil a tiny teacher trained here on the 8x8 digits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simdiff import experiment
from simdiff.configuration import from_dict, load_yaml
from simdiff.distill.experiment import distill, load_distill_config
from simdiff.nets import count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

CONFIGS = Path(__file__).parents[1] / "simdiff" / "configs"
DISTILL = sorted(p.name for p in CONFIGS.glob("distill_*.yaml"))
#: not experiment configs: super-resolution stages (``sr:`` section, ``simdiff cascade train-sr``) and cascades of
#: stages; tests/test_sr.py and tests/test_cascade.py train and sample them.
NOT_EXPERIMENTS = {"mnist_sr.yaml", "mnist_cascade.yaml", "photos_sr.yaml", "photos_cascade.yaml"}
TRAINING = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("distill_")
                  and p.name not in NOT_EXPERIMENTS)

ONE_STEP = ["train.steps=1", "train.batch_size=4", "train.checkpoint_every=0", "train.sample_every=0",
            "train.progress=false", "train.log_every=1", "sample.num=2"]
TEACHER = tiny_uvit("tiny_teacher", steps=10, sample_num=2)
#: image configs train on 16 of the 8x8 digits resized to 28x28: (overrides, data shape, classes)
DIGITS = (["data.name=digits", "data.image_size=28", "data.limit=16", "data.split=train"], (1, 28, 28), 10)
_KOLMOGOROV = ["data.options.trajectories=2", "data.options.frames=8", "data.options.resolution=16",
               "data.options.solver_size=32", "data.options.frame_every=8", "data.options.burn_in=1.0"]
#: sequence and text configs keep their own data source, made tiny
TINY_DATA = {
    "kolmogorov_rolling.yaml": (_KOLMOGOROV, (6, 1, 16, 16), 0),
    "kolmogorov_video.yaml": (_KOLMOGOROV, (6, 1, 16, 16), 0),
    "moving_mnist_rolling.yaml": (["data.options.sequences=2", "data.options.frames=8"], (6, 1, 32, 32), 0),
    "moving_mnist_video.yaml": (["data.options.sequences=2", "data.options.frames=8"], (6, 1, 32, 32), 0),
    "text_masked.yaml": (["data.limit=16", "data.options.seq_len=32"], (1, 1, 32), 0),
    "mnist_text.yaml": (["data.limit=8", "data.options.phrasings=1", "data.split=train"], (1, 28, 28), 0),
    "semantica_mnist.yaml": (["data.options.source=digits", "data.image_size=28", "data.limit=64"], (1, 28, 28), 0),
    "semantica_photos.yaml": (["data.limit=32"], (3, 32, 32), 0),
    "photos_16.yaml": (["data.limit=16"], (3, 16, 16), 0),
}


def _final_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").iterdir())[-1]


def test_every_shipped_config_is_covered():
    assert TRAINING and DISTILL
    assert {"mnist.yaml", "demo.yaml"} <= set(TRAINING) and "distill_progressive.yaml" in DISTILL


@pytest.mark.parametrize("name", TRAINING)
def test_training_config_parses_and_trains_one_step(name, tmp_path):
    path = CONFIGS / name
    cfg = experiment.load_config(path)
    raw = load_yaml(path)
    assert cfg.model.arch == raw["model"]["arch"] and cfg.train.steps == raw["train"]["steps"]
    data, shape, classes = TINY_DATA.get(name, DIGITS)
    cfg = experiment.load_config(path, [*ONE_STEP, *data, "sample.steps=2"])
    summary = experiment.train(cfg, tmp_path / "run")
    assert summary["step"] == 1 and summary["nonfinite_total"] == 0 and torch.isfinite(torch.tensor(summary["loss"]))
    loaded = experiment.load_model(tmp_path / "run", ema=False)
    assert loaded.config.model == cfg.model and loaded.config.diffusion.schedule == cfg.diffusion.schedule
    assert loaded.image_shape == shape and loaded.num_classes == classes
    assert loaded.config.diffusion.process == cfg.diffusion.process
    named = raw["diffusion"].get("process", {}).get("name", "isotropic")
    assert (loaded.process.name if loaded.process is not None else "isotropic") == named
    if name == "mnist.yaml":  # the shipped model's architecture: the README's "3.0M-parameter residual U-ViT"
        assert round(count_parameters(loaded.model, trainable_only=False) / 1e6, 1) == 3.0
    head = [p for n, p in loaded.model.named_parameters()
            if n.startswith(("backbone.head.", "head.", "backbone.conv_out.", "conv_out."))]
    assert head and all(p.abs().max() > 0 for p in head)  # the zero-initialised output head took its first step


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("configs_teacher")
    experiment.train(from_dict(experiment.ExperimentConfig, TEACHER), root / "teacher")
    return root / "teacher"


@pytest.mark.parametrize("name", DISTILL)
def test_distill_config_parses_and_runs_one_step(name, teacher, tmp_path):
    path = CONFIGS / name
    raw = load_yaml(path)
    cfg = load_distill_config(path)
    assert cfg.method == raw["method"] and cfg.method_params == raw.get("method_params", {})
    assert cfg.student_steps == raw["student_steps"]
    overrides = [*ONE_STEP, f"teacher={teacher}"]
    if "steps_per_round" in cfg.method_params:  # progressive: one trainer step per halving round
        rounds = (cfg.method_params["start_steps"] // cfg.student_steps).bit_length() - 1
        overrides += ["method_params.steps_per_round=1", f"train.steps={rounds}"]
    cfg = load_distill_config(path, overrides)
    summary = distill(cfg, tmp_path / "run")
    assert summary["step"] == cfg.train.steps and summary["nonfinite_total"] == 0
    assert summary["sampler_spec"]["steps"] == cfg.student_steps
    doc = json.loads((_final_checkpoint(tmp_path / "run") / "state.json").read_text())["config"]
    recorded = doc["distill"]["method_params"]
    assert doc["kind"] == cfg.method
    assert all(recorded[k] == v for k, v in raw.get("method_params", {}).items() if k != "steps_per_round"), recorded
    student = load_file(str(_final_checkpoint(tmp_path / "run") / "model.safetensors"))
    start = experiment.load_model(teacher).model.state_dict()
    moved = [k for k in student if k in start and not torch.equal(student[k], start[k].to(student[k].dtype))]
    assert moved  # the student took a step away from the teacher it started from
