"""Cascades: output size, seeds, the one-file artefact, the CLI and one-line errors for bad cascade files; the photo
cascade's configs and an unconditional RGB cascade; ``benchmarks/cascade.py --data photos`` end to end.

The stages are tiny networks trained for one or two steps (on 8x8 digits: a 4x4 class-conditional base model and a
4 -> 8 super-resolution model; on photo patches: an unconditional 16x16 base model and a 16 -> 32 super-resolution
model): these tests are about the plumbing, not about sample quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simdiff.cascade import load_cascade, load_sr_config, sample_cascade, save_cascade, train_sr
from simdiff.cascade.cascade import is_cascade_source
from simdiff.cascade.cli import add_cascade_parser, main
from simdiff.configuration import ConfigError
from simdiff.experiment import load_config, train

ONE = ["train.steps=1", "train.batch_size=4", "train.checkpoint_every=0", "train.progress=false",
       "train.log_every=1", "train.sample_every=0", "sample.steps=2", "sample.num=2"]
CONFIGS = Path(__file__).resolve().parents[1] / "simdiff" / "configs"
TINY = ["model.arch=unet", "model.options={channels: [8, 16], num_res_blocks: 1, attention_levels: [], "
        "mid_attention: false}"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cascade")
    base = load_config(CONFIGS / "mnist_14.yaml", [*ONE, *TINY, "data.name=digits", "data.split=train",
                                                         "data.limit=16", "data.image_size=4",
                                                         "diffusion.schedule={name: cosine}"])
    train(base, root / "base")
    cfg, sr = load_sr_config(CONFIGS / "mnist_sr.yaml", [
        *ONE, *TINY, "data.name=digits", "data.split=train", "data.limit=16", "sr.low_res_size=4"])
    train_sr(cfg, sr, root / "sr")
    (root / "cascade.yaml").write_text(yaml.safe_dump({"name": "tiny", "num": 5, "seed": 3, "stages": [
        {"source": "base", "sampler": "ddim", "steps": 3},
        {"source": "sr", "sampler": "dpmpp_2m", "steps": 2, "aug_logsnr": 2.0}]}))
    return root


def test_cascade_output_size_stages_and_seeds(stages):
    cascade = load_cascade(stages / "cascade.yaml")
    assert [s.kind for s in cascade.stages] == ["base", "sr"] and cascade.image_shape == (1, 8, 8)
    assert cascade.stages[0].sample.sampler == "ddim" and cascade.stages[1].aug_logsnr == 2.0
    outs = sample_cascade(cascade, return_stages=True)
    assert [tuple(o.shape) for o in outs] == [(5, 1, 4, 4), (5, 1, 8, 8)]
    assert torch.equal(outs[-1], sample_cascade(cascade, seed=3))  # the cascade's seed is the default
    other = sample_cascade(cascade, seed=4)
    assert other.shape == (5, 1, 8, 8) and not torch.equal(other, outs[-1])
    assert tuple(sample_cascade(cascade, num=2, seed=3).shape) == (2, 1, 8, 8)
    no_aug = sample_cascade(cascade, aug_logsnr=None)
    assert not torch.equal(no_aug, outs[-1])  # the level reaches the super-resolution stage


def test_one_file_cascade_round_trip(stages, tmp_path):
    cascade = load_cascade(stages / "cascade.yaml")
    path = save_cascade(cascade, tmp_path / "c.safetensors")
    assert is_cascade_source(path) and is_cascade_source(stages / "cascade.yaml")
    again = load_cascade(path)
    assert [s.sample for s in again.stages] == [s.sample for s in cascade.stages]
    assert again.stages[1].aug_logsnr == 2.0 and (again.num, again.seed, again.name) == (5, 3, "tiny")
    assert torch.equal(sample_cascade(again), sample_cascade(cascade))


def test_cli_sample_and_pack(stages, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cascade_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cascade", "sample", str(stages / "cascade.yaml"), "--out", str(tmp_path / "s.png"),
                              "--strip", "--device", "cpu", "--aug-logsnr", "none", "--num", "3"])
    assert args.aug_logsnr is None and args.func(args) == 0 and (tmp_path / "s.png").stat().st_size > 0
    assert main(["pack", str(stages / "cascade.yaml"), str(tmp_path / "c.safetensors")]) == 0
    assert main(["sample", str(tmp_path / "c.safetensors"), "--info", "--device", "cpu"]) == 0
    assert '"kind": "sr"' in capsys.readouterr().out


def test_simdiff_sample_hook_refuses_per_stage_flags_and_detects_sources(stages, tmp_path):
    from simdiff.cascade.cli import cmd_sample_cascade, is_sr_config

    args = argparse.Namespace(source=str(stages / "cascade.yaml"), sampler="ddim", steps=None, out=None,
                              out_dir=None, device="cpu")
    with pytest.raises(ConfigError, match="--sampler"):
        cmd_sample_cascade(args)
    assert is_sr_config(CONFIGS / "mnist_sr.yaml") and not is_sr_config(CONFIGS / "mnist_14.yaml")
    assert is_cascade_source(CONFIGS / "mnist_cascade.yaml") and not is_cascade_source(CONFIGS / "mnist_sr.yaml")


def _bad_files(stages: Path, tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (file text, what the error must mention)."""
    base, sr = str(stages / "base"), str(stages / "sr")
    return {
        "list": ("- 1\n- 2\n", "mapping"),
        "one_stage": (yaml.safe_dump({"stages": [{"source": base}]}), "at least one super-resolution"),
        "unknown_key": (yaml.safe_dump({"stages": [{"source": base}, {"source": sr}], "num_images": 3}), "num_images"),
        "stage_key": (yaml.safe_dump({"stages": [{"source": base}, {"source": sr, "aug": 1}]}), "stages[1].aug"),
        "missing": (yaml.safe_dump({"stages": [{"source": base}, {"source": str(tmp / "nope")}]}), "nope"),
        "sr_first": (yaml.safe_dump({"stages": [{"source": sr}, {"source": sr}]}), "stage 0"),
        "base_second": (yaml.safe_dump({"stages": [{"source": base}, {"source": base}]}), "stage 1"),
        "chain": (yaml.safe_dump({"stages": [{"source": base}, {"source": sr}, {"source": sr}]}), "super-resolves"),
        "aug_on_base": (yaml.safe_dump({"stages": [{"source": base, "aug_logsnr": 1.0}, {"source": sr}]}),
                        "aug_logsnr"),
        "sampler": (yaml.safe_dump({"stages": [{"source": base}, {"source": sr, "sampler": "nope"}]}), "sampler"),
        "steps": (yaml.safe_dump({"stages": [{"source": base}, {"source": sr, "steps": 0}]}), "steps"),
    }


