"""A cascade: a base model at low resolution, then super-resolution stages; its YAML config, sampling and the
one-file artefact.

Cascade YAML (``simdiff/configs/mnist_cascade.yaml``; ``photos_cascade.yaml`` has an unconditional base model)::

    name: mnist_cascade
    num: 16                 # images
    seed: 0
    labels: null            # base-model class labels, cycled (null: all classes in turn; unconditional: ignored)
    stages:
      - {source: runs/mnist_14, sampler: dpmpp_2m, steps: 25}                 # base model (any simdiff run/export)
      - {source: runs/mnist_sr, sampler: dpmpp_2m, steps: 25, aug_logsnr: 4}  # super-resolution model

A stage's ``sampler`` / ``steps`` / ``grid`` / ``guidance`` / ``eta`` default to its own run's ``sample:`` section;
a super-resolution stage's ``aug_logsnr`` (the fixed noise-conditioning-augmentation level at sampling; ``null``: no
corruption) defaults to its run's ``sr.aug_logsnr``. A ``source`` is a run directory, checkpoint directory or export,
relative to the working directory or, failing that, to the YAML's folder.

One-file artefact (:func:`save_cascade`): a safetensors file whose tensors are each stage's weights under the prefix
``stage<i>/`` and whose metadata holds ``format: simdiff-cascade-v1`` and ``cascade``: a JSON document with
``name``, ``num``, ``seed``, ``labels`` and per stage its full config dict (as in a checkpoint) and resolved sampling
settings. :func:`load_cascade` reads either form.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, from_dict, load_yaml, to_dict
from simdiff.generate import SampleConfig, check_sample_config, generate

from .train import SR_KIND, sample_sr, sr_from_state

__all__ = ["CASCADE_FORMAT", "CascadeStage", "Cascade", "load_cascade", "save_cascade", "sample_cascade",
           "is_cascade_source"]

CASCADE_FORMAT = "simdiff-cascade-v1"
_SAMPLE_KEYS = ("sampler", "steps", "grid", "guidance", "eta")
_UNSET = object()


@dataclass(frozen=True)
class _StageSpec:
    source: str
    sampler: str | None = None
    steps: int | None = None
    grid: str | None = None
    guidance: float | None = None
    eta: float | None = None
    aug_logsnr: float | None = None


@dataclass(frozen=True)
class _CascadeSpec:
    name: str = "cascade"
    num: int = 16
    seed: int = 0
    labels: list[int] | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CascadeStage:
    """One stage: its denoiser, schedule, output shape, sampling settings and (super-resolution) augmentation level.

    ``kind`` is "base" or "sr"; ``meta`` is the stage model's config dict (as stored in its checkpoint).
    """

    kind: str
    model: Any
    schedule: Any
    image_shape: tuple[int, int, int]
    num_classes: int
    sample: SampleConfig
    meta: dict[str, Any]
    aug_logsnr: float | None = None
    source: str = ""


@dataclass
class Cascade:
    """Stages in order (a base model, then super-resolution models) and the default ``num`` / ``seed`` / labels."""

    stages: list[CascadeStage]
    name: str = "cascade"
    num: int = 16
    seed: int = 0
    labels: list[int] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The final stage's output shape."""
        return self.stages[-1].image_shape


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from simdiff.train.checkpoint import CheckpointError, load_checkpoint, load_inference, load_latest

    if path.is_file():
        return load_inference(path)
    ckpt = load_checkpoint(path) if (path / "state.json").exists() else load_latest(path, fallback=True)
    if ckpt is None:
        raise CheckpointError(f"{path}: no checkpoint found (expected a run directory with checkpoints/)")
    return (ckpt.ema if ckpt.ema is not None else ckpt.model), (ckpt.state.get("config") or {})


