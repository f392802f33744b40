"""Training runs: an experiment = data + model + diffusion loss + trainer + sampling, from one YAML config.

This is the glue ``simdiff train`` calls; all logic lives in the modules it composes. Loading a run back for
sampling and scoring (:func:`load_model`, :func:`sample_grid`, :func:`evaluate_model`, the config dataclasses) lives
in :mod:`simdiff.runs` and is re-exported here. A run directory holds ``checkpoints/``, ``metrics.csv``,
``loss_curve.png``, ``samples/`` and ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from simdiff.configuration import to_dict
from simdiff.data import build_dataset
from simdiff.losses import DiffusionLoss, LossConfig
from simdiff.processes import build_process, is_discrete
from simdiff.runs import (
    ExperimentConfig,
    LoadedModel,
    ModelConfig,
    batch_transform,
    build_network,
    check_student_sampling,
    conditioner_for,
    config_from_dict,
    describe,
    evaluate_model,
    load_config,
    load_model,
    model_classes,
    reference_images,
    run_process,
    sample_grid,
)
from simdiff.schedules import Schedule, schedule_from_dict
from simdiff.train import BatchIterator, Trainer

__all__ = [
    "ModelConfig",
    "ExperimentConfig",
    "LoadedModel",
    "load_config",
    "config_from_dict",
    "build_network",
    "build_objective",
    "train",
    "load_model",
    "describe",
    "sample_grid",
    "check_student_sampling",
    "reference_images",
    "evaluate_model",
]

#: the batch transform under its former name.
_transform = batch_transform


def _resolved_loss_config(cfg: ExperimentConfig, num_classes: int) -> LossConfig:
    """``cfg.diffusion`` for a network with ``num_classes`` classes (0: unconditional, so no label dropout)."""
    d = cfg.diffusion
    if num_classes > 0 and d.null_label is None:
        d = dataclasses.replace(d, null_label=num_classes)
    if num_classes == 0 and d.cond_drop_prob > 0:
        d = dataclasses.replace(d, cond_drop_prob=0.0)
    return d


def build_objective(loss_cfg: LossConfig):
    """The trainer's ``loss_fn(model, batch, generator) -> [B]`` for ``loss_cfg``: the Gaussian diffusion loss, or,
    when ``loss_cfg.process`` names a discrete process, that process's own loss; a Gaussian process with an
    ``objective(loss_cfg)`` method supplies its own loss object."""
    process = build_process(loss_cfg.process, schedule_from_dict(loss_cfg.schedule))
    if is_discrete(process):
        return process.loss
    if hasattr(process, "objective"):  # a Gaussian process with its own training objective (e.g. rolling windows)
        return process.objective(loss_cfg)
    return DiffusionLoss.from_config(loss_cfg)


def _sample_hook(cfg: ExperimentConfig, schedule: Schedule, run_dir: Path, num_classes: int, image_shape):
    def hook(trainer: Trainer, step: int) -> None:
        path = sample_grid(trainer.model, schedule, cfg.sample, image_shape=image_shape, num_classes=num_classes,
                           out=run_dir / "samples" / f"step_{step:07d}.png", device=trainer.device,
                           process=run_process(cfg))
        print(f"[simdiff] step {step}: sample grid -> {path}")

    return hook


def train(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Train the experiment into ``run_dir`` (resuming from its latest checkpoint when ``resume``).

    ``cfg.model.class_conditional = False`` trains an unconditional model even on a labelled data set.
    """
    run_dir = Path(run_dir)
    dataset = build_dataset(cfg.data)
    image_shape = dataset.shape
    num_classes = model_classes(cfg, dataset.num_classes)
    loss_cfg = _resolved_loss_config(cfg, num_classes)
    cfg = dataclasses.replace(cfg, diffusion=loss_cfg)
    model = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
    loss = build_objective(loss_cfg)
    schedule = schedule_from_dict(loss_cfg.schedule)
    from simdiff.train import distributed as D

    info = D.init_distributed(cfg.train.device)
    data = BatchIterator(dataset, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                         world_size=info.world_size, transform=batch_transform(dataset, labels=num_classes > 0))
    config_dict = {"kind": "diffusion", "experiment": to_dict(cfg), "image_shape": list(image_shape),
                   "num_classes": num_classes, "conditioner": conditioner_for(num_classes).identity()}
    hooks = []
    if cfg.train.sample_every > 0:  # the trainer calls hooks every train.sample_every steps
        hooks.append(_sample_hook(cfg, schedule, run_dir, num_classes, image_shape))
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    trainer = Trainer(model, loss, data, cfg.train, run_dir, config_dict=config_dict, hooks=hooks, resume=resume)
    summary = trainer.fit()
    weights = trainer.full_state_dict(ema=True)  # a collective under FSDP: every rank calls it
    if info.rank == 0:
        final = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
        final.load_state_dict(weights)
        final.to(trainer.device).eval()
        path = sample_grid(final, schedule, cfg.sample, image_shape=image_shape, num_classes=num_classes,
                           out=run_dir / "samples" / "final.png", device=trainer.device, process=run_process(cfg))
        summary["sample_grid"] = str(path)
    return summary
