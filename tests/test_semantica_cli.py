"""The shipped Semantica config trains one step through ``simdiff semantica train``; the run loads back without the
encoder in its weights; ``semantica sample`` / the ``--condition-images`` hook write repeatable few-shot grids."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simdiff.configuration import ConfigError
from simdiff.images import save_images
from simdiff.nets import count_parameters
from simdiff.runs import load_config, load_model
from simdiff.semantica import add_semantica_parser, sample_from_condition_images, semantica_sample_command
from simdiff.semantica.sample import add_condition_flags
from simdiff.semantica.train import check_semantica_config

CONFIG = Path(__file__).parents[1] / "simdiff" / "configs" / "semantica_mnist.yaml"
TINY = ["data.options.source=digits", "data.image_size=28", "data.limit=64", "train.steps=3", "train.batch_size=4",
        "train.checkpoint_every=0", "train.sample_every=0", "train.progress=false", "train.log_every=1",
        "sample.steps=2", "sample.num=2"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simdiff")
    add_semantica_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("semantica") / "run"
    argv = ["semantica", "train", str(CONFIG), "--run-dir", str(out)] + [a for o in TINY for a in ("--set", o)]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    return out


def test_shipped_config_is_consistent():
    cfg = load_config(CONFIG)
    opts = check_semantica_config(cfg)
    assert opts.holdout_classes == (7, 8, 9) and opts.pairing == "same_class" and opts.encoder == "mnist_classifier"
    with pytest.raises(ConfigError, match="context_dim must be 128"):
        check_semantica_config(load_config(CONFIG, ["model.options.context_dim=64"]))
    with pytest.raises(ConfigError, match="class_conditional: false"):
        check_semantica_config(load_config(CONFIG, ["model.class_conditional=true"]))


def test_trained_run_loads_without_the_encoder(run):
    loaded = load_model(run)
    assert loaded.image_shape == (1, 28, 28) and loaded.num_classes == 0
    assert loaded.meta["conditioner"]["name"] == "ccexam_mnistnet" and loaded.meta["conditioner"]["tokens"] == 1
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    weights = load_file(str(ckpt / "model.safetensors"))
    assert sum(v.numel() for v in weights.values()) == count_parameters(loaded.model, trainable_only=False)
    assert (run / "samples" / "final.png").is_file()


def test_sample_api_shapes_modes_and_seeds(run):
    cond = torch.rand(3, 1, 28, 28) * 2 - 1
    x, used = sample_from_condition_images(run, cond, 5, 1.0, seed=4, steps=2)
    assert x.shape == (5, 1, 28, 28) and torch.equal(used, cond)
    y, _ = sample_from_condition_images(run, cond, 5, 1.0, seed=4, steps=2)
    z, _ = sample_from_condition_images(run, cond, 5, 1.0, seed=5, steps=2)
    assert torch.equal(x, y) and not torch.allclose(x, z)
    run_default, _ = sample_from_condition_images(run, cond, 5, None, seed=4, steps=2)  # the run's guidance: 1.0
    unguided, _ = sample_from_condition_images(run, cond, 5, 0.0, seed=4, steps=2)
    assert torch.equal(run_default, x) and not torch.equal(unguided, x)
    for mode in ("concat", "mean"):
        assert sample_from_condition_images(run, cond, 2, 0.0, mode=mode, steps=2)[0].shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError, match="condition mode"):
        sample_from_condition_images(run, cond, 2, mode="median")
    with pytest.raises(ConfigError, match="1 or 3"):
        sample_from_condition_images(run, torch.zeros(2, 2, 28, 28), 2)
    small, _ = sample_from_condition_images(run, cond[:, :, ::2, ::2], 2, steps=2)  # 14x14 input: resized
    assert small.shape == (2, 1, 28, 28)


def test_cli_sample_from_a_folder_is_repeatable(run, tmp_path):
    folder = tmp_path / "few"
    save_images(torch.rand(4, 1, 28, 28) * 2 - 1, folder)
    outs = []
    for i in range(2):
        argv = ["semantica", "sample", str(run), "--condition-images", str(folder), "--num", "6", "--steps", "2",
                "--seed", "3", "--guidance", "1", "--out", str(tmp_path / f"g{i}.png"), "--out-dir",
                str(tmp_path / f"s{i}")]
        args = _parser().parse_args(argv)
        assert args.func(args) == 0
        outs.append(sorted((tmp_path / f"s{i}").iterdir()))
    assert len(outs[0]) == 6 and all(a.read_bytes() == b.read_bytes() for a, b in zip(*outs))
    assert (tmp_path / "g0.png").read_bytes() == (tmp_path / "g1.png").read_bytes()
    with pytest.raises(ConfigError, match="--condition-images"):
        args = _parser().parse_args(["semantica", "sample", str(run)])
        args.func(args)


def test_sample_hook_for_the_main_cli(run, tmp_path):
    """What ``simdiff sample RUN --condition-images DIR`` calls, with the namespace its parser builds."""
    p = argparse.ArgumentParser()
    add_condition_flags(p)
    folder = tmp_path / "few"
    save_images(torch.rand(2, 1, 28, 28) * 2 - 1, folder)
    args = p.parse_args(["--condition-images", str(folder), "--condition-mode", "concat"])
    args.__dict__.update(source=str(run), num=3, guidance=None, seed=None, steps=2, sampler=None,
                         out=str(tmp_path / "grid.png"), out_dir=None, device="cpu", rescale=0.5, interval=None)
    assert semantica_sample_command(args) == 0 and (tmp_path / "grid.png").is_file()


def test_fewshot_eval_command_reports_every_metric(run, capsys):
    import json

    argv = ["semantica", "eval", str(run), "--classes", "7", "--shots", "2", "--num", "6", "--steps", "2"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["classes"]["7"]
    assert set(row) >= {"fd", "kid", "precision", "recall", "copy_fraction", "class_agreement", "median_d_train"}
    assert 0 <= row["precision"] <= 1 and 0 <= row["copy_fraction"] <= 1 and report["mean"]["fd"] == row["fd"]



def test_module_entry_point_reports_errors_in_one_line(capsys):
    from simdiff.semantica.sample import main

    assert main(["train", str(CONFIG.parent / "mnist.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an image-conditioned config" in err
