"""An experiment = data + model + diffusion loss + trainer + sampling, from one YAML config.

This is the glue the CLI calls (``simdiff train | sample | eval | export``); all logic lives in the modules it
composes. A run directory holds ``checkpoints/``, ``metrics.csv``, ``loss_curve.png``, ``samples/`` and
``config.yaml``. Checkpoints and exports carry a ``config_dict`` with the experiment config plus the facts
needed to rebuild the network without the data (``image_shape``, ``num_classes``) and ``kind`` ("diffusion", or a
distillation method's name with its sampler spec).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from simdiff.configuration import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from simdiff.data import DataConfig, ImageDataset, build_dataset, random_hflip
from simdiff.generate import SampleConfig, generate
from simdiff.images import save_grid
from simdiff.losses import DiffusionLoss, LossConfig
from simdiff.nets import DiffusionModel, build_model
from simdiff.schedules import Schedule, schedule_from_dict
from simdiff.train import BatchIterator, CheckpointError, TrainConfig, Trainer, load_inference, load_latest
from simdiff.train.checkpoint import load_checkpoint

__all__ = [
    "ModelConfig",
    "ExperimentConfig",
    "LoadedModel",
    "load_config",
    "build_network",
    "train",
    "load_model",
    "sample_grid",
]


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser: a backbone by name (``unet``, ``uvit``, ``residual_uvit``), its options, and what it predicts."""

    arch: str = "uvit"
    parameterisation: Literal["eps", "x", "v"] = "v"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs; saved in every checkpoint."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """YAML file (or defaults) + ``a.b=value`` overrides -> validated :class:`ExperimentConfig`."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(ExperimentConfig, apply_overrides(data, list(overrides)))


def config_from_dict(d: dict[str, Any]) -> ExperimentConfig:
    return from_dict(ExperimentConfig, d)


