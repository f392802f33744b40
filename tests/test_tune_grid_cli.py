"""``simdiff tune-grid RUN`` then ``simdiff sample|eval RUN --grid tuned``: the fitted grid is the one sampled with."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simdiff.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_uvit("tiny", steps=2, sampler="unipc", sample_steps=3, sample_num=4)))
    assert main(["train", str(cfg), "--run-dir", str(root / "run")]) == 0
    return root / "run"


def test_tune_then_sample_with_the_tuned_grid(run, tmp_path, capsys, monkeypatch) -> None:
    args = ["tune-grid", str(run), "--steps", "3", "--n-cal", "4", "--n-val", "4", "--ref-steps", "12",
            "--iters", "2", "--guidance", "1.5"]
    assert main(args) == 0
    stored = json.loads((run / "tuned_grids.json").read_text())
    assert list(stored) == ["unipc/3/1.5"]
    levels = [math.inf if v == "inf" else v for v in stored["unipc/3/1.5"]["logsnrs"]]
    assert len(levels) == 4 and levels[-1] == math.inf

    import simdiff.generate as gen

    seen = []
    real = gen.make_grid

    def spy_sampler(name):
        sampler = gen.SAMPLERS[name]

        def wrapped(denoise, z, grid, **kw):
            seen.append(grid.clone())
            return sampler(denoise, z, grid, **kw)
        return wrapped

    monkeypatch.setattr(gen, "get_sampler", spy_sampler)
    out = tmp_path / "tuned.png"
    assert main(["sample", str(run), "--grid", "tuned", "--steps", "3", "--guidance", "1.5", "--num", "4",
                 "--out", str(out)]) == 0
    assert out.is_file() and torch.equal(seen[-1], torch.tensor(levels, dtype=torch.float64))
    assert main(["sample", str(run), "--grid", "auto", "--steps", "3", "--num", "4", "--out", str(out)]) == 0
    from simdiff.runs import load_model

    assert torch.equal(seen[-1], real(load_model(run).schedule, 3, kind="auto"))
    capsys.readouterr()


def test_missing_tuned_grid_is_one_line(run, tmp_path, capsys) -> None:
    out = tmp_path / "x.png"
    assert main(["sample", str(run), "--grid", "tuned", "--steps", "7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no tuned grid for unipc/7/0" in err and "simdiff tune-grid" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["sample", "pretrained", "--grid", "tuned", "--steps", "3", "--out", str(out)]) == 2
    assert "not one" in capsys.readouterr().err
    assert main(["tune-grid", str(run), "--steps", "1"]) == 2
    assert main(["tune-grid", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err
