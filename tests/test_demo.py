"""``simdiff demo`` end to end at a tiny budget: the shipped models' grids (with and without guidance, the 4-step
student beside its teacher), a training run whose step count comes from the timed probe, its progress grids and
scores, and the summary page."""

from __future__ import annotations

import json
import re

from simdiff.demo import run_demo


def test_demo_writes_grids_scores_and_a_summary_page(tmp_path, capsys):
    run = tmp_path / "demo"
    result = run_demo(minutes=0.05, run_dir=run, num_eval=20, num_fid=0, num_shipped=10, num_grid=10)
    assert [r["guidance"] for r in result["shipped"]] == [0.0, 2.0]
    assert all(0.0 <= r["accuracy"] <= 1.0 and (run / r["grid"]).is_file() for r in result["shipped"])
    assert [(r["model"], r["steps"]) for r in result["student"]] == [("teacher", 4), ("student", 4), ("teacher", 20)]
    assert len(result["fashion"]) == 2 and result["fashion"][0]["guidance"] == 0.0 < result["fashion"][1]["guidance"]
    assert all((run / r["grid"]).is_file() for r in result["student"] + result["fashion"])
    assert result["steps"] >= 20 and result["seconds_per_step"] > 0
    assert len(result["progress_grids"]) >= 3 and all((run / p).is_file() for p in result["progress_grids"])
    assert result["mnist_fd"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert json.loads((run / "demo_scores.json").read_text()) == result
    page = (run / "index.html").read_text(encoding="utf-8")
    for src in re.findall(r'<img src="([^"]+)"', page):  # every picture the page shows exists beside it
        assert (run / src).is_file(), src
    assert "summary page:" in capsys.readouterr().out
