"""``simdiff quantize`` through the command line: a tiny run quantised to W8A8 with trajectory calibration, then
sampled and inspected from the quantised file by ``simdiff sample``; bad outputs are refused before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from simdiff import experiment
from simdiff.cli import main
from simdiff.configuration import from_dict
from simdiff.quant.io import is_quantized_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

FAST = ["--num-calib", "16", "--set", "calib_runs=2", "--set", "calib_steps=4", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quant_cli")
    experiment.train(from_dict(experiment.ExperimentConfig, tiny_uvit("tiny", steps=4)), root / "run")
    return root


def test_quantize_then_sample_the_file(run, capsys):
    q = run / "q.safetensors"
    assert main(["quantize", str(run / "run"), str(q), *FAST]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["weight_bits"] == 8 and summary["calibration"] == "trajectory" and summary["bytes"] > 0
    assert is_quantized_file(q) and q.stat().st_size == summary["bytes"]
    out = run / "q.png"
    assert main(["sample", str(q), "--num", "4", "--steps", "3", "--sampler", "ddim", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("out", ["q.txt", "missing_parent_is_a_file/q.safetensors"])
def test_bad_output_is_refused_before_any_work(run, capsys, out, monkeypatch):
    import simdiff.quant.io as qio

    (run / "missing_parent_is_a_file").write_text("a file, not a folder")
    monkeypatch.setattr(qio, "quantize_loaded", lambda *a, **k: pytest.fail("quantised before checking OUT"))
    assert main(["quantize", str(run / "run"), str(run / out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and str(Path(out).name) in err, err