def _base_from_state(meta: dict[str, Any], state: dict[str, Tensor], where: str):
    """``(model, config, schedule, image_shape, num_classes)`` of a plain diffusion model (no students)."""
    from simdiff.runs import _weights_problem, build_network, config_from_dict

    if meta.get("kind", "diffusion") != "diffusion" or "experiment" not in meta or "image_shape" not in meta:
        raise ConfigError(f"{where}: a cascade's first stage must be a diffusion model (got "
                          f"kind={meta.get('kind', 'none')!r})")
    cfg = config_from_dict(meta["experiment"])
    image_shape = tuple(int(v) for v in meta["image_shape"])
    num_classes = int(meta.get("num_classes", 0))
    model = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
    problem = _weights_problem(model, state)
    if problem:
        raise ConfigError(f"{where}: weights do not match the network its config describes: {problem}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval().requires_grad_(False)
    from simdiff.schedules import schedule_from_dict

    return model, cfg, schedule_from_dict(cfg.diffusion.schedule), image_shape, num_classes


def _stage(i: int, meta: dict[str, Any], state: dict[str, Tensor], settings: dict[str, Any], where: str
           ) -> CascadeStage:
    """Build stage ``i`` from its config dict, weights and sampling ``settings`` (keys of ``_StageSpec``)."""
    if i > 0 and meta.get("kind") != SR_KIND:
        raise ConfigError(f"{where}: stage {i} must be a super-resolution model (kind={SR_KIND!r}), got "
                          f"kind={meta.get('kind', 'diffusion')!r}")
    if i == 0 and meta.get("kind") == SR_KIND:
        raise ConfigError(f"{where}: stage 0 is a super-resolution model; a cascade starts with a base model")
    if i == 0:
        model, cfg, schedule, shape, classes = _base_from_state(meta, state, where)
        aug = None
        if settings.get("aug_logsnr", _UNSET) not in (_UNSET, None):
            raise ConfigError(f"{where}: aug_logsnr is for super-resolution stages, not the base model (stage 0)")
    else:
        loaded = sr_from_state(meta, state, where=where)
        model, cfg, schedule, shape, classes = (loaded.model, loaded.config, loaded.schedule, loaded.image_shape,
                                                loaded.num_classes)
        aug = settings.get("aug_logsnr", _UNSET)
        aug = loaded.sr.aug_logsnr if aug is _UNSET else (None if aug is None else float(aug))
        if aug is not None and math.isnan(aug):
            raise ConfigError(f"{where}: aug_logsnr must be a number or null")
    changes = {k: settings[k] for k in _SAMPLE_KEYS if settings.get(k) is not None}
    try:
        sample = check_sample_config(dataclasses.replace(cfg.sample, **changes), where=f"stages[{i}]")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return CascadeStage("base" if i == 0 else "sr", model, schedule, shape, classes, sample, meta, aug, where)


def _check_chain(stages: list[CascadeStage]) -> None:
    for i in range(1, len(stages)):
        want, got = stages[i].model.low_res_shape, stages[i - 1].image_shape
        if tuple(want) != tuple(got):
            raise ConfigError(f"stages[{i}] ({stages[i].source}) super-resolves {list(want)} images but stage "
                              f"{i - 1} makes {list(got)}")


def _resolve(source: str, base_dir: Path) -> Path:
    p = Path(source)
    if not p.exists() and not p.is_absolute() and (base_dir / p).exists():
        return base_dir / p
    return p


def is_cascade_source(path: str | Path) -> bool:
    """True for a cascade YAML (a mapping with ``stages``) or a one-file cascade artefact."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix in (".yaml", ".yml"):
        try:
            return isinstance(load_yaml(path), dict) and "stages" in load_yaml(path)
        except ConfigError:
            return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == CASCADE_FORMAT
    except Exception:  # not a safetensors file at all: not a cascade
        return False


def _from_yaml(path: Path) -> Cascade:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a cascade config must be a mapping with 'stages'")
    spec = from_dict(_CascadeSpec, data)
    if len(spec.stages) < 2:
        raise ConfigError(f"{path}: 'stages' must list a base model and at least one super-resolution model, "
                          f"got {len(spec.stages)} stage(s)")
    stages = []
    for i, raw in enumerate(spec.stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: stages[{i}] must be a mapping with 'source', got {type(raw).__name__}")
        st = from_dict(_StageSpec, raw, where=f"stages[{i}]")
        settings = {k: getattr(st, k) for k in _SAMPLE_KEYS}
        if "aug_logsnr" in raw:
            settings["aug_logsnr"] = st.aug_logsnr
        src = _resolve(st.source, path.parent)
        if not src.exists():
            raise ConfigError(f"{path}: stages[{i}].source {st.source!r}: no such run directory, checkpoint or file")
        state, meta = _read(src)
        stages.append(_stage(i, meta, state, settings, str(src)))
    _check_chain(stages)
    return Cascade(stages, spec.name, spec.num, spec.seed, spec.labels)


def load_cascade(path: str | Path, *, device: str | torch.device = "cpu") -> Cascade:
    """A cascade from its YAML config or from a one-file artefact written by :func:`save_cascade`."""
    from simdiff.train.checkpoint import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such cascade file")
    if path.suffix in (".yaml", ".yml"):
        cascade = _from_yaml(path)
    else:
        tensors, meta = read_safetensors(path)
        if meta.get("format") != CASCADE_FORMAT:
            raise ConfigError(f"{path}: not a cascade file (metadata format={meta.get('format')!r})")
        try:
            doc = json.loads(meta["cascade"])
            stages = []
            for i, st in enumerate(doc["stages"]):
                prefix = f"stage{i}/"
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                stages.append(_stage(i, st["config"], state, st["sample"], f"{path}:stage{i}"))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: damaged cascade metadata ({type(e).__name__}: {e})") from None
        _check_chain(stages)
        cascade = Cascade(stages, doc.get("name", "cascade"), int(doc.get("num", 16)), int(doc.get("seed", 0)),
                          doc.get("labels"))
    for st in cascade.stages:
        st.model.to(device)
    return cascade


def save_cascade(cascade: Cascade, out: str | Path) -> Path:
    """Write the whole cascade (every stage's weights, config and sampling settings) to one safetensors file."""
    from safetensors.torch import save as st_save

    from simdiff.train import rundir
    from simdiff.train.checkpoint import library_version

    tensors: dict[str, Tensor] = {}
    stages = []
    for i, st in enumerate(cascade.stages):
        for k, v in st.model.state_dict().items():
            tensors[f"stage{i}/{k}"] = v.detach().cpu().contiguous()
        sample = {k: getattr(st.sample, k) for k in _SAMPLE_KEYS}
        if st.kind == "sr":
            sample["aug_logsnr"] = st.aug_logsnr
        stages.append({"config": st.meta, "sample": sample})
    doc = {"name": cascade.name, "num": cascade.num, "seed": cascade.seed, "labels": cascade.labels,
           "stages": stages}
    meta = {"format": CASCADE_FORMAT, "cascade": json.dumps(to_dict(doc)), "version": library_version()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_bytes(out, st_save(tensors, metadata=meta))
    return out


def sample_cascade(
    cascade: Cascade,
    *,
    num: int | None = None,
    seed: int | None = None,
    labels: Tensor | list[int] | None = None,
    aug_logsnr: float | None | object = _UNSET,
    device: torch.device | str = "cpu",
    return_stages: bool = False,
    progress: bool = False,
) -> Tensor | list[Tensor]:
    """Run the cascade: the base model samples ``num`` images, each super-resolution stage upsamples the previous
    stage's output. Stage ``i`` samples with seed ``seed + i``, so a seed fixes the whole cascade.

    Args:
        num, seed: default to the cascade's.
        labels: base-model class labels ``[num]`` (cycled from the cascade's ``labels`` or ``0..C-1`` when
            ``None``); also given to super-resolution stages that are class-conditional. An unconditional base model
            takes none: it samples with ``labels=None`` (the cascade's ``labels`` are ignored) and refuses given
            ones; its class-conditional super-resolution stages, if any, then get the null class.
        aug_logsnr: overrides every super-resolution stage's augmentation level (``None``: no corruption).

    Returns:
        The final images ``[num, C, H, W]`` on CPU, or (``return_stages``) every stage's output in order.
    """
    from simdiff.runs import class_null_cond

    num = cascade.num if num is None else int(num)
    seed = cascade.seed if seed is None else int(seed)
    base = cascade.stages[0]
    lab = None
    if base.num_classes > 0:
        if labels is None:
            pattern = torch.tensor(cascade.labels) if cascade.labels else torch.arange(base.num_classes)
            lab = pattern.repeat((num + len(pattern) - 1) // len(pattern))[:num]
        else:
            lab = torch.as_tensor(labels, dtype=torch.long)
        if lab.shape != (num,) or bool((lab < 0).any()) or bool((lab >= base.num_classes).any()):
            raise ConfigError(f"labels must be {num} class indices in 0..{base.num_classes - 1}")
    elif labels is not None:
        raise ConfigError("labels do not apply: the cascade's base model is unconditional (no classes)")
    cfg = dataclasses.replace(base.sample, num=num, seed=seed)
    x = generate(base.model, base.schedule, base.image_shape, cfg, num=num, labels=lab,
                 num_classes=base.num_classes, null_cond=class_null_cond(base.num_classes), device=device,
                 progress=progress)
    outs = [x]
    for i, st in enumerate(cascade.stages[1:], start=1):
        aug = st.aug_logsnr if aug_logsnr is _UNSET else aug_logsnr
        cfg = dataclasses.replace(st.sample, num=num, seed=seed + i)
        x = sample_sr(st.model, st.schedule, x, cfg, aug_logsnr=aug, labels=lab if st.num_classes > 0 else None,
                      device=device, progress=progress)
        outs.append(x)
    return outs if return_stages else x
