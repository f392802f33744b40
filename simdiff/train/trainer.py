"""The training loop: accumulate, clip, skip non-finite updates, EMA, checkpoint, log. Knows nothing of diffusion.

Contract: ``loss_fn(model, batch, generator) -> Tensor[B]`` returns per-example losses; the trainer takes their
mean. Randomness is a pure function of ``(seed, rank, step)``: before step ``k`` the global torch RNG (dropout) is
seeded with ``mix_seed("global", seed, rank, k)`` and the generator handed to ``loss_fn`` with ``mix_seed("loss",
seed, rank, k, micro)``; the data order is a pure function of ``(seed, epoch, position)``. A resumed run therefore
repeats an uninterrupted one bit for bit (on the same device and thread count); the global python / numpy / torch
RNG states are saved and restored as well, for user code that draws from them between steps (a fresh run seeds the
python and numpy ones from ``seed``). The initial weights are the caller's: :func:`simdiff.experiment.train` draws
them from ``seed`` too. A loss object with state of its own (distillation: auxiliary networks and their optimizers,
a progressive round's teacher) exposes ``aux_state_dict()`` / ``load_aux_state_dict(d)``; the trainer writes it
into every checkpoint (``aux.safetensors``, rank 0's copy) and restores it on resume. The mean loss logged every
``log_every`` steps continues across a resume (its running sum and count are in the checkpoint).

A step whose all-reduced loss or gradient norm is NaN/inf is skipped (no optimizer or EMA update, gradients
dropped) and counted; ``max_nonfinite`` *consecutive* skips abort with :class:`NonFiniteError` and no
checkpoint is written (checkpoints are also checked for finiteness before they are written).

No host synchronisation per step: the loss, the gradient norm, the finiteness check and the skip counts stay on the
device (:class:`~simdiff.train.guard.StepGuard`); the host reads them at log, hook and checkpoint steps and at least
every ``max_nonfinite`` steps. On CUDA the optimizer is fused AdamW and a skipped update is skipped inside the
kernel (its ``found_inf`` input, as under a gradient scaler: parameters, moments and step count untouched) and the
EMA's update weight becomes 0; on CPU (where reading a flag costs nothing) and under FSDP the host reads the flag
and does not call the optimizer. When the consecutive-skip limit is reached no later update is applied, and the next
read raises :class:`NonFiniteError` naming that step, so the weights are those of the step where it tripped. Batches
come from a background thread that stages the next one in pinned memory and copies it with ``non_blocking`` on a
side stream (CUDA only; :class:`~simdiff.train.batches.DevicePrefetcher`).

Strategies (``strategy`` / ``TrainConfig.strategy``; see :mod:`simdiff.train.distributed`): ``ddp`` replicates the
model; ``fsdp`` shards parameters, gradients, AdamW moments and the EMA (FSDP2, one unit per block). Under FSDP
every rank joins the gathers of full state dicts at checkpoint time and only rank 0 writes; the files are the
same unsharded format as DDP / one process, so a run can resume under the other strategy (weights, EMA and
AdamW state all carry over; only bitwise identity of the continuation is lost, reduction order differs).
Hooks under FSDP run on rank 0 on an unsharded copy of the model holding the gathered EMA (or live) weights.
"""

from __future__ import annotations

import copy
import logging as pylogging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simdiff.configuration import to_dict
from simdiff.train import checkpoint as ckpt_io
from simdiff.train import distributed as D
from simdiff.train import resume as resume_mod
from simdiff.train import rundir
from simdiff.train.batches import BatchIterator, DevicePrefetcher, mix_seed
from simdiff.train.config import TrainConfig, ema_decay, lr_at, validate_train_config
from simdiff.train.ema import EMA
from simdiff.train.guard import GuardState, NonFiniteError, StepGuard
from simdiff.train.logging import MetricsLogger, plot_loss_curve

__all__ = ["Trainer", "NonFiniteError", "LossFn", "Hook"]

log = pylogging.getLogger(__name__)
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Generator], torch.Tensor]
Hook = Callable[["Trainer", int], None]


