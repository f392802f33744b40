"""Training an image-conditioned model on pairs: batches, the experiment hook, and a complete training run.

A Semantica-style run is an ordinary experiment config (``simdiff/configs/semantica_mnist.yaml`` on digits,
``simdiff/configs/semantica_photos.yaml`` on RGB photo patches, where a pair is two crops of one photo) whose data set
is ``pairs`` (:mod:`simdiff.semantica.pairs`) and whose backbone attends to context tokens (``model.arch: uvit`` with
``model.options.context_dim`` equal to the encoder's token width). Each training example is a target image ``x``
and the frozen-encoder tokens of its partner as ``context``; a seeded fraction ``uncond_prob`` of the examples has
the all-zero context instead (conditioning dropout for classifier-free guidance, Ho & Salimans 2022; the same zeros
:class:`~simdiff.losses.DiffusionLoss` would substitute, so ``diffusion.cond_drop_prob`` stays 0).

The checkpoint's config dict is the plain diffusion one (``kind: diffusion``), so :func:`simdiff.runs.load_model`
rebuilds the network; the encoder is rebuilt from ``data.options`` (:func:`encoder_for_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, to_dict
from simdiff.semantica.encoders import ImageEncoder, build_image_encoder, encoder_width
from simdiff.semantica.pairs import PairOptions, partner_indices, shift_images

__all__ = ["PairBatches", "is_semantica_config", "pair_options", "encoder_for_config", "check_semantica_config",
           "semantica_training", "train_semantica", "semantica_grid"]


class PairBatches:
    """Training examples ``{"x", "context"}`` from a labelled :class:`~simdiff.data.ImageDataset`.

    Indexing (a LongTensor, what :class:`simdiff.train.BatchIterator` passes) returns the targets and their
    indices; :meth:`transform` (the iterator's per-batch transform, with its seeded generator) draws each target's
    partners, looks up their tokens (precomputed once for the whole data set with ``same_class``; encoded per batch
    for ``shifted_self``) and applies conditioning dropout. Targets without a partner (a class with one member,
    possible with ``data.limit``) are left out.

    Args:
        dataset: images and labels. encoder: the frozen encoder. options: the pair options.
    """

    def __init__(self, dataset, encoder: ImageEncoder, options: PairOptions) -> None:
        if dataset.labels is None and options.pairing == "same_class":
            raise ConfigError("pairing same_class needs a labelled data set")
        self.dataset, self.encoder, self.options = dataset, encoder, options
        if options.pairing == "same_class":
            counts = torch.bincount(dataset.labels)
            self.targets = torch.nonzero(counts[dataset.labels] >= 2).reshape(-1)
            self.table = encoder.tokens(dataset.images)  # [N, L, D]: every image encoded once
        else:
            self.targets = torch.arange(len(dataset))
            self.table = None
        if len(self.targets) == 0:
            raise ConfigError("no training image has a partner (every class has a single image)")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: Tensor) -> dict[str, Tensor]:
        index = self.targets[torch.as_tensor(idx).reshape(-1)]
        return {"x": self.dataset[index]["x"], "index": index}

    def partners(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """``[B, num_cond]`` partner indices (``same_class``)."""
        return partner_indices(self.dataset.labels, index, generator=generator, num=self.options.num_cond)

    def context(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """``[B, num_cond * L, D]`` tokens of the partners of ``batch``."""
        index, k = batch["index"], self.options.num_cond
        if self.table is not None:
            tok = self.table[self.partners(index, generator)]  # [B, k, L, D]
            return tok.reshape(len(index), k * self.encoder.num_tokens, self.encoder.width)
        x = batch["x"]
        views = torch.stack([shift_images(x, max_shift=self.options.max_shift, generator=generator)
                             for _ in range(k)], 1)
        return self.encoder.context(views)

    def transform(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The trainer's batch: ``{"x": [B, C, H, W], "context": [B, k * L, D]}``, null rows all zero."""
        ctx = self.context(batch, generator)
        drop = torch.rand(len(ctx), generator=generator) < self.options.uncond_prob
        ctx = torch.where(drop[:, None, None], torch.zeros_like(ctx), ctx)
        return {"x": batch["x"], "context": ctx}


def is_semantica_config(cfg) -> bool:
    """Whether an experiment config trains on image pairs (``data.name: pairs``)."""
    return cfg.data.name == "pairs"


def pair_options(cfg) -> PairOptions:
    """The :class:`PairOptions` of an experiment config's ``data.options``."""
    return PairOptions.parse(cfg.data.options)


def encoder_for_config(cfg) -> ImageEncoder:
    """The frozen encoder named by ``cfg.data.options`` (shared per name and options)."""
    opts = pair_options(cfg)
    return build_image_encoder(opts.encoder, opts.encoder_options)


def check_semantica_config(cfg) -> PairOptions:
    """One-line ConfigErrors for a pairs experiment whose model cannot take the encoder's tokens."""
    opts = pair_options(cfg)
    width = encoder_width(opts.encoder, opts.encoder_options)
    if cfg.model.class_conditional:
        raise ConfigError("an image-conditioned model (data.name: pairs) needs model.class_conditional: false")
    if cfg.diffusion.cond_drop_prob:
        raise ConfigError("an image-conditioned model drops its context through data.options.uncond_prob: set "
                          "diffusion.cond_drop_prob: 0")
    got = getattr(cfg.model.options, "context_dim", None) if not isinstance(cfg.model.options, dict) \
        else cfg.model.options.get("context_dim")
    if got != width:
        raise ConfigError(f"model.options.context_dim must be {width} (the token width of encoder {opts.encoder}), "
                          f"got {got}")
    return opts


def semantica_training(cfg, dataset):
    """``(PairBatches, conditioner)`` for a pairs experiment (the hook :func:`simdiff.experiment.train` can call
    in place of its class-label batches; pass ``PairBatches.transform`` as the BatchIterator's transform)."""
    opts = check_semantica_config(cfg)
    encoder = build_image_encoder(opts.encoder, opts.encoder_options)
    return PairBatches(dataset, encoder, opts), encoder


def semantica_grid(model, schedule, sample_cfg, *, dataset, encoder: ImageEncoder, out: str | Path, num_cond: int = 8,
                   per_image: int = 7, device: torch.device | str = "cpu") -> Path:
    """A PNG grid: one row per conditioning image (the first image of the first ``num_cond`` classes, or images),
    the image in the first column and ``per_image`` samples conditioned on it beside it."""
    from simdiff.images import save_grid
    from simdiff.semantica.sample import sample_conditioned

    labels = dataset.labels
    if labels is not None:
        firsts = [int(torch.nonzero(labels == c)[0]) for c in sorted(set(labels.tolist()))][:num_cond]
    else:
        firsts = list(range(min(num_cond, len(dataset))))
    cond = dataset[torch.tensor(firsts)]["x"]
    x = sample_conditioned(model, schedule, encoder, cond[:, None], sample_cfg, per_condition=per_image,
                           image_shape=tuple(dataset.shape), device=device)
    rows = torch.cat([cond[:, None], x.reshape(len(cond), per_image, *x.shape[1:])], 1)
    return save_grid(rows.reshape(-1, *x.shape[1:]), out, nrow=per_image + 1, scale=max(1, 64 // x.shape[-1]))


def train_semantica(cfg, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Train a pairs experiment into ``run_dir`` with the shared trainer (checkpoints, EMA, resume, metrics.csv).

    Ends by writing ``samples/final.png`` (:func:`semantica_grid` on the training classes)."""
    from simdiff.data import build_dataset
    from simdiff.experiment import _write_config, build_objective, seeded_network
    from simdiff.schedules import schedule_from_dict
    from simdiff.semantica.pairs import register
    from simdiff.train import BatchIterator, Trainer, refuse_init_from, rundir, validate_train_config

    register()
    validate_train_config(cfg.train)
    refuse_init_from(cfg.train, "image-conditioned (pairs) training")
    run_dir = Path(run_dir)
    check_semantica_config(cfg)

    def body() -> dict[str, Any]:
        dataset = build_dataset(cfg.data)
        image_shape = tuple(dataset.shape)
        pairs, encoder = semantica_training(cfg, dataset)
        model = seeded_network(cfg, image_shape=image_shape, num_classes=0)
        data = BatchIterator(pairs, cfg.train.batch_size, seed=cfg.train.seed, transform=pairs.transform)
        config_dict = {"kind": "diffusion", "experiment": to_dict(cfg), "image_shape": list(image_shape),
                       "num_classes": 0, "conditioner": encoder.identity()}
        schedule = schedule_from_dict(cfg.diffusion.schedule)
        hooks = []
        if cfg.train.sample_every > 0:
            def hook(trainer, step):
                semantica_grid(trainer.model, schedule, cfg.sample, dataset=dataset, encoder=encoder,
                               out=run_dir / "samples" / f"step_{step:07d}.png", device=trainer.device)
            hooks.append(hook)
        trainer = Trainer(model, build_objective(cfg.diffusion), data, cfg.train, run_dir, config_dict=config_dict,
                          hooks=hooks, resume=resume, on_resume=lambda ck: _write_config(cfg, run_dir))
        summary = trainer.fit()
        final = seeded_network(cfg, image_shape=image_shape, num_classes=0)
        final.load_state_dict(trainer.full_state_dict(ema=True))
        final.eval()
        summary["sample_grid"] = str(semantica_grid(final, schedule, cfg.sample, dataset=dataset, encoder=encoder,
                                                    out=run_dir / "samples" / "final.png", device=trainer.device))
        return summary

    return rundir.owned_run(run_dir, body)

