"""Distillation under DDP (2 gloo processes on CPU, tests/scripts/distill_ddp_check.py) equals one process.

Moment matching (auxiliary denoiser + Adam) and EMD (student-score network + Adam) keep loss-owned networks outside
DDP; their gradients are averaged over ranks before each auxiliary step, so after a few steps the student *and* the
auxiliary weights and Adam moments of both ranks equal the single-process run with the same global batch (1e-5).
Without the averaging each rank's auxiliary network would follow only its own half of the batch (the test then
fails). The script makes each example's random draws independent of the number of processes (see its docstring), so
the two runs see the same noise and can be compared number for number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from distill_ddp_check import build, run  # noqa: E402
from launch import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill_ddp")
    torchrun(ROOT / "tests" / "scripts" / "distill_ddp_check.py", str(out), root=ROOT)
    return out


@pytest.mark.parametrize("method", ["mm", "emd"])
def test_two_process_distillation_equals_one_process(two_ranks, method, tmp_path):
    torch.set_num_threads(1)
    single = run(method, 0, 1, tmp_path)
    ranks = [load_file(str(two_ranks / f"{method}_world2_rank{r}.safetensors")) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(single) and any(k.startswith("aux.opt.") for k in single)
    for k, v in single.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the ranks agree exactly (aux included)
        torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-5, msg=k)
    start = build(method)[1].aux_state_dict()  # the auxiliary network did move
    assert any(not torch.allclose(start[k[4:]], single[k]) for k in single if k.startswith("aux.net."))
