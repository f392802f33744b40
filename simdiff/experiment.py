"""Training runs: an experiment = data + model + diffusion loss + trainer + sampling, from one YAML config.

This is the glue ``simdiff train`` calls; all logic lives in the modules it composes. Loading a run back for
sampling and scoring (:func:`load_model`, :func:`sample_grid`, :func:`evaluate_model`, the config dataclasses) lives
in :mod:`simdiff.runs` and is re-exported here. A run directory holds ``checkpoints/``, ``metrics.csv``,
``loss_curve.png``, ``samples/``, ``config.yaml`` and the lock file ``.lock``.

Order of :func:`train`: validate the train section and resolve ``train.device`` (nothing is written yet), take the
run directory's lock, load the data and build the network with its initial weights drawn from ``train.seed`` (a
forked RNG, so the caller's RNG state is untouched), read the checkpoint to resume from and refuse it if it was
trained with another network, then write ``config.yaml`` atomically and train. A refused or invalid run leaves the
directory as it was (a new directory that received nothing is removed again).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from simdiff.configuration import ConfigError, to_dict
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
from simdiff.train import BatchIterator, Checkpoint, Trainer, mix_seed, rundir, validate_train_config
from simdiff.train.checkpoint import CheckpointError, list_checkpoints

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


def _sample_hook(cfg: ExperimentConfig, schedule: Schedule, run_dir: Path, num_classes: int, image_shape,
                 grid=sample_grid):
    def hook(trainer: Trainer, step: int) -> None:
        path = grid(trainer.model, schedule, cfg.sample, image_shape=image_shape, num_classes=num_classes,
                           out=run_dir / "samples" / f"step_{step:07d}.png", device=trainer.device,
                           process=run_process(cfg))
        print(f"[simdiff] step {step}: sample grid -> {path}")

    return hook


def seeded_network(cfg: ExperimentConfig, *, image_shape, num_classes: int):
    """:func:`build_network` with its initial weights drawn from ``cfg.train.seed``: the CPU RNG is forked (the
    caller's state is restored afterwards) and seeded with ``mix_seed("init", seed)``, so two runs of one config
    start from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed("init", cfg.train.seed))
        return build_network(cfg, image_shape=image_shape, num_classes=num_classes)


#: top-level entries of a checkpoint's config that fix the network's shape (besides ``model.*`` and
#: ``diffusion.process.*``, see :func:`network_differences`).
_NETWORK_ENTRIES = ("kind", "image_shape", "num_classes", "conditioner")


def init_weights(model: torch.nn.Module, source: str) -> None:
    """Copy the weights of ``source`` (a run, checkpoint, export or shipped name; EMA weights where present) into
    ``model``, which must have the same shape. Raises ConfigError (one line) for a missing, foreign or mismatched
    source."""
    from simdiff.runs import CheckpointError, _weights_problem, load_model
    from simdiff.shipped import resolve_source

    try:
        state = load_model(resolve_source(source)).model.state_dict()
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    problem = _weights_problem(model, state)
    if problem:
        raise ConfigError(f"train.init_from: {source} is another network than this config builds: {problem}")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def _network_view(config: dict[str, Any]) -> dict[str, Any] | None:
    exp = config.get("experiment")
    if not isinstance(exp, dict):
        return None
    try:  # the defaults of the installed version fill keys an older checkpoint did not write
        exp = to_dict(config_from_dict(exp))
    except (ConfigError, ValueError, TypeError):
        pass
    flat: dict[str, Any] = {}
    _flatten("model", exp.get("model", {}), flat)
    _flatten("diffusion.process", (exp.get("diffusion") or {}).get("process"), flat)
    for key in _NETWORK_ENTRIES:
        _flatten(key, config.get(key), flat)
    return flat


