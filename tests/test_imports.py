"""One direction of imports: sampling and run loading never pull in the distillation losses or the trainer."""

from __future__ import annotations

import json
import subprocess
import sys

SNAP = "print(json.dumps(sorted(m for m in sys.modules if m.startswith('simdiff'))))"


def _snapshots(*steps: str) -> list[list[str]]:
    """Run ``steps`` one after the other in a fresh interpreter; the ``simdiff.*`` modules loaded after each."""
    code = "import json, sys\n" + "".join(f"{step}\n{SNAP}\n" for step in steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()[-len(steps):]
    return [json.loads(line) for line in lines]


def _under(modules: list[str], package: str) -> list[str]:
    return [m for m in modules if m == package or m.startswith(package + ".")]


SAMPLE = """
from simdiff.generate import SampleConfig, generate
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture
mix = GaussianMixture.random(2, 3, seed=0)
for sampler in ("ddim", "moment_matching"):
    cfg = SampleConfig(sampler=sampler, steps=3, grid="uniform_t", num=4)
    assert generate(mix.denoise, get_schedule("cosine"), (2,), cfg).shape == (4, 2)
"""


def test_generate_loads_neither_distill_nor_train():
    """Importing ``simdiff.generate``, and then sampling with a core and a student sampler, stays clear of both."""
    imported, sampled = _snapshots("import simdiff.generate", SAMPLE)
    assert "simdiff.generate" in imported
    assert _under(imported, "simdiff.distill") == [] and _under(imported, "simdiff.train") == []
    assert _under(sampled, "simdiff.distill") == [], "sampling loaded the distillation package"
    assert _under(sampled, "simdiff.train") == [], "sampling loaded the training package"


def test_run_loading_and_training_glue_do_not_load_distill():
    """``simdiff.runs`` (load_model, sample_grid, evaluate_model; it reads checkpoints with
    ``simdiff.train.checkpoint``), the student wrappers and the CLI entry point need no distillation code, and the
    training glue does not import the distillation glue (no cycle)."""
    runs, students, cli, experiment = _snapshots("import simdiff.runs", "import simdiff.nets.students",
                                                 "import simdiff.cli", "import simdiff.experiment")
    assert "simdiff.runs" in runs and "simdiff.experiment" not in runs
    for mods in (runs, students, cli, experiment):
        assert _under(mods, "simdiff.distill") == [], mods
    assert "simdiff.experiment" in experiment
