"""Two-process gloo DDP and FSDP2 on CPU via one torchrun launch (tests/scripts/ddp_check.py).

DDP: averaged gradients equal the single-process full-batch gradient. FSDP: training equals one process, the
weights are really sharded, checkpoints are full and load in one process, hooks see the full EMA weights, and
resume (FSDP -> FSDP exact, DDP <-> FSDP to 1e-5) continues the run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simdiff.configuration import ConfigError
from simdiff.train import BatchIterator, TrainConfig, load_checkpoint, validate_train_config
from simdiff.train import distributed as D
from simdiff.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from ddp_check import make, mse  # noqa: E402
from launch import torchrun  # noqa: E402
from tiny_train import TinyNet, make_data  # noqa: E402


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(ROOT / "tests" / "scripts" / "ddp_check.py", str(out), root=ROOT)
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


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process 4-step run with the same global batch (checkpoints at steps 2 and 4)."""
    torch.set_num_threads(1)
    t = make(tmp_path_factory.mktemp("single"), 4, 0, 1)
    t.fit()
    return t


def _ckpt(run_dir: Path, step: int):
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:06d}")


def _assert_state_close(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _assert_optimizer_close(a: dict, b: dict, atol: float) -> None:
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        _assert_state_close(a["state"][i], b["state"][i], atol)
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]


def test_ddp_training_matches_single_process_and_only_rank0_writes(ddp_out, single):
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


def test_fsdp_training_matches_single_process_sharded_and_only_rank0_writes(ddp_out, single):
    full = load_file(str(ddp_out / "fsdp_params.safetensors"))
    _assert_state_close(full, single.model.state_dict(), 1e-5)
    shards = [load_file(str(ddp_out / f"fsdp_local_rank{r}.safetensors")) for r in (0, 1)]
    for k, v in full.items():  # each rank holds half of every parameter (dim 0), together the whole
        assert shards[0][k].shape[0] == v.shape[0] // 2
        assert torch.equal(torch.cat([shards[0][k], shards[1][k]]), v)
    assert sorted(p.name for p in (ddp_out / "fsdp_rank0").iterdir()) == ["checkpoints", "loss_curve.png",
                                                                          "metrics.csv"]
    rank1 = ddp_out / "fsdp_rank1"
    assert not rank1.exists() or not any(rank1.iterdir())


def test_fsdp_checkpoint_is_full_and_loads_in_one_process(ddp_out, single, tmp_path):
    torch.set_num_threads(1)
    ck, ref = _ckpt(ddp_out / "fsdp_rank0", 4), _ckpt(single.run_dir, 4)
    TinyNet(dropout=0.0).load_state_dict(ck.model, strict=True)
    _assert_state_close(ck.model, ref.model, 1e-5)
    _assert_state_close(ck.ema, ref.ema, 1e-5)  # the EMA of the shards equals the EMA of the full weights
    _assert_optimizer_close(ck.optimizer, ref.optimizer, 1e-5)  # same index-keyed AdamW layout as one process
    # a single process resumes from the FSDP step-2 checkpoint and lands on the uninterrupted run
    step2 = "checkpoints/step_000002"
    shutil.copytree(ddp_out / "fsdp_rank0" / step2, tmp_path / "r" / step2)
    t = make(tmp_path / "r", 4, 0, 1)
    assert t.fit()["resumed_from"] == 2
    _assert_state_close(t.model.state_dict(), single.model.state_dict(), 1e-5)


def test_fsdp_hook_sees_full_ema_weights_on_rank0(ddp_out):
    for step in (2, 4):
        seen = load_file(str(ddp_out / f"fsdp_hook_step{step}.safetensors"))
        assert seen.pop("__sharded__").item() == 0 and seen.pop("__training__").item() == 0
        ema = _ckpt(ddp_out / "fsdp_rank0", step).ema
        assert sorted(seen) == sorted(ema) and all(torch.equal(seen[k], ema[k]) for k in ema)


def test_fsdp_resume_repeats_uninterrupted_fsdp_run(ddp_out):
    a, b = _ckpt(ddp_out / "fsdp_rank0", 4), _ckpt(ddp_out / "fsdp_resume", 4)
    for part in ("model", "ema"):
        assert all(torch.equal(getattr(a, part)[k], getattr(b, part)[k]) for k in a.model)
    _assert_optimizer_close(a.optimizer, b.optimizer, 0.0)
    rows_a = read_metrics(ddp_out / "fsdp_rank0" / "metrics.csv")
    rows_b = read_metrics(ddp_out / "fsdp_resume" / "metrics.csv")
    assert [r["step"] for r in rows_b] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]


def test_checkpoints_move_between_ddp_and_fsdp(ddp_out):
    fsdp, ddp = _ckpt(ddp_out / "fsdp_rank0", 4), _ckpt(ddp_out / "run_rank0", 4)
    for resumed, ref in ((_ckpt(ddp_out / "ddp_to_fsdp", 4), fsdp), (_ckpt(ddp_out / "fsdp_to_ddp", 4), ddp)):
        _assert_state_close(resumed.model, ref.model, 1e-5)
        _assert_state_close(resumed.ema, ref.ema, 1e-5)
        _assert_optimizer_close(resumed.optimizer, ref.optimizer, 1e-5)  # AdamW moments carried over


def test_strategy_config_field():
    assert TrainConfig().strategy == "ddp"
    validate_train_config(TrainConfig(strategy="fsdp"), 2)
    with pytest.raises(ConfigError, match="valid: ddp, fsdp"):
        validate_train_config(TrainConfig(strategy="zero3"))
