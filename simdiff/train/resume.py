"""Resuming a :class:`~simdiff.train.trainer.Trainer` from a checkpoint: restore every piece of state, refuse
weights that do not fit the model (one line), warn (one line each) where the continuation cannot be identical."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from torch import nn

from simdiff.configuration import to_dict
from simdiff.train import checkpoint as ckpt_io
from simdiff.train import distributed as D
from simdiff.train.checkpoint import Checkpoint, CheckpointError

if TYPE_CHECKING:
    from simdiff.train.trainer import Trainer

__all__ = ["RESUME_MUST_MATCH", "restore", "check_weights_fit", "warn"]

#: train keys whose change makes a resumed run differ from an uninterrupted one (allowed, with a warning line)
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "optim", "ema_half_life_images", "ema_rampup_ratio")


def warn(enabled: bool, message: str) -> None:
    """One warning line on stderr (rank 0 only)."""
    if enabled:
        print(f"simdiff: warning: {message}", file=sys.stderr, flush=True)


def check_weights_fit(ck: Checkpoint, model: nn.Module | None) -> None:
    """Refuse (one line) a checkpoint whose weight names or shapes differ from ``model``'s (None: not checked)."""
    if model is None:
        return
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ck.model.items()}
    if now == saved:
        return
    missing, extra = sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
    shapes = sorted(k for k in set(now) & set(saved) if now[k] != saved[k])
    what = (f"shape of {shapes[0]!r} {saved[shapes[0]]} in the checkpoint, {now[shapes[0]]} in the model" if shapes
            else f"{len(missing)} weight(s) missing (e.g. {missing[0]!r})" if missing
            else f"{len(extra)} unexpected weight(s) (e.g. {extra[0]!r})")
    raise CheckpointError(f"{ck.path}: the weights do not fit this model ({what}); resume with the model "
                          "settings the run was started with, or train into a new --run-dir")


def restore(trainer: Trainer, ck: Checkpoint) -> None:
    """Load ``ck`` into ``trainer``: weights (sharded under FSDP), AdamW and EMA state, loss state, data position,
    step counts, non-finite counts, the logged loss window and the RNG states."""
    st: dict[str, Any] = ck.state
    saved_cfg, now_cfg = st.get("train_config", {}), to_dict(trainer.cfg)
    changed = [k for k in RESUME_MUST_MATCH if saved_cfg.get(k) != now_cfg.get(k)]
    if changed:
        warn(trainer.is_main, f"resuming {ck.path} with changed train keys {', '.join(changed)}; the run will "
             "not be identical to an uninterrupted one")
    check_weights_fit(ck, trainer.model if not trainer.sharded else None)
    if trainer.sharded:  # every rank reads the full checkpoint and keeps its shard
        D.load_full_model_state_dict(trainer.model, ck.model)
    else:
        trainer.model.load_state_dict(ck.model)
    if ck.optimizer is not None:
        optim = ckpt_io.merge_param_groups(ck.optimizer, trainer.optimizer.state_dict())
        if trainer.sharded:
            D.load_full_optimizer_state_dict(trainer.model, trainer.optimizer, optim)
        else:
            trainer.optimizer.load_state_dict(optim)
    if trainer.ema is not None and ck.ema is not None:
        trainer.ema.load_state_dict(ck.ema)
    if hasattr(trainer.loss_fn, "load_aux_state_dict"):
        if ck.aux is None:
            warn(trainer.is_main, f"{ck.path} holds no loss state (aux.safetensors); the loss object starts "
                 "afresh and the run will not be identical to an uninterrupted one")
        else:
            trainer.loss_fn.load_aux_state_dict({k: v.to(trainer.device) for k, v in ck.aux.items()})
    trainer.data.load_state_dict(st["data"])
    trainer.step, trainer.images_seen = ck.step, int(st["images_seen"])
    trainer.nonfinite_total = int(st["nonfinite"]["total"])
    trainer.nonfinite_consecutive = int(st["nonfinite"]["consecutive"])
    window = st.get("loss_window") or {}  # absent in checkpoints written before it was stored
    trainer._window = (float(window.get("sum", 0.0)), int(window.get("count", 0)))
    ckpt_io.restore_rng(ck.rng, st["rng"])
    trainer.last_checkpoint, trainer._resumed = ck.path, True
