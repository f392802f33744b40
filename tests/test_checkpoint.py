"""Checkpoint tests: round trip, atomic writes, corruption, inference export, and kill -9 + exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from simdiff.train import checkpoint as ck
from simdiff.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "tiny_train.py"


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    ema = {k: v.float() * 0.5 for k, v in model.state_dict().items()}
    return model, opt, ema


def _save(run_dir, step, seed=0, **kw):
    model, opt, ema = _state(seed)
    return ck.save_checkpoint(run_dir, step, model=model.state_dict(), optimizer=opt.state_dict(), ema=ema,
                              rng={"torch_cpu": torch.get_rng_state()}, state={"config": {"lr": 1e-3}}, **kw)


def test_round_trip_restores_everything(tmp_path):
    model, opt, ema = _state()
    path = _save(tmp_path, 7)
    assert path.name == "step_000007" and sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    c = ck.load_latest(tmp_path)
    assert c.step == 7 and c.state["config"] == {"lr": 1e-3} and c.state["version"]
    assert all(torch.equal(v, c.model[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, c.ema[k]) for k, v in ema.items())
    assert torch.equal(c.rng["torch_cpu"], torch.get_rng_state()) and c.rng["torch_cpu"].dtype == torch.uint8
    # the optimizer state loads into a fresh AdamW and matches the original exactly
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    opt2.load_state_dict(ck.merge_param_groups(c.optimizer, opt2.state_dict()))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["betas"] == b["param_groups"][0]["betas"] and b["param_groups"][0]["lr"] == 1e-3
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])


def test_keep_last_and_nonfinite_refused(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    model, _, _ = _state()
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["0.weight"][0, 0] = float("nan")
    with pytest.raises(ck.CheckpointError, match="0.weight.*NaN/inf"):
        ck.save_checkpoint(tmp_path, 5, model=bad)
    assert not (tmp_path / "checkpoints" / "step_000005").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 10)
    # 1) a writer killed mid-way: a temp dir with half-written files stays behind
    tmp = tmp_path / "checkpoints" / ".tmp-step_000020-999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 17)
    assert ck.load_latest(tmp_path).step == 10
    # 2) a writer that raises after the first file: nothing new becomes visible, the temp dir is cleaned up
    real, calls = ck._write_bytes, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(ck, "_write_bytes", failing)
    with pytest.raises(ck.RunDirError, match="simulated") as err:
        _save(tmp_path, 30)
    monkeypatch.setattr(ck, "_write_bytes", real)
    msg = str(err.value)
    assert "\n" not in msg and "step_000030/ema.safetensors" in msg and "resumable" in msg and "step_000010" in msg
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000010"]
    assert ck.load_latest(tmp_path).step == 10
    # the failed save removed its own temp dir and left the other process's alone
    assert [p.name for p in (tmp_path / "checkpoints").glob(".tmp-*")] == [tmp.name]


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"), ("garble", "contents altered"), ("json", "bad JSON"),
    ("missing", "missing file"), ("no_state", "incomplete checkpoint"), ("old_garble", "not a valid safetensors"),
    ("flip_json", "contents altered"), ("old_nan", "holds NaN/inf"),
])
def test_corrupt_checkpoint_errors_and_fallback(tmp_path, damage, reason, capsys):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2, seed=1)
    target = "state.json" if damage in ("json", "no_state", "flip_json") else "model.safetensors"
    f = path / target
    if damage.startswith("old_"):  # a checkpoint written before hashes existed
        doc = json.loads((path / "state.json").read_text())
        del doc["sha256"], doc["state_sha256"]
        (path / "state.json").write_text(json.dumps(doc))
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-10])
    elif damage in ("garble", "old_garble"):
        f.write_bytes(b"\xff" * len(f.read_bytes()))
    elif damage == "flip_json":  # the same size, one digit of the step changed
        f.write_text(f.read_text().replace('"step": 2', '"step": 3'))
    elif damage == "old_nan":  # a NaN of the same size in a weight: only the finiteness check can see it
        data = bytearray(f.read_bytes())
        data[-4:] = bytes.fromhex("0000c07f")  # float32 NaN, little endian
        f.write_bytes(bytes(data))
    elif damage == "json":
        f.write_text('{"format": "simdiff-checkpoint-v1", "step": ')
    else:
        f.unlink()
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_latest(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{f}: ") and reason in msg and "\n" not in msg
    capsys.readouterr()
    assert ck.load_latest(tmp_path, fallback=True).step == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simdiff: warning: skipping damaged checkpoint") and reason in err[0]


def test_checkpoint_without_hashes_still_loads(tmp_path):
    path = _save(tmp_path, 4)
    doc = json.loads((path / "state.json").read_text())
    assert set(doc["sha256"]) == set(doc["files"]) and len(doc["state_sha256"]) == 64
    del doc["sha256"], doc["state_sha256"]  # as written before hashes existed
    (path / "state.json").write_text(json.dumps(doc, indent=1))
    c = ck.load_checkpoint(path)
    model, _, _ = _state()
    assert c.step == 4 and all(torch.equal(v, c.model[k]) for k, v in model.state_dict().items())


def test_export_and_load_inference(tmp_path):
    _save(tmp_path, 3)
    out = ck.export_inference(tmp_path, tmp_path / "export" / "model.safetensors")
    state, config = ck.load_inference(out)
    assert config == {"lr": 1e-3}
    _, _, ema = _state()
    assert all(torch.equal(state[k], ema[k]) for k in ema)  # EMA weights, not the live ones
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    m.load_state_dict(state)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="bad.safetensors: not a valid safetensors"):
        ck.load_inference(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointError, match="no checkpoint to export"):
        ck.export_inference(tmp_path / "empty", tmp_path / "x.safetensors")
    with pytest.raises(ck.CheckpointError, match="a file, not a run or checkpoint directory"):
        ck.export_inference(out, tmp_path / "y.safetensors")
    with pytest.raises(ck.CheckpointError, match="is a directory"):
        ck.export_inference(tmp_path, tmp_path / "export")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ck.CheckpointError, match="cannot write the export"):
        ck.export_inference(tmp_path, tmp_path / "afile" / "m.safetensors")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.safetensors"]  # no temp file left


def _run(*args, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def test_kill9_then_resume_is_bit_identical(tmp_path):
    steps, every = 40, 5
    full = _run(tmp_path / "full", steps, "--ckpt-every", every)
    killed = _run(tmp_path / "killed", steps, "--ckpt-every", every, "--sleep", 0.04)
    deadline = time.time() + 120
    while not ck.list_checkpoints(tmp_path / "killed") and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    seed = random.randrange(10**6)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))
    assert killed.poll() is None, f"run finished before the kill (seed {seed})"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert full.wait(timeout=120) == 0, full.stderr.read().decode()
    resumed_from = ck.load_latest(tmp_path / "killed").step
    assert 0 < resumed_from < steps
    resumed = _run(tmp_path / "killed", steps, "--ckpt-every", every)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
    key = ("step", "loss", "lr", "grad_norm")
    a = [tuple(r[k] for k in key) for r in read_metrics(tmp_path / "full" / "metrics.csv")]
    b = [tuple(r[k] for k in key) for r in read_metrics(tmp_path / "killed" / "metrics.csv")]
    assert len(a) == steps and a == b, f"seed {seed}, resumed from {resumed_from}"
    fa, fb = ck.load_latest(tmp_path / "full"), ck.load_latest(tmp_path / "killed")
    assert fa.step == fb.step == steps
    assert all(torch.equal(fa.model[k], fb.model[k]) and torch.equal(fa.ema[k], fb.ema[k]) for k in fa.model)
    state = json.loads((fb.path / "state.json").read_text())
    assert state["data"] == json.loads((fa.path / "state.json").read_text())["data"]
