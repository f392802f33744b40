"""``simdiff train / sample / eval`` on a rolling-diffusion config through the command line: a tiny Kolmogorov-flow
run, then a rollout written as PNG strip, GIF and .npz, and its forecast scores; bad rollout flags are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from simdiff.cli import main

TINY = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=0",
        "--set", "train.progress=false", "--set", "train.log_every=1", "--set", "sample.num=1",
        "--set", "model.options.dim=16", "--set", "model.options.depth=1", "--set", "model.options.heads=2",
        "--set", "data.options.trajectories=2", "--set", "data.options.frames=10",
        "--set", "data.options.resolution=16", "--set", "data.options.solver_size=32",
        "--set", "data.options.frame_every=8", "--set", "data.options.burn_in=1.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("SIMDIFF_CACHE", str(root / "cache"))
    assert main(["train", "simdiff/configs/kolmogorov_rolling.yaml", "--run-dir", str(root / "run"), *TINY]) == 0
    yield root
    mp.undo()


def test_sample_writes_strip_gif_and_npz(run, capsys):
    out = run / "rollout.png"
    assert main(["sample", str(run / "run"), "--frames", "5", "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    gif = Image.open(out.with_suffix(".gif"))
    assert gif.n_frames == 5
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    frames = [a for a in arrays.values() if a.ndim == 5]
    assert frames and frames[0].shape[:2] == (2, 5) and np.isfinite(frames[0]).all()


def test_eval_scores_per_lead_time(run, capsys):
    path = run / "scores.json"
    assert main(["eval", str(run / "run"), "--frames", "4", "--num", "2", "--steps", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["num"] == 2 and len(result["mse"]) == 4 and all(np.isfinite(result["mse"]))


@pytest.mark.parametrize("flags", [["--frames", "0"], ["--sampler", "unipc"], ["--context-start", "999"]])
def test_bad_rollout_flags_are_one_line(run, capsys, flags):
    assert main(["sample", str(run / "run"), "--num", "1", "--steps", "2", "--out", str(run / "bad.png"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