def network_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: saved -> now"`` for every setting that shapes the network (``model.*``, ``diffusion.process.*``, the
    image shape, the class count, the conditioner, the run kind) and differs between two checkpoint config dicts.
    Empty when they agree or when ``saved`` holds no experiment config (nothing to compare)."""
    a, b = _network_view(saved), _network_view(now)
    if a is None or b is None:
        return []
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(unset)") != b.get(k, "(unset)")]


def _write_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    rundir.write_run_yaml(run_dir, "config.yaml", to_dict(cfg))


def train(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Train the experiment into ``run_dir`` (resuming from its latest checkpoint when ``resume``).

    ``cfg.model.class_conditional = False`` trains an unconditional model even on a labelled data set.

    Raises (one line each; the CLI exits 2): ConfigError for a bad train option or device, or a resume whose
    checkpoint was trained with another network; RunLockedError when another process trains into ``run_dir``;
    RunDirError when the directory cannot be written (disk full, read-only), naming the checkpoint to resume from.
    """
    if cfg.data.name == "pairs":  # image-conditioned (Semantica-style): image pairs + a frozen image encoder
        from simdiff.semantica.train import train_semantica

        return train_semantica(cfg, run_dir, resume=resume)
    validate_train_config(cfg.train)
    run_dir = Path(run_dir)
    from simdiff.train import distributed as D

    info = D.init_distributed(cfg.train.device)
    validate_train_config(cfg.train, info.world_size)
    return rundir.owned_run(run_dir, lambda: _train_locked(cfg, run_dir, info, resume=resume), rank=info.rank)


def _data_moments(cfg: ExperimentConfig, dataset, num_classes: int, run_dir: Path, *, write: bool):
    """The data's Gaussian moments for the Gaussian start of sampling (:mod:`simdiff.samplers.gaussian`): read from
    the run directory, else computed from the training images and (on rank 0) written there. ``None`` for the runs
    it does not apply to: text conditioning, a non-isotropic process, frame windows."""
    from simdiff.samplers.gaussian import MOMENTS_FILE, DataMoments

    if cfg.model.arch == "text_uvit" or run_process(cfg) is not None or dataset.storage.dim() != 4:
        return None
    path = run_dir / MOMENTS_FILE
    try:
        moments = DataMoments.load(path)
    except (ValueError, CheckpointError):
        moments = None  # damaged: recomputed below
    if moments is not None and moments.shape == tuple(dataset.shape) and moments.num_classes == num_classes:
        return moments
    labels = dataset.labels if num_classes > 0 else None
    try:
        moments = DataMoments.from_images(dataset.images, labels, num_classes if labels is not None else 0)
    except ValueError:  # e.g. a one-image data set: sampling then starts at the schedule's first level
        return None
    if write:
        try:
            moments.save(path)
        except OSError as e:
            raise rundir.write_error(e, run_dir=run_dir, what="the data moments", path=path) from None
    return moments


def add_data_moments(source: str | Path, *, rank: int | None = None) -> tuple[Path, Any]:
    """Compute the data moments of a diffusion model's training data (from its stored config) and store them with
    the model: ``RUN/data_moments.safetensors`` for a run directory, embedded (atomically rewritten, in the file's
    floating-point dtype) for an exported ``.safetensors`` file. Returns ``(written path, moments)``.

    Raises:
        ConfigError: a model the Gaussian start does not apply to (a distilled student, text conditioning, another
            process, frame windows), or a data set that does not match the model.
    """
    from safetensors.torch import save as st_save

    from simdiff.samplers.gaussian import DEFAULT_RANK, MOMENTS_FILE, MOMENTS_PREFIX, DataMoments
    from simdiff.train.checkpoint import INFERENCE_FORMAT, read_safetensors

    source = Path(source)
    loaded = load_model(source)
    cfg = loaded.config
    if loaded.meta.get("kind", "diffusion") != "diffusion":
        raise ConfigError(f"{source}: a distilled student samples on its own grid; data moments are for diffusion "
                          "models")
    dataset = build_dataset(cfg.data)
    if cfg.model.arch == "text_uvit" or loaded.process is not None or dataset.storage.dim() != 4:
        raise ConfigError(f"{source}: the Gaussian start is for class-conditional or unconditional image models with "
                          "the isotropic process")
    if tuple(dataset.shape) != tuple(loaded.image_shape):
        raise ConfigError(f"{source}: its data set {cfg.data.name!r} has shape {tuple(dataset.shape)}, the model "
                          f"{tuple(loaded.image_shape)}")
    classes = loaded.num_classes if dataset.labels is not None else 0
    moments = DataMoments.from_images(dataset.images, dataset.labels if classes else None, classes,
                                      rank=rank or DEFAULT_RANK)
    if source.is_dir():
        run = source.parent.parent if (source / "state.json").exists() else source
        return moments.save(run / MOMENTS_FILE), moments
    tensors, meta = read_safetensors(source)
    if meta.get("format") != INFERENCE_FORMAT:
        raise ConfigError(f"{source}: not an exported model file (a quantised file keeps no data moments)")
    float_dtypes = [t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.startswith(MOMENTS_PREFIX)]
    dtype = float_dtypes[0] if float_dtypes else torch.float32
    kept = {k: t for k, t in tensors.items() if not k.startswith(MOMENTS_PREFIX)}
    try:
        rundir.atomic_write_bytes(source, st_save({**kept, **moments.tensors(MOMENTS_PREFIX, dtype)}, metadata=meta))
    except OSError as e:
        raise ConfigError(f"{source}: cannot rewrite ({e.strerror or e})") from None
    return source, moments


