"""``simdiff edit`` through its parser: a small edit of one MNIST test image writes a before/after grid; bad input is
refused with one line and exit status 2 before the model is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
from PIL import Image

from simdiff.configuration import ConfigError
from simdiff.images import save_grid
from simdiff.invert.cli import add_edit_parser, main


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    from simdiff.data import DataConfig, build_dataset

    ds = build_dataset(dataclasses.replace(DataConfig(name="mnist"), split="test", limit=20))
    i = int((ds.labels == 3).nonzero()[0])
    path = tmp_path_factory.mktemp("edit") / "three.png"
    save_grid(ds.images[i:i + 1].float(), path, padding=0)
    return path


def test_parser_registers_edit():
    parser = argparse.ArgumentParser()
    add_edit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["edit", "a.png", "--source-label", "3", "--target-label", "8,5"])
    assert args.method == "ddim" and args.model == "pretrained" and args.guidance == 2.0 and callable(args.func)


def test_edit_writes_a_before_after_grid(digit, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["edit", str(digit), str(digit), "--source-label", "3", "--target-label", "8,5", "--steps", "3",
                 "--method", "ddpm", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["target_labels"] == [8, 5]
    assert summary["nfe_inversion"] == 6 == summary["nfe_generation"]  # 3 guided steps, 2 evaluations each
    with Image.open(out) as im:  # 2 columns (images) x 3 rows (input, 8, 5) of 28x28 at scale 2, padding 2
        assert im.size == (2 * 56 + 3 * 2 * 2, 3 * 56 + 4 * 2 * 2)


@pytest.mark.parametrize("extra, match", [
    (["--target-label", "eight"], "--target-label"),
    (["--target-label", "12"], "not a class"),
    (["--target-label", "8", "--strength", "1.5"], "--strength"),
    (["--target-label", "8", "--skip", "5", "--steps", "5"], "--skip"),
    (["--target-label", "8", "--out", "grid.jpg"], ".png"),
    (["--target-label", "8", "--mixing", "0"], "--mixing"),
    (["--target-label", "8", "--model", "no/such/run"], "no/such/run"),
])
def test_bad_input_is_one_line_exit_2(digit, tmp_path, capsys, extra, match):
    argv = ["edit", str(digit), "--source-label", "3", *extra]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and match in err, err


def test_missing_image_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import simdiff.runs

    monkeypatch.setattr(simdiff.runs, "load_model", lambda *a, **k: pytest.fail("loaded before checking IMAGE"))
    assert main(["edit", str(tmp_path / "none.png"), "--source-label", "3", "--target-label", "8"]) == 2
    assert "none.png" in capsys.readouterr().err


def test_config_errors_are_raised_for_the_main_cli(digit):
    parser = argparse.ArgumentParser()
    add_edit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["edit", str(digit), "--source-label", "3", "--target-label", "8", "--steps", "0"])
    with pytest.raises(ConfigError, match="--steps"):
        args.func(args)
