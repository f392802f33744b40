"""Super-resolution runs: YAML config (an experiment config plus an ``sr:`` section), training through the shared
:class:`~simdiff.train.Trainer`, loading back from a run directory or an export, and sampling given low-res images.

A super-resolution checkpoint's config dict has ``kind: "super_resolution"``, the experiment config, the ``sr``
section, ``image_shape`` (the high-resolution shape), ``num_classes`` and the conditioner's identity; an export made
by ``simdiff export`` carries the same dict, so :func:`load_sr` reads both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from simdiff.generate import SampleConfig, check_sample_config, generate
from simdiff.nets import build_model
from simdiff.runs import ExperimentConfig, check_experiment_config, model_classes
from simdiff.schedules import Schedule, schedule_from_dict

from .sr import LOW_RES_NULL, LowResolution, SRConfig, SRLoss, SuperResolution, augment, downsample, low_res_pairs

__all__ = ["SR_KIND", "load_sr_config", "build_sr_network", "train_sr", "LoadedSR", "load_sr", "sr_from_state",
           "sample_sr"]

#: the ``kind`` of a super-resolution checkpoint's config dict.
SR_KIND = "super_resolution"


def load_sr_config(path: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
                   ) -> tuple[ExperimentConfig, SRConfig]:
    """YAML (or dict) with the experiment keys and an ``sr:`` section + ``a.b=value`` overrides (``sr.*`` included)
    -> validated ``(ExperimentConfig, SRConfig)``."""
    data = dict(path) if isinstance(path, dict) else load_yaml(path)
    data = apply_overrides(data, list(overrides))
    if not isinstance(data.get("sr"), dict):
        raise ConfigError("a super-resolution config needs an 'sr:' section (e.g. sr: {low_res_size: 14})")
    sr = from_dict(SRConfig, data.pop("sr"), where="sr")
    cfg = check_experiment_config(from_dict(ExperimentConfig, data))
    from simdiff.train import refuse_init_from, validate_train_config

    validate_train_config(cfg.train)
    refuse_init_from(cfg.train, "super-resolution stage training")
    return cfg, sr


def build_sr_network(cfg: ExperimentConfig, sr: SRConfig, *, image_shape: tuple[int, int, int],
                     num_classes: int) -> SuperResolution:
    """The :class:`SuperResolution` denoiser of ``cfg.model`` (backbone built for ``2C + 1`` channels) for
    high-resolution images of ``image_shape``."""
    c, h, w = image_shape
    if sr.low_res_size >= min(h, w):
        raise ConfigError(f"sr.low_res_size={sr.low_res_size} must be smaller than the image size {h}x{w}")
    net = build_model(cfg.model.arch, cfg.model.parameterisation, cfg.model.options, image_channels=2 * c + 1,
                      image_size=(h, w) if h != w else h, num_classes=model_classes(cfg, num_classes))
    return SuperResolution(net, channels=c, low_res_size=sr.low_res_size, upsample=sr.upsample)


def _config_dict(cfg: ExperimentConfig, sr: SRConfig, image_shape, num_classes: int) -> dict[str, Any]:
    cond = LowResolution(sr.low_res_size, channels=image_shape[0], mode=sr.downsample)
    return {"kind": SR_KIND, "experiment": to_dict(cfg), "sr": dataclasses.asdict(sr),
            "image_shape": list(image_shape), "num_classes": num_classes, "conditioner": cond.identity()}


def _write_config(cfg: ExperimentConfig, sr: SRConfig, run_dir: Path) -> None:
    import yaml

    from simdiff.train import rundir

    doc = {**to_dict(cfg), "sr": dataclasses.asdict(sr)}
    rundir.atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False).encode())


def train_sr(cfg: ExperimentConfig, sr: SRConfig, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Train a super-resolution model into ``run_dir`` with the shared trainer (checkpoints, EMA, resume, metrics).

    Training pairs are ``(x, downsample(x))`` made per batch from the data set itself (:func:`low_res_pairs`); the
    :class:`LowResolution` conditioner turns a batch into the ``low_res`` keyword and :class:`SRLoss` adds the
    noise-conditioning augmentation. Ends by writing ``samples/final.png`` (rows: low-res input upsampled, sample,
    real image).
    """
    from simdiff.data import build_dataset
    from simdiff.train import BatchIterator, Trainer, mix_seed, rundir

    run_dir = Path(run_dir)
    dataset = build_dataset(cfg.data)
    image_shape = tuple(dataset.shape)
    num_classes = model_classes(cfg, dataset.num_classes)
    if cfg.diffusion.cond_drop_prob > 0 and num_classes > 0 and cfg.diffusion.null_label is None:
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, null_label=num_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed("init", cfg.train.seed))
        model = build_sr_network(cfg, sr, image_shape=image_shape, num_classes=num_classes)
    conditioner = LowResolution(sr.low_res_size, channels=image_shape[0], mode=sr.downsample)
    loss = SRLoss(cfg.diffusion, sr, conditioner)
    pairs = low_res_pairs(sr.low_res_size, mode=sr.downsample, hflip=dataset.hflip)

    def transform(batch, generator):
        out = pairs(batch, generator)
        return out if num_classes > 0 else {k: v for k, v in out.items() if k != "labels"}

    data = BatchIterator(dataset, cfg.train.batch_size, seed=cfg.train.seed, transform=transform)
    config_dict = _config_dict(cfg, sr, image_shape, num_classes)

    def body() -> dict[str, Any]:
        trainer = Trainer(model, loss, data, cfg.train, run_dir, config_dict=config_dict, resume=resume,
                          on_resume=lambda ck: _write_config(cfg, sr, run_dir))
        summary = trainer.fit()
        final = build_sr_network(cfg, sr, image_shape=image_shape, num_classes=num_classes)
        final.load_state_dict(trainer.full_state_dict(ema=True))
        final.eval()
        real = dataset[torch.arange(min(8, len(dataset)))]["x"]
        low = downsample(real, sr.low_res_size, mode=sr.downsample)
        schedule = schedule_from_dict(cfg.diffusion.schedule)
        x = sample_sr(final, schedule, low, cfg.sample, aug_logsnr=sr.aug_logsnr)
        from simdiff.images import save_grid

        up = torch.nn.functional.interpolate(low, size=image_shape[-2:], mode="nearest")
        summary["sample_grid"] = str(save_grid(torch.cat([up, x, real]), run_dir / "samples" / "final.png",
                                               nrow=len(real), scale=max(1, 64 // image_shape[-1])))
        return summary

    return rundir.owned_run(run_dir, body)


@dataclass
class LoadedSR:
    """A super-resolution denoiser rebuilt from a run or export, with what is needed to sample it."""

    model: SuperResolution
    config: ExperimentConfig
    sr: SRConfig
    schedule: Schedule
    image_shape: tuple[int, int, int]
    num_classes: int
    meta: dict[str, Any]


def sr_from_state(meta: dict[str, Any], state: dict[str, Tensor], *, where: str = "model") -> LoadedSR:
    """Rebuild a :class:`LoadedSR` from a super-resolution config dict and its weights (one-line errors)."""
    from simdiff.runs import _weights_problem, config_from_dict

    if meta.get("kind") != SR_KIND or "sr" not in meta or "image_shape" not in meta:
        raise ConfigError(f"{where}: not a super-resolution model (kind={meta.get('kind', 'diffusion')!r})")
    try:
        cfg = config_from_dict(meta["experiment"])
        sr = from_dict(SRConfig, meta["sr"], where="sr")
    except (ConfigError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: stored config is invalid ({e})") from None
    image_shape = tuple(int(v) for v in meta["image_shape"])
    num_classes = int(meta.get("num_classes", 0))
    model = build_sr_network(cfg, sr, image_shape=image_shape, num_classes=num_classes)
    problem = _weights_problem(model, state)
    if problem:
        raise ConfigError(f"{where}: weights do not match the super-resolution network its config describes: "
                          f"{problem}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval().requires_grad_(False)
    return LoadedSR(model, cfg, sr, schedule_from_dict(cfg.diffusion.schedule), image_shape, num_classes, meta)


def load_sr(path: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> LoadedSR:
    """A super-resolution model from a run directory (latest checkpoint), checkpoint directory or export file."""
    from simdiff.train.checkpoint import CheckpointError, load_checkpoint, load_inference, load_latest

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
    loaded = sr_from_state(meta, state, where=str(path))
    loaded.model.to(device)
    return loaded


def sample_sr(
    model: SuperResolution,
    schedule: Schedule,
    low_res: Tensor,
    cfg: SampleConfig = SampleConfig(),
    *,
    aug_logsnr: float | None = None,
    labels: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Super-resolve ``low_res`` ``[N, C, h, w]`` -> ``[N, C, H, W]`` on CPU.

    The low-res images are corrupted once at the fixed level ``aug_logsnr`` (``None``: not at all) with noise from a
    CPU generator seeded by ``cfg.seed``, and that level is given to the model; then
    :func:`simdiff.generate.generate` runs ``cfg`` (sampler, steps, grid, seed; ``cfg.guidance`` guides on the
    low-res input against :data:`~simdiff.cascade.sr.LOW_RES_NULL`).
    """
    check_sample_config(cfg)
    if low_res.dim() != 4 or tuple(low_res.shape[1:]) != model.low_res_shape:
        raise ConfigError(f"low_res must be [N, {', '.join(map(str, model.low_res_shape))}], "
                          f"got {list(low_res.shape)}")
    if aug_logsnr is not None and math.isnan(aug_logsnr):
        raise ConfigError("aug_logsnr must be a number or None")
    n = low_res.shape[0]
    level = torch.full((n,), math.inf if aug_logsnr is None else float(aug_logsnr))
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    noise = torch.randn(low_res.shape, generator=gen)
    low = augment(low_res.float().cpu(), level, noise)
    cond = {"low_res": low, "aug_logsnr": level.float(), "low_res_mask": torch.ones(n)}
    return generate(model, schedule, model.image_shape, cfg, num=n, cond=cond, labels=labels,
                    num_classes=model.num_classes, null_cond=dict(LOW_RES_NULL), device=device, progress=progress)
