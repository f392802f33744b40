"""Sampling jobs of ``simdiff serve``: one worker thread per model, a bounded queue, progress, PNG results.

Each model has one :class:`ModelWorker`: a thread that runs that model's jobs one at a time, in order, under
``torch.inference_mode`` (the server's event loop only queues and reads jobs, so it never waits for a sampler). At
most ``max_queue`` jobs wait behind the running one; one more is refused with :class:`QueueFull`. Progress is the
count of network calls made so far over the count the sampler makes (``simdiff.samplers.nfe`` per batch), counted
by a thin wrapper of the denoiser.
"""

from __future__ import annotations

import io
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from typing import Any

import torch
from PIL import Image

from simdiff.generate import generate
from simdiff.images import make_grid, to_uint8
from simdiff.runs import class_null_cond
from simdiff.serve.models import ModelEntry, SampleRequest

__all__ = ["Job", "JobStore", "ModelWorker", "QueueFull", "grid_png"]


class QueueFull(RuntimeError):
    """A model's queue is full; the message says so in one line."""


class Job:
    """One sample request on its way: ``status`` is queued, running, done or error; ``done`` / ``total`` count
    network calls; ``png`` holds the grid once done, ``error`` one line if it failed."""

    def __init__(self, request: SampleRequest):
        self.id = secrets.token_hex(8)
        self.request = request
        self.status = "queued"
        self.done = 0
        self.total = request.total_calls
        self.error: str | None = None
        self.png: bytes | None = None
        self.size: tuple[int, int] | None = None
        self.created = time.time()
        self.seconds: float | None = None

    def to_json(self, position: int | None = None) -> dict[str, Any]:
        doc = {"id": self.id, "status": self.status, "done": self.done, "total": self.total,
               "params": self.request.describe()}
        if position is not None:
            doc["position"] = position
        if self.status == "done":
            doc.update(image=f"/api/jobs/{self.id}/image.png", width=self.size[0], height=self.size[1],
                       seconds=round(self.seconds, 3))
        if self.error is not None:
            doc["error"] = self.error
        return doc


class JobStore:
    """The jobs the server remembers, by id; the oldest finished ones are forgotten past ``keep``."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.status in ("done", "error")]
            for k in finished[: max(0, len(self._jobs) - self.keep)]:
                del self._jobs[k]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)


class _Counting:
    """``net`` called through, counting calls into ``job.done`` (capped at ``job.total``); other attributes
    (``guidance_input``, ``wants_host_level``, ...) are the network's."""

    def __init__(self, net, job: Job):
        self._net, self._job = net, job

    def __call__(self, *args, **kwargs):
        self._job.done = min(self._job.done + 1, self._job.total)
        return self._net(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._net, name)


def grid_png(x: torch.Tensor, *, nrow: int | None = None, scale: int = 1) -> tuple[bytes, tuple[int, int]]:
    """Images ``[N, C, H, W]`` in [-1, 1] -> one PNG grid (``nrow`` per row, each pixel ``scale`` x ``scale``);
    returns the PNG bytes and its ``(width, height)``."""
    arr = to_uint8(make_grid(x, nrow=nrow))
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img.size


def run_job(job: Job, device: torch.device | str = "cpu") -> None:
    """Sample ``job``'s request and store its PNG grid (or its error) on the job."""
    req = job.request
    lm = req.entry.loaded
    job.status = "running"
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            x = generate(_Counting(lm.model, job), lm.schedule, lm.image_shape, req.cfg, labels=req.labels,
                         num_classes=lm.num_classes, null_cond=class_null_cond(lm.num_classes), device=device,
                         process=lm.process)
        job.png, job.size = grid_png(x, nrow=req.nrow, scale=max(1, 64 // lm.image_shape[-1]))
        job.done = job.total
        job.seconds = time.perf_counter() - start
        job.status = "done"
    except Exception as e:  # noqa: BLE001 - reported to the page as one line; the worker keeps serving
        if not isinstance(e, ValueError):
            traceback.print_exc(file=sys.stderr)
        job.error = " ".join(f"{type(e).__name__}: {e}".split()) if not isinstance(e, ValueError) else \
            " ".join(str(e).split())
        job.status = "error"


class ModelWorker:
    """The thread that samples one model: jobs run one at a time in arrival order, at most ``max_queue`` wait."""

    def __init__(self, entry: ModelEntry, *, max_queue: int, device: torch.device | str = "cpu"):
        self.entry, self.max_queue, self.device = entry, max_queue, device
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.current: Job | None = None

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it. Raises :class:`QueueFull` when full."""
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                running = 1 if self.current is not None else 0
                raise QueueFull(f"model {self.entry.id!r} is busy: {running} request running and "
                                f"{len(self._pending)} waiting, the most this server queues; try again when one "
                                f"finishes")
            self._pending.append(job)
            ahead = len(self._pending) - 1 + (1 if self.current is not None else 0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"simdiff-serve-{self.entry.id}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
            return ahead

    def position(self, job: Job) -> int | None:
        """Jobs ahead of a queued ``job`` (``None`` once it runs or finished)."""
        with self._cond:
            if job not in self._pending:
                return None
            return list(self._pending).index(job) + (1 if self.current is not None else 0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self.current = self._pending.popleft()
                job.status = "running"
            try:
                run_job(job, self.device)
            finally:
                with self._cond:
                    self.current = None

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, drop the waiting ones (marked as errors) and wait up to ``timeout`` s for the thread."""
        with self._cond:
            self._stop = True
            for job in self._pending:
                job.status, job.error = "error", "the server stopped before this request ran"
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
