"""Quantise a loaded run, and save / reload a quantised denoiser as one ``.safetensors`` file (never pickle).

File layout (``format = "simdiff-quant-v1"`` in the safetensors metadata): the quantised model's state dict
(int8 codes ``*.qweight_i``, uint8 for packed int4, float32 scales ``*.wscale_i``, activation ``*.scale`` /
``*.zero_point``, every unquantised parameter in float32), and in the metadata the run's ``config`` JSON (as in
:func:`simdiff.train.export_inference`) and the ``quant`` JSON (the :class:`QuantConfig` and which layers are
quantised, with their splits). Reloading rebuilds the float network from ``config``, swaps the same layers and loads
the tensors strictly, so the reloaded model computes bit-identical outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from simdiff.configuration import ConfigError, to_dict
from simdiff.train.checkpoint import CheckpointError, library_version, read_safetensors

from .calibrate import CalibrationSet, noised_data_set, record_trajectories, select_single_level, select_uniform_steps
from .model import QuantConfig, apply_spec, quantize_model

__all__ = ["QUANT_FORMAT", "build_calibration", "quantize_loaded", "save_quantized", "load_quantized",
           "is_quantized_file"]

QUANT_FORMAT = "simdiff-quant-v1"


def build_calibration(loaded, cfg: QuantConfig, *, images: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, recorded: CalibrationSet | None = None) -> CalibrationSet:
    """The calibration set ``cfg.calibration`` asks for, for a :class:`simdiff.runs.LoadedModel`.

    ``recorded`` reuses a :func:`record_trajectories` result (the benchmark records once for both strategies);
    ``images`` / ``labels`` give the real data for "data" (default: the run's training split, ``4 * num_calib``
    images).
    """
    if cfg.calibration == "data":
        if loaded.process is not None:
            raise ConfigError("data calibration noises images with the isotropic VP process; this model has "
                              f"process {type(loaded.process).__name__}: use trajectory calibration")
        if images is None:
            from simdiff.data import build_dataset

            ds = build_dataset(dataclasses.replace(loaded.config.data, split="train", limit=4 * cfg.num_calib,
                                                   hflip=False))
            images, labels = ds.images, ds.labels
        return noised_data_set(images, labels, loaded.schedule, cfg.num_calib, seed=cfg.seed,
                               num_classes=loaded.num_classes)
    if recorded is None:
        recorded = record_float_trajectories(loaded, cfg)
    if cfg.calibration == "trajectory":
        return select_uniform_steps(recorded, cfg.num_calib, seed=cfg.seed)
    return select_single_level(recorded, cfg.num_calib, level=cfg.single_level, seed=cfg.seed)


def record_float_trajectories(loaded, cfg: QuantConfig) -> CalibrationSet:
    """All denoiser inputs of float sampling runs of ``loaded`` (classes cycling): ``cfg.calib_runs`` runs, or
    ``max(calib_runs, num_calib)`` for single-level calibration (so its rows at one step are distinct)."""
    from simdiff.runs import class_null_cond

    runs = max(cfg.calib_runs, cfg.num_calib) if cfg.calibration == "single" else cfg.calib_runs
    base = loaded.config.sample
    scfg = dataclasses.replace(base, sampler=cfg.calib_sampler or base.sampler, steps=cfg.calib_steps,
                               guidance=cfg.calib_guidance, seed=cfg.seed + 12345, num=runs,
                               batch_size=min(runs, 256))
    labels = torch.arange(runs) % loaded.num_classes if loaded.num_classes > 0 else None
    return record_trajectories(loaded.model, loaded.schedule, loaded.image_shape, scfg, num=runs,
                               labels=labels, num_classes=loaded.num_classes,
                               null_cond=class_null_cond(loaded.num_classes), process=loaded.process)


def quantize_loaded(loaded, cfg: QuantConfig = QuantConfig(), *, calib: CalibrationSet | None = None):
    """A :class:`simdiff.runs.LoadedModel` whose model is the quantised denoiser (``meta["quant"]`` = its spec)."""
    if calib is None:
        calib = build_calibration(loaded, cfg)
    qmodel = quantize_model(loaded.model, calib, cfg)
    return dataclasses.replace(loaded, model=qmodel, meta={**loaded.meta, "quant": qmodel.quant_spec})


def _config_doc(loaded) -> dict:
    meta = {k: v for k, v in loaded.meta.items() if k != "quant"}
    meta.setdefault("experiment", to_dict(loaded.config))
    meta.setdefault("image_shape", list(loaded.image_shape))
    meta.setdefault("num_classes", loaded.num_classes)
    return meta


def save_quantized(loaded, path: str | Path) -> Path:
    """Write the quantised ``loaded.model`` (from :func:`quantize_loaded`) to ``path`` atomically."""
    from safetensors.torch import save as st_save

    spec = getattr(loaded.model, "quant_spec", None) or loaded.meta.get("quant")
    if spec is None:
        raise ValueError("save_quantized: the model is not quantised (no quant_spec); run quantize_loaded first")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = {"format": QUANT_FORMAT, "config": json.dumps(_config_doc(loaded)), "quant": json.dumps(spec),
            "version": library_version()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(st_save(tensors, metadata=meta))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def is_quantized_file(path: str | Path) -> bool:
    """Whether ``path`` is a readable safetensors file written by :func:`save_quantized` (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == QUANT_FORMAT
    except (SafetensorError, ValueError, RuntimeError, OSError):
        return False


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild a :func:`save_quantized` file -> :class:`simdiff.runs.LoadedModel`; any damage -> one-line
    :class:`~simdiff.train.checkpoint.CheckpointError`."""
    from simdiff.nets import DiffusionModel
    from simdiff.nets.students import wrap_student
    from simdiff.runs import LoadedModel, build_network, config_from_dict, run_process
    from simdiff.schedules import schedule_from_dict

    path = Path(path)
    state, meta = read_safetensors(path)
    if meta.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{path}: not a {QUANT_FORMAT} file (metadata format={meta.get('format')!r})")
    try:
        config, spec = json.loads(meta["config"]), json.loads(meta["quant"])
        cfg = config_from_dict(config["experiment"])
        image_shape = tuple(int(v) for v in config["image_shape"])
        num_classes = int(config.get("num_classes", 0))
        QuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: bad quantisation metadata ({type(e).__name__}: {e})") from None
    model = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
    if config.get("kind", "diffusion") != "diffusion":
        try:
            model = wrap_student(model, config.get("student"))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    try:
        apply_spec(model, spec)
        model.load_state_dict(state, strict=True)
    except (ConfigError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensors do not match the recorded quantisation "
                              f"({str(e).splitlines()[0]})") from None
    model.quant_spec = spec
    model.to(device).eval().requires_grad_(False)
    process = model.process if isinstance(model, DiffusionModel) else run_process(cfg)
    return LoadedModel(model, cfg, schedule_from_dict(cfg.diffusion.schedule), image_shape, num_classes,
                       {**config, "quant": spec}, process)