def test_bad_cascade_files_give_one_line(stages, tmp_path, capsys):
    for name, (text, needle) in _bad_files(stages, tmp_path).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_cascade(path)
        assert main(["sample", str(path), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("simdiff: error:") and "\n" not in err, (name, err)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    packed = save_cascade(load_cascade(stages / "cascade.yaml"), tmp_path / "ok.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(packed.read_bytes()[:1000])
    for path in (junk, truncated, stages / "base" / "missing.safetensors"):
        assert main(["sample", str(path), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("simdiff: error:") and "\n" not in err, err


# ---------------------------------------------------------------------------------------------- photo patches

TWO = [o.replace("train.steps=1", "train.steps=2") for o in ONE]


def test_photo_configs_load():
    from simdiff.cascade.cli import is_sr_config

    base = load_config(CONFIGS / "photos_16.yaml")
    assert base.data.name == "photos" and base.data.image_size == 16 and not base.model.class_conditional
    assert base.data.options == {"patch_size": 32, "stride": 16}
    cfg, sr = load_sr_config(CONFIGS / "photos_sr.yaml")
    assert cfg.data.name == "photos" and cfg.data.image_size is None and not cfg.model.class_conditional
    assert cfg.data.options == base.data.options and cfg.data.hflip == base.data.hflip
    assert (sr.low_res_size, sr.downsample, sr.aug_logsnr) == (16, "antialias", 4.0)
    assert cfg.diffusion.schedule["image_size"] == 32
    assert is_sr_config(CONFIGS / "photos_sr.yaml") and is_cascade_source(CONFIGS / "photos_cascade.yaml")
    doc = yaml.safe_load((CONFIGS / "photos_cascade.yaml").read_text())
    assert [st["source"] for st in doc["stages"]] == ["runs/photos_16", "runs/photos_sr"] and doc["labels"] is None


@pytest.fixture(scope="module")
def photo_stages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photo_cascade")
    train(load_config(CONFIGS / "photos_16.yaml", [*TWO, *TINY, "data.limit=16"]), root / "base")
    cfg, sr = load_sr_config(CONFIGS / "photos_sr.yaml", [*TWO, *TINY, "data.limit=16"])
    train_sr(cfg, sr, root / "sr")
    (root / "cascade.yaml").write_text(yaml.safe_dump({"name": "photos", "num": 3, "seed": 5, "stages": [
        {"source": "base", "sampler": "ddim", "steps": 3},
        {"source": "sr", "sampler": "dpmpp_2m", "steps": 2}]}))
    return root


def test_unconditional_photo_cascade_samples_rgb_deterministically(photo_stages, tmp_path, capsys):
    cascade = load_cascade(photo_stages / "cascade.yaml")
    assert [s.num_classes for s in cascade.stages] == [0, 0] and cascade.image_shape == (3, 32, 32)
    assert cascade.stages[1].aug_logsnr == 4.0  # the run's sr.aug_logsnr
    low, high = sample_cascade(cascade, num=4, return_stages=True)
    assert tuple(low.shape) == (4, 3, 16, 16) and tuple(high.shape) == (4, 3, 32, 32)
    assert torch.isfinite(high).all() and high.abs().max() <= 1
    assert torch.equal(high, sample_cascade(cascade, num=4, seed=5))
    assert not torch.equal(high, sample_cascade(cascade, num=4, seed=6))
    assert torch.equal(sample_cascade(load_cascade(save_cascade(cascade, tmp_path / "p.safetensors")), num=4), high)
    with pytest.raises(ConfigError, match="unconditional"):
        sample_cascade(cascade, num=4, labels=[0, 1, 2, 3])
    assert main(["sample", str(photo_stages / "cascade.yaml"), "--device", "cpu", "--labels", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "unconditional" in capsys.readouterr().err


def _tiny_photo_configs(root: Path) -> Path:
    """photos_16.yaml and photos_sr.yaml with the tiny network of ``TINY`` (the rest of the recipes unchanged)."""
    root.mkdir()
    for name in ("photos_16.yaml", "photos_sr.yaml"):
        doc = yaml.safe_load((CONFIGS / name).read_text())
        doc["model"]["options"] = {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [],
                                   "mid_attention": False}
        (root / name).write_text(yaml.safe_dump(doc))
    return root


def test_cascade_benchmark_photos_end_to_end(tmp_path, monkeypatch):
    """Three tiny trainings, sampling, tables, JSON and gallery; the Inception scorer is replaced by a stub that
    records what it is asked (the 2048-d FID alone takes seconds a call on one CPU thread)."""
    spec = importlib.util.spec_from_file_location("bench_cascade", CONFIGS.parents[1] / "benchmarks" / "cascade.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CONFIGS", _tiny_photo_configs(tmp_path / "configs"))
    monkeypatch.setenv("SIMDIFF_CACHE", str(tmp_path / "cache"))
    import simdiff.eval

    asked = []

    def fake_scores(x, ref, *, metrics, labels, reference_key, **_):  # Inception scoring: tests/test_eval.py
        asked.append((tuple(x.shape), tuple(ref.shape), tuple(metrics), labels, reference_key))
        return {"fid": 1.0, "kid": 0.002, "kid_std": 0.0}

    monkeypatch.setattr(simdiff.eval, "evaluate_samples", fake_scores)
    out = tmp_path / "results"
    assert bench.main(["--data", "photos", "--steps", "4", "--batch", "4", "--num-eval", "4", "--num-ref", "4",
                       "--sample-steps", "2", "--augs", "none", "--run-dir", str(tmp_path / "runs"),
                       "--results-dir", str(out), "--gallery", str(tmp_path / "g.png")]) == 0
    key = "photos-test-patch_size_32-stride_16-3x32x32-4"
    assert asked == [((4, 3, 32, 32), (4, 3, 32, 32), ("fid", "kid"), None, key)] * 4
    doc = json.loads((out / "cascade_photos.json").read_text())
    assert doc["header"] == ["model", "steps x batch", "train s", "FID", "KID x1e3", "sample s"]
    assert doc["aug_header"] == ["input", "aug log-SNR", "low-res MSE", "FID", "KID x1e3"]
    assert [r[0] for r in doc["main"]] == ["single-stage 32x32", "cascade 16 -> 32 (aug 4.0)"]
    assert [r[0] for r in doc["augmentation"]] == ["cascade (base samples)", "SR of real 16x16 test patches"]
    assert [r[3:5] for r in doc["main"]] == [[1.0, 2.0]] * 2  # FID, KID x 1e3
    assert [r[3:] for r in doc["augmentation"]] == [[1.0, 2.0]] * 2 and all(r[2] >= 0 for r in doc["augmentation"])
    assert doc["args"]["name"] == "cascade_photos" and (out / "cascade_photos.md").is_file()
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "photos_base_2x4", "photos_cascade.yaml", "photos_single_4x4", "photos_sr_2x4"]
