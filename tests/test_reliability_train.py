"""Reliability of `simdiff train` through the CLI, in subprocesses: two identical commands give identical runs, and
kill -9 at random moments (inside checkpoint writes, the metrics rewrite, old-checkpoint removal, training steps)
followed by the same command ends in the uninterrupted run's state, bit for bit.

Every column of metrics.csv is compared except ``images_per_s`` (a wall-clock measurement).
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simdiff.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "rel_train.py"
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

STEPS, EVERY = 6, 2
#: log_every=3 with checkpoints every 2 steps: a resume lands inside a loss-averaging window
CONFIG = tiny_uvit("rel", steps=STEPS, checkpoint_every=EVERY, log_every=3)
CONFIG["train"]["device"] = "cpu"  # the bitwise guarantees are for the CPU
KILLS = int(os.environ.get("SIMDIFF_REL_KILLS", "5"))
SEED = int(os.environ.get("SIMDIFF_REL_SEED", "2026"))


def _cmd(run_dir: Path, cfg: Path, *hook: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *hook, "--", "train", str(cfg), "--run-dir", str(run_dir)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Runner:
    """Runs ``simdiff train`` jobs in separate processes forked from one server that imported simdiff once
    (``rel_train.py --serve``); each job is killed by SIGKILL at its kill point like a fresh process would be."""

    def __init__(self, log_dir: Path, cfg: Path):
        self.log_dir, self.count = log_dir, 0
        warm = ["train", str(cfg), "--run-dir", str(log_dir / "warm-up")]
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--serve", *warm], env=_env(), cwd=ROOT,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, run_dir: Path, cfg: Path, *hook: str, kill_after: float | None = None) -> tuple[int, str]:
        """(exit status, negative for a signal; the job's stdout + stderr). ``kill_after``: SIGKILL the job after
        that many seconds if it still runs."""
        self.count += 1
        log = self.log_dir / f"job{self.count}.log"
        args = [*hook, "--", "train", str(cfg), "--run-dir", str(run_dir)]
        job = {"args": args, "log": str(log), **({"kill_after": kill_after} if kill_after is not None else {})}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the job server died"
        return json.loads(answer)["rc"], log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # idle between jobs: nothing to finish
        self.proc.wait(timeout=60)


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(f)]


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a finished run by relative path (bytes), metrics.csv and the loss curve PNG excepted (they
    hold the wall-clock throughput)."""
    skip = {"metrics.csv", "loss_curve.png"}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in skip}