class Trainer:
    """Train ``model`` on ``loss_fn`` over batches from ``data`` for ``cfg.steps`` optimizer steps.

    Args:
        model: the plain module (moved to the device; under torchrun wrapped in DDP or sharded in place by
            FSDP2, compiled if asked).
        loss_fn: ``loss_fn(model, batch, generator) -> Tensor[B]`` per-example losses.
        data: a :class:`BatchIterator` whose ``batch_size`` is ``cfg.batch_size`` and whose rank / world_size
            match the process group.
        cfg: the :class:`TrainConfig`. run_dir: checkpoints, metrics.csv, loss_curve.png go here.
        config_dict: the full experiment config, saved in every checkpoint and in inference exports.
        hooks: ``hook(trainer, step)`` called on rank 0 every ``cfg.sample_every`` steps with the EMA weights
            swapped in, the model in eval mode, under ``torch.no_grad()`` (use ``torch.enable_grad()`` inside a
            hook that needs gradients); hooks must not run collectives (other ranks do not call them). Under
            FSDP ``trainer.model`` is, during hooks, an unsharded copy (kept on rank 0's device for the whole run:
            one full model of memory there) loaded with the gathered weights; pass the same hooks on every rank
            (the gather is collective).
        resume: continue from the newest loadable checkpoint in ``run_dir`` if there is one.
        on_resume: ``on_resume(checkpoint_or_None)`` is called on every rank inside :meth:`fit`, once the checkpoint to
            resume from is read (None: a fresh start) and before any state is restored or any log written; it may
            raise to refuse the resume (the experiment checks the network config there and writes config.yaml).
        strategy: "ddp" or "fsdp" (default: ``cfg.strategy``); irrelevant in a single process.
        find_unused_parameters: passed to DDP.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: BatchIterator, cfg: TrainConfig,
                 run_dir: str | Path, *, config_dict: dict[str, Any] | None = None, hooks: Sequence[Hook] = (),
                 resume: bool = True, strategy: str | None = None, find_unused_parameters: bool = False,
                 on_resume: Callable[[ckpt_io.Checkpoint | None], None] | None = None):
        self.dist = D.init_distributed(cfg.device)
        self.device, self.rank, self.world_size = self.dist.device, self.dist.rank, self.dist.world_size
        validate_train_config(cfg, self.world_size)
        strategy = cfg.strategy if strategy is None else strategy
        if strategy not in D.STRATEGIES:
            raise ValueError(f"unknown distributed strategy {strategy!r}; valid: {', '.join(D.STRATEGIES)}")
        if cfg.compile and self.device.type != "cuda":
            raise ValueError(f"compile=True is supported on CUDA only (device is {self.device}); set compile=False")
        got = (data.batch_size, data.rank, data.world_size)
        if got != (cfg.batch_size, self.rank, self.world_size):
            raise ValueError(f"BatchIterator (batch_size, rank, world_size)={got} but the trainer needs "
                             f"{(cfg.batch_size, self.rank, self.world_size)}")
        self.cfg, self.loss_fn, self.data, self.hooks = cfg, loss_fn, data, list(hooks)
        self.run_dir, self.config_dict = Path(run_dir), dict(config_dict or {})
        self.is_main, self.resume, self.on_resume = self.rank == 0, resume, on_resume
        self.model = model.to(self.device)
        self.model.train()
        cuda = self.device.type == "cuda"
        if cuda and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.channels_last = cuda and cfg.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        fsdp = strategy == "fsdp" and self.world_size > 1
        # hooks need full weights: under FSDP rank 0 keeps an unsharded copy, taken before sharding
        self._hook_model = copy.deepcopy(self.model) if fsdp and self.is_main and self.hooks else None
        self.train_model = D.wrap_model(self.model, strategy, find_unused_parameters=find_unused_parameters)
        self.sharded = D.is_sharded(self.model)
        self._ddp = self.train_model if self.train_model is not self.model else None  # for no_sync()
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        o = cfg.optim
        fused = _use_fused(self.device)
        fast = {"fused": True} if fused else {"foreach": True}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, **fast)
        # skip a non-finite update on the device (fused kernel's found_inf) instead of reading the flag on the host
        self.device_skip = fused and not self.sharded
        self.ema = EMA(self.model) if cfg.ema_half_life_images > 0 else None
        self.generator = torch.Generator(self.device)
        self.step = self.images_seen = self.nonfinite_total = self.nonfinite_consecutive = 0
        self.last_checkpoint: Path | None = None
        self._resumed = False
        self._guard: StepGuard | None = None
        self._batches: Any = self.data
        self._window = (0.0, 0)  # the logged loss window (float64 sum, count) carried through checkpoints

    # ----------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.steps`` (resuming first if allowed); return a summary dict.

        Rank 0 owns the run directory for the whole call (:func:`~simdiff.train.rundir.run_lock`: a second process
        gets :class:`~simdiff.train.errors.RunLockedError`). A failed write into the run directory (disk full,
        read-only) raises a one-line :class:`~simdiff.train.errors.RunDirError` naming the checkpoint the run
        resumes from."""
        lock = rundir.run_lock(self.run_dir) if self.is_main else nullcontext()
        with lock:
            try:
                return self._fit()
            except OSError as e:
                if not rundir.is_run_dir_error(e, self.run_dir):
                    raise
                raise rundir.write_error(e, run_dir=self.run_dir, what="the run's outputs") from None

    def _fit(self) -> dict[str, Any]:
        cfg, start_time = self.cfg, time.perf_counter()
        start = self._maybe_resume()
        logger = MetricsLogger(self.run_dir, enabled=self.is_main, resume_step=start if self._resumed else None,
                               total_steps=cfg.steps, initial_step=start, progress=cfg.progress)
        self._guard = StepGuard(self.device, cfg.max_nonfinite, total=self.nonfinite_total,
                                consecutive=self.nonfinite_consecutive, window_sum=self._window[0],
                                window_count=self._window[1])
        self._batches = DevicePrefetcher(self.data, self.device, channels_last=self.channels_last) \
            if _use_prefetcher(self.device) else self.data
        t_window, last_loss = time.perf_counter(), math.nan
        try:
            while self.step < cfg.steps:
                step = self.step
                lr = lr_at(step, cfg.optim, cfg.steps)
                if hasattr(self.loss_fn, "set_step"):  # curricula (distillation) are pure functions of the step
                    self.loss_fn.set_step(step)
                loss = self._forward_backward(self._to_device(next(self._batches)), step)
                self.apply_update(loss, lr, step)
                self.step, self.images_seen = step + 1, self.images_seen + cfg.batch_size
                logger.advance()
                log_now = bool(cfg.log_every) and self.step % cfg.log_every == 0
                hooks_now = bool(cfg.sample_every) and self.step % cfg.sample_every == 0
                save_now = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
                if log_now or hooks_now or save_now or self.step % cfg.max_nonfinite == 0:
                    st = self.sync_guard(new_window=log_now)
                    if log_now:
                        now = time.perf_counter()
                        last_loss = st.window_loss
                        logger.log(self.step, loss=last_loss, lr=lr, grad_norm=st.grad_norm,
                                   nonfinite=self.nonfinite_total,
                                   images_per_s=cfg.batch_size * cfg.log_every / max(now - t_window, 1e-9))
                        t_window = now
                if hooks_now:
                    self.run_hooks()
                if save_now:
                    self.save()
            if self.last_checkpoint is None or _step_of(self.last_checkpoint) != self.step:
                self.save()
        finally:
            logger.close()
            self._release_batches()
        if self.is_main:
            plot_loss_curve(logger.path, self.run_dir / "loss_curve.png")
        seconds = time.perf_counter() - start_time
        return {"step": self.step, "images_seen": self.images_seen, "loss": last_loss,
                "nonfinite_total": self.nonfinite_total, "checkpoint": str(self.last_checkpoint),
                "resumed_from": start if self._resumed else None, "seconds": seconds}

    def sync_guard(self, *, new_window: bool = False) -> GuardState | None:
        """Read the device-side step state (one transfer), warn about skipped updates since the last read, and
        raise :class:`NonFiniteError` if ``max_nonfinite`` consecutive updates were skipped. None before ``fit``.
        ``new_window``: the loss mean restarts after this read (log steps)."""
        if self._guard is None:
            return None
        st = self._guard.read(new_window=new_window)
        new = st.total - self.nonfinite_total
        self.nonfinite_total, self.nonfinite_consecutive = st.total, st.consecutive
        if new and self.is_main:
            log.warning("%d non-finite update(s) skipped before step %d (latest loss=%r grad_norm=%r; "
                        "%d consecutive, %d total)", new, self.step, st.bad_loss, st.bad_grad_norm,
                        st.consecutive, st.total)
        if st.tripped_at >= 0:
            raise NonFiniteError(
                f"aborting at step {st.tripped_at}: {st.consecutive} consecutive non-finite updates "
                f"(loss={st.bad_loss!r}, grad_norm={st.bad_grad_norm!r}); last checkpoint: {self.last_checkpoint}")
        return st

    def _release_batches(self) -> None:
        """Stop the prefetch thread; leave ``self.data`` at the first batch not yet trained on."""
        if isinstance(self._batches, DevicePrefetcher):
            self._batches.close()
            self.data.load_state_dict(self._batches.state_dict())
        self._batches = self.data

    # ------------------------------------------------------------------------------------- step parts
    def forward_backward(self, batch: dict[str, Any], step: int) -> float:
        """Accumulate gradients of the mean loss over ``cfg.grad_accum`` micro-batches of this rank's batch
        (DDP averages them over ranks); return the loss averaged over the global batch (a Python float)."""
        return float(self._forward_backward(batch, step))

    def _forward_backward(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """:meth:`forward_backward` returning the all-reduced loss as a 0-dim tensor on the device (no sync)."""
        self._seed_step(step)
        n = self.cfg.grad_accum
        micro = [{k: (torch.tensor_split(v, n)[i] if torch.is_tensor(v) else v) for k, v in batch.items()}
                 for i in range(n)]
        total = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            self.generator.manual_seed(mix_seed("loss", self.cfg.seed, self.rank, step, i))
            sync = self._ddp.no_sync() if (self._ddp is not None and i < n - 1) else nullcontext()
            if self.sharded:  # FSDP: accumulate unsharded grads locally, reduce-scatter after the last micro-batch
                self.model.set_requires_gradient_sync(i == n - 1)
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                    losses = self.loss_fn(self.train_model, mb, self.generator)
                size = next(v.shape[0] for v in mb.values() if torch.is_tensor(v))
                if losses.shape != (size,):
                    raise ValueError(f"loss_fn must return per-example losses of shape ({size},), "
                                     f"got {tuple(losses.shape)}")
                loss = losses.float().mean() / n
                loss.backward()
            total += loss.detach()
        return D.all_reduce_mean(total)

    def apply_update(self, loss: torch.Tensor, lr: float, step: int) -> torch.Tensor:
        """Clip, then step AdamW and the EMA unless the loss or gradient norm is non-finite.

        ``loss``: the all-reduced loss of update ``step`` (0-dim tensor on the device). Returns the 0-dim bool
        device tensor "applied"; gradients are cleared either way. Needs the step guard that :meth:`fit` creates."""
        if self._guard is None:
            raise RuntimeError("apply_update runs inside fit() (it needs the step guard)")
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = D.full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        applied = self._guard.update(step, loss, grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        decay = ema_decay(self.cfg.batch_size, self.cfg.ema_half_life_images, images_seen=self.images_seen,
                          rampup_ratio=self.cfg.ema_rampup_ratio) if self.ema is not None else 0.0
        if self.device_skip:
            self.optimizer.found_inf = (~applied).float()  # fused AdamW skips the whole update where this is 1
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            if self.ema is not None:
                self.ema.update(self.model, decay, apply=applied)
        elif bool(applied):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, decay)
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def run_hooks(self) -> None:
        """Call every hook (rank 0 only) with the EMA weights swapped in, eval mode, no grad."""
        if self.sharded:
            self._run_hooks_sharded()
            return
        if not self.is_main or not self.hooks:
            return
        swap = self.ema.swapped(self.model) if self.ema is not None else nullcontext()
        self.model.eval()
        try:
            with swap, torch.no_grad():
                for hook in self.hooks:
                    hook(self, self.step)
        finally:
            self.model.train()

    def full_state_dict(self, *, ema: bool = True) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on rank 0: the EMA's if ``ema`` and there is one, else the live model's.

        Under FSDP this gathers (every rank must call it; other ranks get ``{}``); otherwise a plain copy on
        every rank. Load it into a fresh unsharded model for sampling after ``fit()``."""
        if self.sharded:
            if ema and self.ema is not None:
                return self.ema.full_state_dict(rank0_only=True)
            return D.full_model_state_dict(self.model)
        if ema and self.ema is not None:
            return {k: v.clone() for k, v in self.ema.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _run_hooks_sharded(self) -> None:
        """FSDP: every rank joins the gather of the EMA (or live) weights; rank 0 loads them into its unsharded
        copy and runs the hooks with ``self.model`` pointing at that copy."""
        if not self.hooks:
            return
        full = self.full_state_dict(ema=True)
        if not self.is_main:
            return
        self._hook_model.load_state_dict(full)
        self._hook_model.eval()
        sharded, self.model = self.model, self._hook_model
        try:
            with torch.no_grad():
                for hook in self.hooks:
                    hook(self, self.step)
        finally:
            self.model = sharded

    # ----------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0), then synchronise all ranks.

        Under FSDP every rank first takes part in gathering the full model / optimizer / EMA state dicts. Inside
        ``fit`` the step guard is read first (raising :class:`NonFiniteError` instead of writing after a trip)."""
        st = self.sync_guard()
        if st is not None:
            self._window = (st.window_sum, st.window_count)
        ema = None
        if self.sharded:
            model, optim = D.full_model_state_dict(self.model), D.full_optimizer_state_dict(self.model, self.optimizer)
            if self.ema is not None:
                ema = self.ema.full_state_dict(rank0_only=True)
        elif self.is_main:
            model, optim = self.model.state_dict(), self.optimizer.state_dict()
            ema = self.ema.state_dict() if self.ema is not None else None
        if self.is_main:
            aux = self.loss_fn.aux_state_dict() if hasattr(self.loss_fn, "aux_state_dict") else None
            self.last_checkpoint = ckpt_io.save_checkpoint(
                self.run_dir, self.step, model=model, optimizer=optim, ema=ema, rng=ckpt_io.rng_tensors(),
                state=self._state_doc(), keep_last=self.cfg.keep_last, aux=aux)
        else:
            self.last_checkpoint = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        D.barrier()
        return self.last_checkpoint

    def _state_doc(self) -> dict[str, Any]:
        return {"images_seen": self.images_seen, "config": self.config_dict, "train_config": to_dict(self.cfg),
                "data": self._batches.state_dict(), "world_size": self.world_size,
                "nonfinite": {"total": self.nonfinite_total, "consecutive": self.nonfinite_consecutive},
                "loss_window": {"sum": self._window[0], "count": self._window[1]},
                "rng": ckpt_io.host_rng_doc()}

    def _maybe_resume(self) -> int:
        if self._resumed:
            return self.step
        if not self.resume:
            if ckpt_io.list_checkpoints(self.run_dir):
                raise ValueError(f"{self.run_dir} already holds checkpoints and resuming is off; use a new run "
                                 "directory (--run-dir) or allow resuming")
            if self.on_resume is not None:
                self.on_resume(None)
            self._seed_host_rngs()
            return self.step
        ck = ckpt_io.load_latest(self.run_dir, fallback=True)
        D.barrier()
        if self.on_resume is not None:
            self.on_resume(ck)
        if ck is None:
            self._seed_host_rngs()
            return self.step
        resume_mod.restore(self, ck)
        if self.is_main:
            log.info("resumed from %s (step %d)", ck.path, ck.step)
        return self.step

    # ------------------------------------------------------------------------------------------ helpers
    def _seed_host_rngs(self) -> None:
        """A fresh run seeds the global python and numpy RNGs from ``cfg.seed`` (a resumed one restores them), so
        the RNG states saved in its checkpoints, and user code drawing from them, repeat from run to run."""
        random.seed(mix_seed("python", self.cfg.seed, self.rank))
        np.random.seed(mix_seed("numpy", self.cfg.seed, self.rank) % 2**32)

    def _seed_step(self, step: int) -> None:
        torch.manual_seed(mix_seed("global", self.cfg.seed, self.rank, step))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch to the device (a no-op for batches the prefetcher already staged there)."""
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _use_fused(device: torch.device) -> bool:
    """Fused AdamW (and the device-side skip) on CUDA; foreach AdamW elsewhere."""
    return device.type == "cuda"


def _use_prefetcher(device: torch.device) -> bool:
    """Stage batches in a background thread (pinned memory, side-stream copies) on CUDA only."""
    return device.type == "cuda"


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])
