"""Training: config, the loop, EMA, atomic checkpoints with exact resume, multi-process (torchrun) data parallel.

The trainer knows nothing of diffusion: it takes ``model``, ``loss_fn(model, batch, generator) -> Tensor[B]`` and a
:class:`BatchIterator`.
"""

from simdiff.train.batches import BatchIterator, mix_seed
from simdiff.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    RunDirError,
    RunLockedError,
    export_inference,
    list_checkpoints,
    load_checkpoint,
    load_inference,
    load_latest,
    save_checkpoint,
)
from simdiff.train.config import (
    OptimConfig,
    TrainConfig,
    ema_decay,
    lr_at,
    refuse_init_from,
    validate_train_config,
)
from simdiff.train.ema import EMA
from simdiff.train.rundir import run_lock
from simdiff.train.trainer import NonFiniteError, Trainer

__all__ = [
    "BatchIterator", "mix_seed", "Checkpoint", "CheckpointError", "RunDirError", "RunLockedError",
    "export_inference", "run_lock", "list_checkpoints",
    "load_checkpoint", "load_inference", "load_latest", "save_checkpoint", "OptimConfig", "TrainConfig",
    "ema_decay", "lr_at", "refuse_init_from", "validate_train_config", "EMA", "NonFiniteError", "Trainer",
]