def _assert_same_run(got: Path, want: Path, what: str) -> None:
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b), f"{what}: files differ: {sorted(set(a) ^ set(b))}"
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{what}: contents differ in {differ}"
    assert _metrics(got) == _metrics(want), what
    assert not [p for p in got.rglob(".tmp-*")], f"{what}: temp files left"


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The config, and the job server (:class:`Runner`) started early: it imports while the reference runs."""
    root = tmp_path_factory.mktemp("rel")
    cfg = root / "rel.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    r = Runner(tmp_path_factory.mktemp("logs"), cfg)
    yield cfg, r
    r.close()


@pytest.fixture(scope="module")
def reference(started) -> tuple[Path, Path, Path]:
    """Two identical commands started together: (config, run A, run B)."""
    cfg, _ = started
    root = cfg.parent
    procs = [subprocess.Popen(_cmd(root / name, cfg), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return cfg, root / "a", root / "b"


@pytest.fixture(scope="module")
def runner(started, reference) -> Runner:
    return started[1]


def test_two_identical_commands_give_identical_runs(reference):
    _, a, b = reference
    assert [int(r["step"]) for r in _metrics(a)] == [3, 6]
    assert [p.name for p in ck.list_checkpoints(a)] == ["step_000002", "step_000004", "step_000006"]
    _assert_same_run(b, a, "second identical command")  # weights, EMA, optimizer, RNG states, samples, config
    assert not (a / ".lock").exists()  # released cleanly


def test_kill_before_the_first_checkpoint_then_rerun_is_identical(reference, runner, tmp_path):
    cfg, a, _ = reference
    run = tmp_path / "run"
    rc, log = runner(run, cfg, "--kill", "step,2")  # SIGKILL just before the second update: one step done
    assert rc == -9, log
    assert not ck.list_checkpoints(run) and (run / ".lock").is_file()  # the dead process's lock file stays
    rc, log = runner(run, cfg)
    assert rc == 0, log
    _assert_same_run(run, a, "rerun after a kill before the first checkpoint")


def _kill_specs(rng: random.Random, n: int) -> list[str]:
    """``n`` kill points: one torn checkpoint-file write, one metrics.csv rewrite, one SIGKILL from outside after a
    random delay, the rest at random events."""
    files = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
    anywhere = [f"write:{rng.choice(files)},{rng.randint(1, 2)},{rng.choice(('before', 'torn', 'after'))}",
                f"replace:step_,{rng.randint(1, 2)},{rng.choice(('before', 'after'))}",
                f"rmtree:step_,1,{rng.choice(('before', 'torn'))}",
                f"step,{rng.randint(1, STEPS)}",
                f"append,1,{rng.choice(('before', 'torn', 'after'))}",
                f"write:.tmp-metrics.csv,1,{rng.choice(('before', 'torn'))}"]
    specs = [f"write:{rng.choice(files)},{rng.randint(1, 2)},torn",
             f"replace:metrics.csv,1,{rng.choice(('before', 'after'))}", f"timer,{rng.uniform(0.05, 0.8):.3f}"]
    specs += [rng.choice(anywhere) for _ in range(max(n - 3, 0))]
    rng.shuffle(specs)
    return specs[:n]


def _steps_done(trace: Path) -> int:
    """Steps done at the last event the process recorded (its kill point, if it killed itself)."""
    lines = trace.read_text().splitlines() if trace.exists() else []
    return int(lines[-1].split()[-1]) if lines else 0


def test_random_kills_end_in_the_uninterrupted_state(reference, runner, tmp_path):
    """Each kill is followed by the same command; a command that finishes the run before its kill point ends that
    run (compared with the uninterrupted one) and the next kill starts a new run directory."""
    cfg, a, _ = reference
    rng = random.Random(SEED)
    specs = _kill_specs(rng, KILLS)
    runs, hit = [tmp_path / "run0"], []
    for i, spec in enumerate(specs):
        trace, run = tmp_path / f"trace{i}", runs[-1]
        if spec.startswith("timer,"):  # SIGKILL from outside after a random delay
            rc, log = runner(run, cfg, "--trace", str(trace), kill_after=float(spec.split(",")[1]))
        else:
            rc, log = runner(run, cfg, "--kill", spec, "--trace", str(trace))
        where = f"seed {SEED}, kill {i} ({spec})"
        if rc == 0:  # the command finished the run before reaching its kill point
            _assert_same_run(run, a, f"{where}, after kills {hit}")
            runs.append(tmp_path / f"run{len(runs)}")
            continue
        assert rc == -9, f"{where}: {log}"
        hit.append(spec)
        newest = ck.load_latest(run)  # no damaged checkpoint is ever visible (fallback not needed)
        kept, done = (newest.step if newest is not None else 0), _steps_done(trace)
        assert done - kept <= EVERY, f"{where}: {done} steps done, only {kept} kept"
    assert len(hit) >= min(KILLS, 3), f"seed {SEED}: only {hit} of {specs} were reached"
    rc, log = runner(runs[-1], cfg)
    assert rc == 0, log
    _assert_same_run(runs[-1], a, f"seed {SEED}, kills {hit}")
    print(f"seed {SEED}: {len(hit)} of {len(specs)} kill points reached in {len(runs)} run(s): {hit}")
