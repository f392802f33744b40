"""Reliability of a run directory: one owner at a time (file lock), disk full and read-only directories, damaged
checkpoints, resumes refused before anything is written, and every failure one line with exit 2."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from simdiff.cli import main
from simdiff.train import checkpoint as ck
from simdiff.train import rundir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "rel_train.py"
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

CONFIG = tiny_uvit("relck", steps=4, checkpoint_every=2, log_every=1, sample_num=2)
CONFIG["train"]["device"] = "cpu"  # the bitwise guarantees are for the CPU


def _digest(run_dir: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``run_dir`` (by relative path)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in skip}


def _one_line_exit_2(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) of a finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("relck")
    cfg = root / "relck.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(cfg), "--run-dir", str(root / "run")]) == 0
    return cfg, root / "run"


def _copy(trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained[1], tmp_path / "run"))


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    c = ck.load_latest(run_dir)
    return {**{f"model.{k}": v for k, v in c.model.items()}, **{f"ema.{k}": v for k, v in c.ema.items()}}


# ------------------------------------------------------------------------------------------------- the lock
def test_run_lock_names_the_holder_and_is_reentrant(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / rundir.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ck.RunLockedError, match=f"PID {holder.pid}") as err:
            with rundir.run_lock(tmp_path):
                pass
        assert "\n" not in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    assert rundir.lock_holder(tmp_path) == holder.pid  # the dead holder's PID is still in the file ...
    with rundir.run_lock(tmp_path) as path:  # ... and does not block
        assert rundir.lock_holder(tmp_path) == os.getpid()
        with rundir.run_lock(tmp_path):  # re-entered by the same process
            pass
        assert path.read_text().strip() == str(os.getpid())
    assert not (tmp_path / rundir.LOCK_NAME).exists()


def test_second_trainer_exits_2_naming_the_first_and_a_stale_lock_does_not_block(trained, tmp_path, capsys):
    cfg, _ = trained
    run, flag = tmp_path / "run", tmp_path / "holding"
    first = subprocess.Popen([sys.executable, str(SCRIPT), "--hold", str(flag), "--", "train", str(cfg), "--run-dir",
                              str(run)], env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():  # the first trainer holds the lock and sits inside its first step
            assert first.poll() is None and time.monotonic() < deadline, first.stderr and first.stderr.read()
            time.sleep(0.1)
        before = _digest(run)
        _one_line_exit_2(capsys, ["train", str(cfg), "--run-dir", str(run)], f"PID {first.pid}", "in use")
        assert _digest(run) == before  # the second trainer wrote nothing
    finally:
        first.kill()  # kill -9: the lock file keeps the dead PID, the OS dropped the lock
        first.wait()
    assert rundir.lock_holder(run) == first.pid
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    assert not (run / rundir.LOCK_NAME).exists() and not list(run.rglob(".tmp-*"))
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_000002", "step_000004"]


def test_save_removes_only_its_own_temp_folders(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    other = root / f".tmp-step_000009-{os.getppid()}"  # a live process's (the parent of this one)
    mine = rundir.temp_path(root / "step_000009")
    other.mkdir()
    mine.mkdir()
    ck.save_checkpoint(tmp_path, 1, model={"w": torch.ones(2)})
    assert other.is_dir() and not mine.exists()


# ------------------------------------------------------------------------------------- full or read-only disk
@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_checkpoint_one_line_and_resumable(trained, tmpfs, tmp_path, capsys):
    cfg, ref = trained
    run = Path(shutil.copytree(ref, tmpfs / "run"))
    for p in ck.list_checkpoints(run)[1:]:  # keep only step 2: the run goes on from there
        shutil.rmtree(p)
    checkpoints = _digest(run / "checkpoints")
    st = os.statvfs(tmpfs)
    free = st.f_bavail * st.f_frsize
    with open(tmpfs / "filler", "wb") as f:  # leave 48 KiB: room for the logs, not for a checkpoint
        f.write(b"\0" * (free - 48 * 1024))
    err = _one_line_exit_2(capsys, ["train", str(cfg), "--run-dir", str(run)], "no space left", "resumable",
                           "step_000002", "step_000004/")
    assert not list(run.rglob(".tmp-*"))
    assert _digest(run / "checkpoints") == checkpoints, err  # the last good checkpoint is intact
    (tmpfs / "filler").unlink()
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0  # resumes from step 2
    want, got = _final_weights(ref), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    ref_rows = [r.split(",") for r in (ref / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[:4] + r[5:] for r in rows] == [r[:4] + r[5:] for r in ref_rows]


def test_read_only_run_dir_one_line_and_unchanged(trained, tmpfs, capsys):
    cfg, ref = trained
    run = Path(shutil.copytree(ref, tmpfs / "run"))
    before = _digest(run)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    _one_line_exit_2(capsys, ["train", str(cfg), "--run-dir", str(run), "--set", "train.steps=6"],
                     "Read-only file system", "writable", "resumable")
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert _digest(run) == before


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "writable"), (errno.ENOSPC, "no space left")])
def test_write_errors_inside_a_checkpoint_and_the_metrics(trained, tmp_path, monkeypatch, capsys, code, needle):
    """Simulated at the write itself (works without root): a checkpoint file, then a metrics row."""
    cfg, _ = trained
    run = tmp_path / "run"
    real = rundir.write_synced

    def failing(path, data):
        if Path(path).name == "optimizer.safetensors":
            raise OSError(code, os.strerror(code))
        real(path, data)

    monkeypatch.setattr(rundir, "write_synced", failing)
    _one_line_exit_2(capsys, ["train", str(cfg), "--run-dir", str(run)], needle, "step_000002/optimizer.safetensors",
                     "restarts from step 0")
    assert not list(run.rglob(".tmp-*")) and not ck.list_checkpoints(run)
    monkeypatch.setattr(rundir, "write_synced", real)

    from simdiff.train.logging import MetricsLogger

    def failing_append(self, data):
        with open(self.path, "ab") as f:
            f.write(data[:5])  # a part of the row reaches the disk before the error
        raise OSError(code, os.strerror(code), str(self.path))

    real_append = MetricsLogger._append
    calls = []
    monkeypatch.setattr(MetricsLogger, "_append", lambda self, data: (calls.append(1), (
        failing_append if len(calls) == 4 else real_append)(self, data))[1])
    _one_line_exit_2(capsys, ["train", str(cfg), "--run-dir", str(run)], needle, "metrics.csv")
    monkeypatch.undo()
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0  # resumes from step 2, drops the partial row
    assert [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ damaged checkpoints
def test_flipped_bytes_are_detected_and_skipped_with_one_warning(trained, tmp_path, capsys):
    cfg, _ = trained
    run = _copy(trained, tmp_path)
    newest = ck.list_checkpoints(run)[-1] / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-7] ^= 0x40  # one flipped bit in a weight: same size, still a valid safetensors file
    newest.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="contents altered"):
        ck.load_checkpoint(newest.parent)
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0] and "step_000002" in warnings[0]
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0  # resumes from step 2, rewrites step 4
    err = capsys.readouterr().err
    assert err.count("skipping damaged checkpoint") == 1, err
    want, got = _final_weights(trained[1]), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_non_finite_weights_are_refused_on_load(trained, tmp_path):
    run = _copy(trained, tmp_path)
    path = ck.list_checkpoints(run)[-1]
    c = ck.load_checkpoint(path)
    model = {k: v.clone() for k, v in c.model.items()}
    next(v for v in model.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    with pytest.raises(ck.CheckpointError, match="NaN"):
        ck.save_checkpoint(run, 9, model=model)  # never written ...
    from safetensors.torch import save as st_save

    data = st_save(model, metadata={"format": ck.FORMAT})
    (path / "model.safetensors").write_bytes(data)  # ... nor read, even with a matching size and hash
    doc = json.loads((path / "state.json").read_text())
    doc["files"]["model.safetensors"] = len(data)
    doc["sha256"]["model.safetensors"] = hashlib.sha256(data).hexdigest()
    doc["state_sha256"] = ck._doc_digest(doc)
    (path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ck.CheckpointError, match="holds NaN/inf"):
        ck.load_checkpoint(path)


# ------------------------------------------------------------------------------- refused before anything is written
@pytest.mark.parametrize("override, needles", [
    ("model.options.dim=48", ("model.options.dim: 32 -> 48", "--run-dir", "cannot resume")),
    ("model.parameterisation=eps", ("model.parameterisation: 'v' -> 'eps'", "--run-dir")),
    ("train.optim.grad_clip=nan", ("train.optim.grad_clip", "nan")),
    ("train.optim.lr=inf", ("train.optim.lr", "inf")),
    ("train.batch_size=0", ("train.batch_size",)),
    ("train.device=gpu", ("train.device", "gpu")),
])
def test_bad_resume_or_option_leaves_the_run_unchanged(trained, tmp_path, capsys, override, needles):
    cfg, _ = trained
    run = _copy(trained, tmp_path)
    before = _digest(run)
    _one_line_exit_2(capsys, ["train", str(cfg), "--run-dir", str(run), "--set", override, "--set",
                              "train.steps=6"], *needles)
    assert _digest(run) == before  # config.yaml included
    assert not list(run.rglob(".tmp-*"))
