"""Two-process gloo DDP on CPU via torchrun: averaged gradients equal the single-process full-batch gradient."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simdiff.train import BatchIterator
from simdiff.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from ddp_check import make, mse  # noqa: E402
from tiny_train import TinyNet, make_data  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "scripts" / "ddp_check.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ddp_gradient_equals_full_batch_gradient(ddp_out):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    batch = next(BatchIterator(make_data(), 16, seed=7))
    loss = mse(model, batch, None).mean()
    loss.backward()
    for r in (0, 1):
        got = load_file(str(ddp_out / f"grads_rank{r}.safetensors"))
        assert abs(got.pop("__loss__").item() - loss.item()) < 1e-6  # the logged loss is all-reduced
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-6)


def test_ddp_training_matches_single_process_and_only_rank0_writes(ddp_out, tmp_path):
    torch.set_num_threads(1)
    single = make(tmp_path / "single", 4, 0, 1)
    single.fit()
    p0 = load_file(str(ddp_out / "params_rank0.safetensors"))
    p1 = load_file(str(ddp_out / "params_rank1.safetensors"))
    for k, v in single.model.state_dict().items():
        assert torch.equal(p0[k], p1[k])  # ranks stay in sync
        torch.testing.assert_close(p0[k], v, rtol=0, atol=1e-5)
    rank0 = sorted(p.name for p in (ddp_out / "run_rank0").iterdir())
    assert rank0 == ["checkpoints", "loss_curve.png", "metrics.csv"]
    assert [p.name for p in (ddp_out / "run_rank0" / "checkpoints").iterdir()] != []
    rank1 = ddp_out / "run_rank1"
    assert not rank1.exists() or not any(rank1.iterdir())


def test_single_process_helpers_are_no_ops():
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size) == (0, 1) and D.is_main() and not D.is_distributed()
    x = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(x) is x
    m = torch.nn.Linear(2, 2)
    assert D.wrap_model(m) is m and D.unwrap_model(m) is m
    with pytest.raises(ValueError, match="valid: ddp, fsdp"):
        D.wrap_model(m, "zero3")
