"""``simdiff likelihood`` and the ``bpd`` metric on the shipped model (a few images, few network calls)."""

from __future__ import annotations

import argparse
import json

import pytest

from simdiff.configuration import ConfigError
from simdiff.likelihood.cli import add_likelihood_parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="simdiff")
    add_likelihood_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_elbo_and_ode_on_the_shipped_model(tmp_path, capsys) -> None:
    out = tmp_path / "bpd.json"
    args = _parse(["likelihood", "pretrained", "--num", "3", "--num-times", "2", "--proposal", "uniform",
                   "--device", "cpu", "--json", str(out)])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert doc["method"] == "elbo" and doc["num"] == 3 and doc["network_calls"] == 6
    assert 0.5 < doc["bpd"] < 12 and doc["bpd_se"] > 0
    assert doc["bpd"] == pytest.approx(doc["bpd_prior"] + doc["bpd_reconstruction"] + doc["bpd_diffusion"])
    args = _parse(["likelihood", "pretrained", "--num", "2", "--method", "ode", "--steps", "1", "--solver", "euler",
                   "--device", "cpu"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "ode" and doc["network_calls"] == 2 and doc["dequantization"] == "uniform"
    assert doc["bpd"] == pytest.approx(doc["bpd_prior"] + doc["bpd_divergence"] + doc["bpd_dequantization"])


def test_bpd_metric_fits_the_eval_contract() -> None:
    from simdiff.eval.likelihood import bpd_metric
    from simdiff.runs import load_model
    from simdiff.shipped import PRETRAINED

    loaded = load_model(PRETRAINED)
    scores = bpd_metric(loaded, num=2, method="elbo", num_times=2, proposal="schedule")
    assert {"bpd", "bpd_se", "bpd_mc_se"} <= set(scores) and all(isinstance(v, float) for v in scores.values())
    with pytest.raises(ConfigError, match="at least 2"):
        bpd_metric(loaded, num=1)


@pytest.mark.parametrize(("argv", "match"), [(["--num", "1"], "--num"),
                                             (["--method", "ode", "--probes", "0"], "--probes")])
def test_cli_bad_flags_are_one_line(argv: list[str], match: str) -> None:
    args = _parse(["likelihood", "pretrained", *argv])
    with pytest.raises(ConfigError, match=match):
        args.func(args)


def test_conditional_and_fitted_proposal_paths() -> None:
    import torch

    from simdiff.eval.likelihood import heldout_images, likelihood_of_loaded
    from simdiff.runs import load_model
    from simdiff.shipped import PRETRAINED

    loaded = load_model(PRETRAINED)
    x, labels = heldout_images(loaded.config, 2)
    assert x.shape == (2, 1, 28, 28) and labels.shape == (2,)
    kw = dict(method="elbo", num_times=2, seed=3)
    uncond = likelihood_of_loaded(loaded, x, labels, **kw)  # the fitted proposal (default) on 2 pilot images
    cond = likelihood_of_loaded(loaded, x, labels, conditional=True, **kw)
    assert "fitted" in uncond.info["proposal"] and uncond.info["pilot_network_calls"] == 2 * 48
    assert bool(torch.isfinite(uncond.nll).all()) and not torch.equal(uncond.nll, cond.nll)
    with pytest.raises(ConfigError, match="method"):
        likelihood_of_loaded(loaded, x, labels, method="vlb")


def test_eval_metrics_bpd_runs_through_the_main_cli(tmp_path, capsys) -> None:
    """``simdiff eval --metrics bpd`` scores test images (no sampling) and writes the same JSON it prints."""
    from simdiff.cli import main

    out = tmp_path / "scores.json"
    assert main(["eval", "pretrained", "--metrics", "bpd", "--num", "2", "--device", "cpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"bpd", "bpd_se"} and 0.5 < doc["bpd"] < 12
    assert main(["eval", "pretrained", "--metrics", "bpd,nope", "--num", "2"]) == 2
    assert "unknown metric" in capsys.readouterr().err