def _train_locked(cfg: ExperimentConfig, run_dir: Path, info, *, resume: bool) -> dict[str, Any]:
    """:func:`train` once the run directory is owned (rank 0) and the train options are checked."""
    dataset = build_dataset(cfg.data)
    image_shape = dataset.shape
    num_classes = model_classes(cfg, dataset.num_classes)
    loss_cfg = _resolved_loss_config(cfg, num_classes)
    cfg = dataclasses.replace(cfg, diffusion=loss_cfg)
    model = seeded_network(cfg, image_shape=image_shape, num_classes=num_classes)
    if cfg.train.init_from is not None and not (resume and list_checkpoints(run_dir)):  # a resume ignores it
        init_weights(model, cfg.train.init_from)
    loss = build_objective(loss_cfg)
    schedule = schedule_from_dict(loss_cfg.schedule)
    conditioner, examples, transform, grid = conditioner_for(num_classes), dataset, None, sample_grid
    if cfg.model.arch == "text_uvit":  # captions through the frozen text encoder (pip install simdiff[text])
        from simdiff.text import text_training
        from simdiff.text_prompts import grid_sampler

        examples, conditioner = text_training(cfg, dataset, device=info.device)
        grid = grid_sampler(conditioner)
    else:
        transform = batch_transform(dataset, labels=num_classes > 0)
    moments = _data_moments(cfg, dataset, num_classes, run_dir, write=info.rank == 0)
    if moments is not None:
        model.data_moments = moments
    data = BatchIterator(examples, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                         world_size=info.world_size, transform=transform)
    config_dict = {"kind": "diffusion", "experiment": to_dict(cfg), "image_shape": list(image_shape),
                   "num_classes": num_classes, "conditioner": conditioner.identity()}
    hooks = []
    if cfg.train.sample_every > 0:  # the trainer calls hooks every train.sample_every steps
        hooks.append(_sample_hook(cfg, schedule, run_dir, num_classes, image_shape, grid))

    def on_resume(ck: Checkpoint | None) -> None:
        if ck is not None:
            diffs = network_differences(ck.state.get("config") or {}, config_dict)
            if diffs:
                raise ConfigError(f"{run_dir}: cannot resume from {ck.path.name}, it was trained with another network "
                                  f"({'; '.join(diffs)}); train this config into a new --run-dir, or resume with "
                                  "the run's own settings (its config.yaml)")
        if info.rank == 0:
            _write_config(cfg, run_dir)

    trainer = Trainer(model, loss, data, cfg.train, run_dir, config_dict=config_dict, hooks=hooks, resume=resume,
                      on_resume=on_resume)
    summary = trainer.fit()
    weights = trainer.full_state_dict(ema=True)  # a collective under FSDP: every rank calls it
    if info.rank == 0:
        final = seeded_network(cfg, image_shape=image_shape, num_classes=num_classes)
        final.load_state_dict(weights)
        final.to(trainer.device).eval()
        final.data_moments = moments
        out = run_dir / "samples" / "final.png"
        try:
            path = grid(final, schedule, cfg.sample, image_shape=image_shape, num_classes=num_classes,
                        out=out, device=trainer.device, process=run_process(cfg))
        except OSError as e:
            raise rundir.write_error(e, run_dir=run_dir, what="the final sample grid", path=out) from None
        summary["sample_grid"] = str(path)
    return summary