def build_network(cfg: ExperimentConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> DiffusionModel:
    """The :class:`DiffusionModel` described by ``cfg.model`` for images of ``image_shape``."""
    c, h, w = image_shape
    return build_model(
        cfg.model.arch,
        cfg.model.parameterisation,
        cfg.model.options,
        image_channels=c,
        image_size=(h, w) if h != w else h,
        num_classes=num_classes,
    )


def _resolved_loss_config(cfg: ExperimentConfig, num_classes: int) -> LossConfig:
    d = cfg.diffusion
    if num_classes > 0 and d.null_label is None:
        d = dataclasses.replace(d, null_label=num_classes)
    if num_classes == 0 and d.cond_drop_prob > 0:
        d = dataclasses.replace(d, cond_drop_prob=0.0)
    return d


def _transform(dataset: ImageDataset):
    if not dataset.hflip:
        return None

    def flip(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {**batch, "x": random_hflip(batch["x"], generator=generator)}

    return flip


def _sample_hook(cfg: ExperimentConfig, schedule: Schedule, run_dir: Path, num_classes: int, image_shape):
    def hook(trainer: Trainer, step: int) -> None:
        path = sample_grid(trainer.model, schedule, cfg.sample, image_shape=image_shape, num_classes=num_classes,
                           out=run_dir / "samples" / f"step_{step:07d}.png", device=trainer.device)
        print(f"[simdiff] step {step}: sample grid -> {path}")

    return hook


def sample_grid(
    model,
    schedule: Schedule,
    sample_cfg: SampleConfig,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    out: str | Path,
    num: int | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """Sample ``num`` images (classes cycling 0..C-1 for a class-conditional model) and save them as a PNG grid."""
    num = sample_cfg.num if num is None else num
    labels = torch.arange(num) % num_classes if num_classes > 0 else None
    with torch.no_grad():
        x = generate(model, schedule, image_shape, sample_cfg, num=num, labels=labels, num_classes=num_classes,
                     device=device)
    nrow = num_classes if num_classes > 0 and num % num_classes == 0 and num_classes <= 16 else None
    scale = max(1, 64 // image_shape[-1])
    return save_grid(x, out, nrow=nrow, scale=scale)


def train(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Train the experiment into ``run_dir`` (resuming from its latest checkpoint when ``resume``)."""
    run_dir = Path(run_dir)
    dataset = build_dataset(cfg.data)
    image_shape, num_classes = tuple(dataset.images.shape[1:]), dataset.num_classes
    loss_cfg = _resolved_loss_config(cfg, num_classes)
    cfg = dataclasses.replace(cfg, diffusion=loss_cfg)
    model = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
    loss = DiffusionLoss.from_config(loss_cfg)
    from simdiff.train import distributed as D

    info = D.init_distributed(cfg.train.device)
    data = BatchIterator(dataset, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                         world_size=info.world_size, transform=_transform(dataset))
    config_dict = {"kind": "diffusion", "experiment": to_dict(cfg), "image_shape": list(image_shape),
                   "num_classes": num_classes}
    hooks = []
    if cfg.train.sample_every > 0:  # the trainer calls hooks every train.sample_every steps
        hooks.append(_sample_hook(cfg, loss.schedule, run_dir, num_classes, image_shape))
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
        path = sample_grid(final, loss.schedule, cfg.sample, image_shape=image_shape, num_classes=num_classes,
                           out=run_dir / "samples" / "final.png", device=trainer.device)
        summary["sample_grid"] = str(path)
    return summary


@dataclass
class LoadedModel:
    """A denoiser rebuilt from a run, checkpoint or export, with what is needed to sample it."""

    model: DiffusionModel
    config: ExperimentConfig
    schedule: Schedule
    image_shape: tuple[int, int, int]
    num_classes: int
    meta: dict[str, Any]


def load_model(path: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> LoadedModel:
    """Rebuild a model from a run directory (latest checkpoint), a checkpoint directory, or an exported
    ``.safetensors`` file. EMA weights are used when present and ``ema``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory, checkpoint or file")
    if path.is_file():
        state, meta = load_inference(path)
    else:
        ckpt = load_checkpoint(path) if (path / "state.json").exists() else load_latest(path, fallback=True)
        if ckpt is None:
            raise CheckpointError(f"{path}: no checkpoint found (expected a run directory with checkpoints/)")
        meta = ckpt.state.get("config") or {}
        state = ckpt.ema if (ema and ckpt.ema is not None) else ckpt.model
    if "experiment" not in meta or "image_shape" not in meta:
        raise CheckpointError(f"{path}: not a simdiff diffusion model (its config has no experiment / image_shape)")
    try:
        cfg = config_from_dict(meta["experiment"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is invalid ({e})") from None
    image_shape = tuple(int(v) for v in meta["image_shape"])
    num_classes = int(meta.get("num_classes", 0))
    model = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
    if meta.get("kind", "diffusion") != "diffusion":  # a distilled student: rewrap the network as recorded
        from simdiff.distill.experiment import wrap_student

        model = wrap_student(model, meta.get("student"))
        meta = {**meta, "sampler_spec": meta.get("sampler_spec") or to_dict(cfg.sample)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the stored config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval().requires_grad_(False)
    schedule = schedule_from_dict(cfg.diffusion.schedule)
    return LoadedModel(model, cfg, schedule, image_shape, num_classes, meta)


def describe(loaded: LoadedModel) -> str:
    """One paragraph about a loaded model (for ``simdiff sample --info``)."""
    n = sum(p.numel() for p in loaded.model.parameters())
    return json.dumps({"arch": loaded.config.model.arch, "parameterisation": loaded.config.model.parameterisation,
                       "parameters": n, "image_shape": loaded.image_shape, "num_classes": loaded.num_classes,
                       "schedule": loaded.config.diffusion.schedule, "kind": loaded.meta.get("kind")})


def reference_images(cfg: ExperimentConfig, num: int, *, split: str = "test") -> tuple[torch.Tensor, str]:
    """Real images to score against: ``num`` images of the training data set's ``split`` at the model's size.

    Returns the images and a cache key for their feature statistics.
    """
    data_cfg = dataclasses.replace(cfg.data, split=split, limit=num, hflip=False)
    try:
        ds = build_dataset(data_cfg)
    except (ConfigError, ValueError):  # data sets without that split (e.g. folders, digits): use the train split
        data_cfg = dataclasses.replace(data_cfg, split="train")
        ds = build_dataset(data_cfg)
    c, h, w = ds.images.shape[1:]
    key = f"{data_cfg.name}-{data_cfg.split}-{c}x{h}x{w}-{len(ds)}".replace("/", "_")
    return ds.images, key


def evaluate_model(
    loaded: LoadedModel,
    sample_cfg: SampleConfig,
    *,
    num: int = 1000,
    metrics: tuple[str, ...] = ("mnist_fd", "fid"),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Sample ``num`` images from ``loaded`` and score them against the data set's test split."""
    from simdiff.eval import evaluate_samples

    labels = torch.arange(num) % loaded.num_classes if loaded.num_classes > 0 else None
    if labels is None:
        metrics = tuple(m for m in metrics if m != "accuracy")
    with torch.no_grad():
        x = generate(loaded.model, loaded.schedule, loaded.image_shape, sample_cfg, num=num, labels=labels,
                     num_classes=loaded.num_classes, device=device, progress=progress)
    ref, key = reference_images(loaded.config, max(num, 1000))
    return evaluate_samples(x, ref, metrics=metrics, labels=labels, reference_key=key, progress=progress)
