"""``simdiff`` CLI with kill points, for the reliability tests (a real ``kill -9`` of this process at a chosen event).

    python tests/scripts/rel_train.py [--kill KIND,N[,MODE]] [--trace FILE] [--hold FILE] -- <simdiff CLI args>

Events (counted from this process's start): ``step`` (an optimizer update is about to be applied), ``write:<name>``
(a file write: checkpoint files, temp files of atomic writes), ``replace:<name>`` (an ``os.replace`` onto
``<name>``), ``append`` (a metrics.csv row), ``rmtree:<name>`` (a folder removal: old checkpoints, re-saved steps).
``--kill KIND,N,MODE`` sends SIGKILL to this process at the N-th event whose name starts with KIND; MODE is
``before`` (default), ``after`` or ``torn`` (half of a write's bytes / one file of a removal, then the kill).
``--trace FILE`` appends ``<event> <steps done>`` per event and ``KILL <event> <steps done>`` before a kill.
``--hold FILE`` creates FILE at the first ``step`` event and then sleeps (holding the run directory's lock).

    python tests/scripts/rel_train.py --serve [<simdiff CLI args of a warm-up run>]

imports once and then runs each job read from stdin in a forked child process (see :func:`serve`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

STATE = {"done": 0, "counts": {}, "kill": None, "trace": None, "hold": None}


def _trace(line: str) -> None:
    if STATE["trace"]:
        with open(STATE["trace"], "a") as f:
            f.write(line + "\n")


def _die(event: str) -> None:
    _trace(f"KILL {event} {STATE['done']}")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def _event(name: str) -> str | None:
    """Record ``name``; the kill mode if this event is the one to kill at, else None."""
    _trace(f"{name} {STATE['done']}")
    kill = STATE["kill"]
    if kill is None:
        return None
    kind, nth, mode = kill
    if not name.startswith(kind):
        return None
    STATE["counts"][kind] = STATE["counts"].get(kind, 0) + 1
    return mode if STATE["counts"][kind] == nth else None


def install() -> None:
    from simdiff.train import logging as metrics_log
    from simdiff.train import rundir
    from simdiff.train.trainer import Trainer

    real_update, real_write, real_replace = Trainer.apply_update, rundir.write_synced, os.replace
    real_rmtree, real_append = shutil.rmtree, metrics_log.MetricsLogger._append

    def apply_update(self, loss, lr, step):
        if STATE["hold"] and not Path(STATE["hold"]).exists():
            Path(STATE["hold"]).write_text(str(os.getpid()))
            time.sleep(600)
        if _event("step"):
            _die("step")
        out = real_update(self, loss, lr, step)
        STATE["done"] = step + 1
        return out

    def write_synced(path, data):
        name = f"write:{Path(path).name}"
        mode = _event(name)
        if mode == "before":
            _die(name)
        if mode == "torn":
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            _die(name)
        real_write(path, data)
        if mode == "after":
            _die(name)

    def replace(src, dst, *a, **kw):
        name = f"replace:{Path(dst).name}"
        mode = _event(name)
        if mode in ("before", "torn"):
            _die(name)
        real_replace(src, dst, *a, **kw)
        if mode == "after":
            _die(name)

    def rmtree(path, *a, **kw):
        name = f"rmtree:{Path(path).name}"
        mode = _event(name)
        if mode == "before":
            _die(name)
        if mode == "torn" and Path(path).is_dir():
            files = sorted(p for p in Path(path).iterdir() if p.is_file())
            if files:
                files[0].unlink()
            _die(name)
        real_rmtree(path, *a, **kw)
        if mode == "after":
            _die(name)

    def append(self, data):
        mode = _event("append")
        if mode == "before":
            _die("append")
        if mode == "torn":
            with open(self.path, "ab") as f:
                f.write(data[: len(data) // 2])
            _die("append")
        real_append(self, data)
        if mode == "after":
            _die("append")

    Trainer.apply_update = apply_update
    rundir.write_synced = write_synced
    os.replace = replace
    shutil.rmtree = rmtree
    metrics_log.MetricsLogger._append = append


def _parse(argv: list[str]) -> list[str]:
    """Set STATE from this script's own flags; return the simdiff CLI arguments."""
    cut = argv.index("--")
    own, cli = argv[:cut], argv[cut + 1:]
    STATE.update(done=0, counts={}, kill=None, trace=None, hold=None)
    for flag, value in zip(own[::2], own[1::2]):
        if flag == "--kill":
            kind, nth, *mode = value.split(",")
            STATE["kill"] = (kind, int(nth), mode[0] if mode else "before")
        elif flag == "--trace":
            STATE["trace"] = value
        elif flag == "--hold":
            STATE["hold"] = value
        else:
            raise SystemExit(f"unknown option {flag}")
    return cli


def _wait(pid: int, kill_after: float | None) -> int:
    """Wait for child ``pid``; with ``kill_after`` (seconds), SIGKILL it if it still runs by then. The wait status.
    (The child is not reaped before the kill, so its PID cannot have been reused.)"""
    if kill_after is None:
        return os.waitpid(pid, 0)[1]
    end = time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= end:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.002)


def serve(warm: list[str]) -> int:
    """Import once (and run the CLI arguments ``warm`` once, to load lazily imported modules, data and fonts), then
    fork one child process per job (a JSON line ``{"args": [...], "log": PATH, "kill_after": SECONDS or absent}`` on
    stdin; ``kill_after``: SIGKILL the child then if it still runs); answer ``{"rc": exit status, negative for a
    signal}`` per job on stdout. Each child is a separate process that runs the CLI with its
    hooks, as a fresh interpreter would, minus the start-up time."""
    import contextlib
    import io
    import json

    from simdiff.cli import main as cli_main

    if warm:
        with contextlib.redirect_stdout(io.StringIO()):
            if cli_main(warm) != 0:
                raise SystemExit(f"warm-up run {warm} failed")

    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: its output goes to the job's log file, never to the answer pipe
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                code = cli_main(_parse(job["args"]))
            except BaseException:  # noqa: BLE001 - reported in the log, exit status 1
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = _wait(pid, job.get("kill_after"))
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "pid": pid}), flush=True)
    return 0


def main() -> int:
    import torch

    torch.set_num_threads(1)
    install()
    if sys.argv[1:2] == ["--serve"]:
        return serve(sys.argv[2:])
    from simdiff.cli import main as cli_main

    return cli_main(_parse(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
