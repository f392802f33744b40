"""``simdiff unlearn`` end to end on a tiny class-conditional U-ViT trained on the 8x8 ``gmm_images`` mixture: the
output is an ordinary run that ``simdiff sample`` loads, a resumed run equals an uninterrupted one bit for bit, bad
input is one line with exit status 2, and the unlearning metrics on real runs (identity, randomised weights)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simdiff import experiment
from simdiff.cli import main as simdiff_main
from simdiff.configuration import from_dict
from simdiff.eval.unlearning import PSNR_CAP, evaluate_unlearning, evaluate_unlearning_run
from simdiff.runs import load_model
from simdiff.unlearn.cli import main

TEACHER = {
    "name": "gmm", "data": {"name": "gmm_images", "image_size": 8, "limit": 512},
    "model": {"arch": "uvit", "parameterisation": "v",
              "options": {"channels": [16], "dim": 32, "depth": 1, "num_heads": 2, "num_res_blocks": 1}},
    "diffusion": {"schedule": {"name": "cosine"}, "weighting": "sigmoid", "cond_drop_prob": 0.1},
    "train": {"steps": 60, "batch_size": 32, "checkpoint_every": 0, "log_every": 20, "progress": False,
              "ema_half_life_images": 0, "optim": {"lr": 2e-3, "warmup_steps": 10}},
    "sample": {"sampler": "ddim", "steps": 6, "num": 4, "grid": "uniform_t"},
}
FAST = ["--pool-size", "16", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unlearn")
    experiment.train(from_dict(experiment.ExperimentConfig, TEACHER), root / "teacher")
    (root / "forget.txt").write_text("# the concept to forget\n0\n")
    (root / "retain.txt").write_text("1\n2\n3\n")
    return root


def _args(root: Path, method: str, run: Path, *extra: str) -> list[str]:
    return ["unlearn", "--method", method, "--teacher", str(root / "teacher"), "--forget", str(root / "forget.txt"),
            "--retain", str(root / "retain.txt"), "--run-dir", str(run), *FAST, *extra]


def test_unlearned_run_is_an_ordinary_run(root, tmp_path, capsys):
    run = tmp_path / "esd"
    assert main(_args(root, "esd", run, "--steps", "3")) == 0
    assert '"method": "esd"' in capsys.readouterr().out
    for name in ("unlearn.yaml", "unlearn_pools.safetensors", "metrics.csv", "samples/final.png"):
        assert (run / name).is_file(), name
    loaded = load_model(run)
    assert loaded.meta["kind"] == "diffusion" and loaded.meta["unlearn"]["method"] == "esd"
    assert loaded.meta["unlearn"]["forget"]["keys"] == [0] and loaded.meta["unlearn"]["retain"]["keys"] == [1, 2, 3]
    out = tmp_path / "grid.png"
    assert simdiff_main(["sample", str(run), "--num", "4", "--steps", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = evaluate_unlearning_run(run, num=8, fid=False, num_boot=50)
    assert scores["method"] == "esd" and 0.0 <= scores["integrity"] <= 1.0
    assert {"forget_rate", "forget_rate_before", "retain_rate", "psnr"} <= set(scores)
    capsys.readouterr()
    assert main(_args(root, "graddiff", run, "--steps", "5")) == 2  # another method into the same run: refused
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "method: 'esd' -> 'graddiff'" in err and "new --run-dir" in err, err


def test_resume_from_a_mid_run_checkpoint_is_exact(root, tmp_path):
    """Kill after step 3 (drop later checkpoints), rerun: the weights equal the uninterrupted run's bit for bit
    (salun_ip: the saliency mask travels in aux.safetensors, the pools in the run directory)."""
    flags = ["--steps", "6", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=10"]
    runs = {name: tmp_path / name for name in ("straight", "resumed")}
    for run in runs.values():
        assert main(_args(root, "salun_ip", run, *flags)) == 0
    ckdir = runs["resumed"] / "checkpoints"
    for later in sorted(ckdir.iterdir())[3:]:
        shutil.rmtree(later)
    assert main(_args(root, "salun_ip", runs["resumed"], *flags)) == 0
    final = {k: load_file(str(r / "checkpoints" / "step_000006" / "model.safetensors")) for k, r in runs.items()}
    assert all(torch.equal(final["straight"][k], final["resumed"][k]) for k in final["straight"])
    teacher = load_model(root / "teacher").model.state_dict()
    assert any(not torch.equal(final["straight"][k], teacher[k]) for k in teacher)
    aux = load_file(str(runs["resumed"] / "checkpoints" / "step_000006" / "aux.safetensors"))
    assert aux and all(k.startswith("mask.") for k in aux)


@pytest.mark.parametrize("case, expect", [
    (["--method", "forget"], "unknown unlearning method 'forget'"),
    (["--forget", "missing.txt"], "no such"),
    (["--set", "nonsense=1"], "nonsense"),
])
def test_bad_input_is_one_line_exit_2(root, tmp_path, capsys, case, expect):
    args = _args(root, "esd", tmp_path / "bad", "--steps", "2")
    for i in range(0, len(case), 2):
        if case[i] in args:
            args[args.index(case[i]) + 1] = case[i + 1]
        else:
            args += case[i:i + 2]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simdiff: error:") and "\n" not in err and expect in err, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("text, expect", [("a seven\n", "needs class indices, got 'a seven'"),
                                          ("9\n", "entries must be class indices in [0, 4)")])
def test_sets_that_do_not_fit_the_model_are_one_line(root, tmp_path, capsys, text, expect):
    (tmp_path / "f.txt").write_text(text)
    args = _args(root, "esd", tmp_path / "bad", "--steps", "2")
    args[args.index("--forget") + 1] = str(tmp_path / "f.txt")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expect in err, err


def test_zero_step_unlearning_is_the_identity_and_randomised_weights_lose_integrity(root, tmp_path):
    run = tmp_path / "zero"
    assert main(_args(root, "esd_ip", run, "--steps", "0")) == 0
    same = evaluate_unlearning_run(run, num=24, num_boot=100)
    assert same["integrity"] == same["integrity_lo"] == same["integrity_hi"] == 1.0 and same["psnr"] == PSNR_CAP
    assert same["forget_rate"] == same["forget_rate_before"] and same["retain_fd"] < 1e-6
    original = load_model(root / "teacher")
    broken = copy.copy(original)
    broken.model = copy.deepcopy(original.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in broken.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    bad = evaluate_unlearning(original, broken, [0], [1, 2, 3], num=24, num_boot=100)
    assert bad["integrity_hi"] < 0.3 and bad["psnr"] < 20 and bad["retain_fd"] > 1.0, bad
