"""`simdiff detect` (add_detect_parser) and the hallucination-score option of sampling, on the shipped model with
few steps."""

import argparse

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.detect import DIREClassifier, save_classifier
from simdiff.detect.cli import add_detect_parser, add_hallucination_flags, sample_with_scores
from simdiff.generate import SampleConfig, generate
from simdiff.images import save_images
from simdiff.runs import class_null_cond, load_model
from simdiff.shipped import PRETRAINED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_detect_parser(p.add_subparsers(dest="cmd"))
    return p


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_images(x, d)
    return d


def test_detect_free_prints_one_score_per_image(folder, tmp_path, capsys):
    args = _parser().parse_args(["detect", str(folder), "--model", "pretrained", "--steps", "2",
                                 "--json", str(tmp_path / "s.json")])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# mean DIRE error") and len(lines) == 4
    scores = [float(line.split("\t")[0]) for line in lines[1:]]
    assert all(s > 0.01 for s in scores)  # uniform noise images are far from digits
    assert (tmp_path / "s.json").exists()


def test_detect_with_classifier(folder, tmp_path, capsys):
    path = save_classifier(DIREClassifier(1), tmp_path / "c.safetensors", info={"steps": 2, "order": 1})
    one = sorted(folder.iterdir())[0]
    args = _parser().parse_args(["detect", str(one), "--model", "pretrained", "--method", "dire",
                                 "--classifier", str(path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "P(generated)" in out[0] and "2 steps" in out[0] and len(out) == 2
    assert 0.0 < float(out[1].split("\t")[0]) < 1.0


@pytest.mark.parametrize("argv, match", [
    (["--method", "dire"], "needs --classifier"),
    (["--classifier", "x.safetensors"], "dire only"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_detect_bad_flags(folder, argv, match):
    args = _parser().parse_args(["detect", str(folder), "--model", "pretrained", *argv])
    with pytest.raises(ConfigError, match=match):
        args.func(args)


def test_detect_missing_images(tmp_path):
    args = _parser().parse_args(["detect", str(tmp_path / "nope"), "--model", "pretrained", "--steps", "1"])
    with pytest.raises(ConfigError, match="no such image"):
        args.func(args)


def test_sample_with_scores_writes_csv_and_keeps_images(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_hallucination_flags(p)
    p.add_argument("--out")
    args = p.parse_args(["--hallucination-score", "3", "--out", str(tmp_path / "g.png")])
    loaded = load_model(PRETRAINED)
    cfg = SampleConfig(sampler="ddim", steps=4, num=4, grid="uniform_t")
    labels = torch.arange(4)
    x = sample_with_scores(args, loaded, cfg, labels, "cpu")
    ref = generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, labels=labels, num_classes=10,
                   null_cond=class_null_cond(10))
    assert torch.equal(x, ref)
    rows = (tmp_path / "g_scores.csv").read_text().strip().splitlines()
    assert rows[0] == "index,label,score" and len(rows) == 5 and all(float(r.split(",")[2]) > 0 for r in rows[1:])
    assert "most suspicious" in capsys.readouterr().out
    args.hallucination_score = 1
    with pytest.raises(ConfigError, match=">= 2"):
        sample_with_scores(args, loaded, cfg, labels, "cpu")


def test_generate_scored_with_guidance_matches_generate():
    from simdiff.detect import generate_scored

    loaded = load_model(PRETRAINED)
    cfg = SampleConfig(sampler="dpmpp_2m", steps=3, num=2, guidance=2.0)
    labels = torch.tensor([3, 7])
    kw = dict(labels=labels, num_classes=10, null_cond=class_null_cond(10))
    x, s = generate_scored(loaded.model, loaded.schedule, loaded.image_shape, cfg, last=2, **kw)
    assert torch.equal(x, generate(loaded.model, loaded.schedule, loaded.image_shape, cfg, **kw))
    assert s.shape == (2,) and bool((s > 0).all())
