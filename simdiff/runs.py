"""Runs on disk -> models to sample and score: the experiment config, network building, loading, sample grids.

This module is what both the training glue (:mod:`simdiff.experiment`) and the distillation glue
(:mod:`simdiff.distill.experiment`) build on, and all that ``simdiff sample | eval`` need; it imports neither of
them, nor any distillation loss. A run directory holds ``checkpoints/``, ``metrics.csv``, ``loss_curve.png``,
``samples/`` and ``config.yaml``. Checkpoints and exports carry a ``config_dict`` with the experiment config plus
the facts needed to rebuild the network without the data (``image_shape``, ``num_classes``) and ``kind``
("diffusion", or a distillation method's name with its ``sampler_spec`` and ``student`` wrapper).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from simdiff.configuration import ConfigError, apply_overrides, from_dict, get_registered, load_yaml, to_dict
from simdiff.data import DataConfig, ImageDataset, build_dataset, random_hflip
from simdiff.generate import SampleConfig, check_sample_config, generate
from simdiff.images import save_grid
from simdiff.losses import LossConfig
from simdiff.nets import DiffusionModel, build_model
from simdiff.nets.students import wrap_student
from simdiff.samplers.gaussian import MOMENTS_FILE, MOMENTS_PREFIX, DataMoments
from simdiff.schedules import Schedule, schedule_from_dict
from simdiff.train.checkpoint import CheckpointError, load_checkpoint, load_inference, load_latest
from simdiff.train.config import TrainConfig, upgrade_train_dict

__all__ = [
    "ModelConfig",
    "ExperimentConfig",
    "LoadedModel",
    "model_metrics",
    "load_config",
    "config_from_dict",
    "check_experiment_config",
    "build_network",
    "batch_transform",
    "sample_grid",
    "load_model",
    "describe",
    "student_sample_config",
    "check_student_sampling",
    "class_null_cond",
    "conditioner_for",
    "run_process",
    "reference_images",
    "evaluate_model",
]


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser: a backbone by name (``unet``, ``uvit``, ``residual_uvit``), its options, and what it predicts.

    ``class_conditional: false`` trains an unconditional model on a labelled data set (the labels are dropped from
    the batches, the network has no class rows, sample grids have no label rows).
    """

    arch: str = "uvit"
    parameterisation: Literal["eps", "x", "v"] = "v"
    options: dict[str, Any] = field(default_factory=dict)
    class_conditional: bool = True


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
    """YAML file (or defaults) + ``a.b=value`` overrides -> validated :class:`ExperimentConfig` (see
    :func:`check_experiment_config`: every problem is found here, before any data is read or any step is run)."""
    from simdiff.train import validate_train_config

    data = load_yaml(path) if path is not None else {}
    cfg = check_experiment_config(from_dict(ExperimentConfig, apply_overrides(data, list(overrides))))
    validate_train_config(cfg.train)
    return cfg


def config_from_dict(d: dict[str, Any]) -> ExperimentConfig:
    """A stored experiment config (a checkpoint's ``experiment`` entry) -> validated :class:`ExperimentConfig`; keys
    that earlier versions wrote and that were removed since (holding their old value) are dropped."""
    d = dict(d)
    if isinstance(d.get("train"), dict):
        d["train"] = upgrade_train_dict(d["train"])
    return check_experiment_config(from_dict(ExperimentConfig, d))


def check_experiment_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Refuse, with one line naming the key, what :func:`from_dict` cannot see: ``model.arch`` not a registered
    backbone, ``model.options`` that are not fields of that backbone's config (named ``model.options.<key>``), and
    ``sample.*`` values that cannot be sampled (:func:`simdiff.generate.check_sample_config`). Returns ``cfg``."""
    _backbone_options(cfg.model)
    check_sample_config(cfg.sample, where="sample")
    return cfg


def _backbone_options(model: ModelConfig) -> Any:
    """``model.options`` as the backbone's config dataclass, errors naming ``model.arch`` / ``model.options.<key>``."""
    from simdiff.nets import BACKBONES

    try:
        cfg_cls, _ = get_registered(BACKBONES, model.arch, "backbone")
    except ConfigError as e:
        raise ConfigError(f"model.arch: {e}") from None
    if isinstance(model.options, cfg_cls):
        return model.options
    return from_dict(cfg_cls, model.options, where="model.options")


def model_classes(cfg: ExperimentConfig, data_classes: int) -> int:
    """The class count the network is built for: the data set's, or 0 when ``model.class_conditional`` is false."""
    return data_classes if cfg.model.class_conditional else 0


def run_process(cfg: ExperimentConfig):
    """The noising process of ``cfg.diffusion`` (``diffusion.process`` over its schedule), or ``None`` for the
    isotropic VP process, whose exact code path (``simdiff.process``) every model and sampler takes by default."""
    from simdiff.processes import build_process

    process = build_process(cfg.diffusion.process, schedule_from_dict(cfg.diffusion.schedule))
    return None if getattr(process, "isotropic", False) else process


def build_network(cfg: ExperimentConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> DiffusionModel:
    """The :class:`DiffusionModel` described by ``cfg.model`` for images of ``image_shape`` (``num_classes`` is the
    data set's; an unconditional ``cfg.model`` ignores it), converting its views with the run's process. Under a
    discrete process the network is the bare backbone built from the process's own data arguments."""
    from simdiff.nets import build_backbone
    from simdiff.processes import is_discrete

    _backbone_options(cfg.model)  # unknown / mistyped options are reported as model.options.<key>
    process = run_process(cfg)
    if hasattr(process, "check_data_shape"):
        process.check_data_shape(tuple(image_shape))
    if is_discrete(process):
        return build_backbone(cfg.model.arch, cfg.model.options,
                              **process.network_kwargs(tuple(image_shape), model_classes(cfg, num_classes)))
    if hasattr(process, "network_kwargs"):  # a Gaussian process over non-image data (e.g. video windows)
        data = process.network_kwargs(tuple(image_shape), model_classes(cfg, num_classes))
        backbone = build_backbone(cfg.model.arch, cfg.model.options, **data)
        return DiffusionModel(backbone, cfg.model.parameterisation, process=process)
    c, h, w = image_shape
    return build_model(
        cfg.model.arch,
        cfg.model.parameterisation,
        cfg.model.options,
        image_channels=c,
        image_size=(h, w) if h != w else h,
        num_classes=model_classes(cfg, num_classes),
        process=process,
    )


def batch_transform(dataset: ImageDataset, *, labels: bool = True):
    """The per-batch transform of a run's :class:`~simdiff.train.BatchIterator`: random flips when the data set asks
    for them, and the ``labels`` entry dropped for an unconditional model (``labels=False``). ``None`` if neither."""
    drop = not labels and dataset.labels is not None
    if not dataset.hflip and not drop:
        return None

    def transform(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in batch.items() if not (drop and k == "labels")}
        if dataset.hflip:
            out["x"] = random_hflip(batch["x"], generator=generator)
        return out

    return transform


def conditioner_for(num_classes: int):
    """The conditioner of an image model: :class:`~simdiff.conditioners.ClassLabels` or
    :class:`~simdiff.conditioners.NoCondition`. Its ``identity()`` is recorded in every checkpoint's config."""
    from simdiff.conditioners import ClassLabels, NoCondition

    return ClassLabels(num_classes) if num_classes > 0 else NoCondition()


def class_null_cond(num_classes: int) -> dict[str, Any] | None:
    """Classifier-free guidance's "unconditional" input of a simdiff network: the null class row ``num_classes``."""
    return dict(conditioner_for(num_classes).null_cond) or None


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
    process=None,
) -> Path:
    """Sample ``num`` images (classes cycling 0..C-1 for a class-conditional model) and save them as a PNG grid;
    ``process`` is the run's noising process (``None``: isotropic VP, see :func:`run_process`)."""
    num = sample_cfg.num if num is None else num
    if hasattr(process, "preview"):  # a process with its own picture of samples (e.g. a rollout strip)
        return process.preview(model, sample_cfg, shape=tuple(image_shape), num_classes=num_classes, out=out,
                               num=num, device=device)
    labels = torch.arange(num) % num_classes if num_classes > 0 else None
    x = generate(model, schedule, image_shape, sample_cfg, num=num, labels=labels, num_classes=num_classes,
                 null_cond=class_null_cond(num_classes), device=device, process=process)
    nrow = num_classes if num_classes > 0 and num % num_classes == 0 and num_classes <= 16 else None
    scale = max(1, 64 // image_shape[-1])
    return save_grid(x, out, nrow=nrow, scale=scale)


@dataclass
class LoadedModel:
    """A denoiser rebuilt from a run, checkpoint or export, with what is needed to sample it."""

    model: DiffusionModel
    config: ExperimentConfig
    schedule: Schedule
    image_shape: tuple[int, int, int]
    num_classes: int
    meta: dict[str, Any]
    process: Any = None  # the run's noising process; None = isotropic VP (see run_process)


def student_sample_config(spec: dict[str, Any], base: SampleConfig) -> SampleConfig:
    """``base`` with the sampler, step count and grid a distilled student's ``sampler_spec`` records."""
    name = spec["sampler"]
    if name == "moment_matching" and spec.get("posterior_variance") == "large":
        name = "moment_matching_large"
    return dataclasses.replace(base, sampler=name, steps=int(spec["steps"]), grid=spec.get("grid", "uniform_t"),
                               eta=0.0, interval=None, rescale=0.0)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> LoadedModel:
    """Rebuild a model from a run directory (latest checkpoint), a checkpoint directory, or an exported
    ``.safetensors`` file. EMA weights are used when present and ``ema``."""
    from simdiff.devices import resolve_device

    device = resolve_device(device, what="device")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory, checkpoint or file")
    if path.is_file():
        from simdiff.quant.io import is_quantized_file, load_quantized

        if is_quantized_file(path):  # a post-training quantised export (reads the safetensors header only)
            return load_quantized(path, device=device)
        state, meta = load_inference(path)
        source = path
        moments_src: Any = {k: state.pop(k) for k in [k for k in state if k.startswith(MOMENTS_PREFIX)]}
    else:
        if path.name == "checkpoints" and not (path / "checkpoints").exists():  # given run/checkpoints: the run
            path = path.parent
        ckpt = load_checkpoint(path) if (path / "state.json").exists() else load_latest(path, fallback=True)
        if ckpt is None:
            raise CheckpointError(f"{path}: no checkpoint found (expected a run directory with checkpoints/)")
        meta = ckpt.state.get("config") or {}
        use_ema = ema and ckpt.ema is not None
        state = ckpt.ema if use_ema else ckpt.model
        source = ckpt.path / ("ema.safetensors" if use_ema else "model.safetensors")
        run_dir = path.parent.parent if (path / "state.json").exists() else path
        moments_src = run_dir / MOMENTS_FILE
    if "experiment" not in meta or "image_shape" not in meta:
        raise CheckpointError(f"{path}: not a simdiff diffusion model (its config has no experiment / image_shape)")
    try:
        cfg = config_from_dict(meta["experiment"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is invalid ({e})") from None
    image_shape = tuple(int(v) for v in meta["image_shape"])
    num_classes = int(meta.get("num_classes", 0))
    if meta.get("kind") == "super_resolution":
        raise CheckpointError(f"{source}: a super-resolution stage samples from a low-resolution input; put it in a "
                              "cascade (simdiff sample CASCADE.yaml, see simdiff/configs/mnist_cascade.yaml)")
    model = build_network(cfg, image_shape=image_shape, num_classes=num_classes)
    if meta.get("kind", "diffusion") != "diffusion":  # a distilled student: rewrap the network as recorded
        try:
            model = wrap_student(model, meta.get("student"))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        meta = {**meta, "sampler_spec": meta.get("sampler_spec") or to_dict(cfg.sample)}
    problem = _weights_problem(model, state)
    if problem:
        raise CheckpointError(f"{source}: weights do not match the network its config describes "
                              f"(model.arch={cfg.model.arch}): {problem}")
    bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"{source}: weight {bad!r} holds NaN/inf; the weights are damaged")
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(False)
    if meta.get("kind", "diffusion") == "diffusion":
        model.data_moments = _moments(moments_src, image_shape, num_classes)
    schedule = schedule_from_dict(cfg.diffusion.schedule)
    process = model.process if isinstance(model, DiffusionModel) else run_process(cfg)
    return LoadedModel(model, cfg, schedule, image_shape, num_classes, meta, process)


def _moments(src: Path | dict[str, torch.Tensor], image_shape: tuple[int, ...], num_classes: int):
    """The data moments a run directory (its file) or an export (its tensors) carries, or ``None``; moments of
    another shape or class count than the network's, or damaged ones, are one-line CheckpointErrors."""
    where = src if isinstance(src, Path) else "the embedded data moments"
    try:
        moments = DataMoments.load(src) if isinstance(src, Path) else DataMoments.from_tensors(src, MOMENTS_PREFIX)
    except (ValueError, CheckpointError) as e:
        raise CheckpointError(f"{where}: damaged data moments ({e})") from None
    if moments is not None and (moments.shape != tuple(image_shape) or moments.num_classes not in (0, num_classes)):
        raise CheckpointError(f"{where}: data moments for shape {moments.shape} / {moments.num_classes} classes do "
                              f"not match the model ({tuple(image_shape)} / {num_classes} classes)")
    return moments


def _weights_problem(model: torch.nn.Module, state: dict[str, torch.Tensor], *, show: int = 3) -> str | None:
    """What keeps ``state`` from loading into ``model`` (missing, unexpected and shape-mismatched keys, the first
    ``show`` of each), or ``None``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) {', '.join(missing[:show])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) {', '.join(unexpected[:show])}")
    if shaped:
        shown = ", ".join(f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in shaped[:show])
        parts.append(f"{len(shaped)} key(s) of another shape (file vs config) {shown}")
    return "; ".join(parts) + "; the weights were trained with a different model config" if parts else None


def describe(loaded: LoadedModel) -> str:
    """One paragraph about a loaded model (for ``simdiff sample --info``)."""
    n = sum(p.numel() for p in loaded.model.parameters())
    doc = {"arch": loaded.config.model.arch, "parameterisation": loaded.config.model.parameterisation,
           "parameters": n, "image_shape": loaded.image_shape, "num_classes": loaded.num_classes,
           "class_conditional": loaded.num_classes > 0, "data": loaded.config.data.name,
           "schedule": loaded.config.diffusion.schedule, "kind": loaded.meta.get("kind")}
    if loaded.meta.get("kind", "diffusion") != "diffusion":
        doc["sampler_spec"] = loaded.meta.get("sampler_spec")
    return json.dumps(doc)


#: samplers that run one kind of distilled student only (sampler -> that kind).
_KIND_ONLY_SAMPLERS = {"generator": "em"}
#: distilled kinds whose students are full denoisers (any sampler, any step count): guided stage one.
_FREE_KINDS = ("guided",)


def check_student_sampling(meta: dict[str, Any], cfg: SampleConfig) -> None:
    """Refuse sampling a model with a sampler, step count or grid it does not support (one-line ConfigError).

    ``meta`` is :attr:`LoadedModel.meta`. A step-distilled student (progressive, consistency, moment matching,
    guided stage two) is sampled only with the sampler, step count and grid it was distilled for; an EMD generator
    only with ``generator`` (one step); a guided stage-one student (w as an input) and a diffusion model with any
    denoiser sampler (not ``generator``).
    """
    kind = meta.get("kind", "diffusion")
    owner = _KIND_ONLY_SAMPLERS.get(cfg.sampler)
    if owner is not None and owner != kind:
        what = "a diffusion model" if kind == "diffusion" else f"a distilled {kind!r} student"
        raise ConfigError(f"sampler {cfg.sampler!r} runs {owner} students only; this is {what}: use a denoiser "
                          f"sampler (e.g. ddim, dpmpp_2m)")
    if kind == "diffusion" or kind in _FREE_KINDS:
        return
    spec = meta.get("sampler_spec") or {}
    if "sampler" not in spec or "steps" not in spec:
        return  # an old student without a recorded spec: nothing to check against
    want = student_sample_config(spec, cfg)
    flags = f"--sampler {want.sampler} --steps {want.steps}"
    if want.sampler != "generator":
        flags += f" --grid {want.grid}"
    got = {"sampler": cfg.sampler, "steps": cfg.steps, "grid": cfg.grid}
    bad = [k for k in ("sampler", "steps", "grid") if got[k] != getattr(want, k)]
    if want.sampler == "generator":
        bad = [k for k in bad if k != "grid"]
    if bad:
        given = ", ".join(f"--{k} {got[k]}" for k in bad)
        raise ConfigError(f"this {kind} student was distilled for {flags} and samples only with those; got {given}")


def reference_images(cfg: ExperimentConfig, num: int | None, *, split: str = "test") -> tuple[torch.Tensor, str]:
    """Real images to score against: the first ``num`` images (``None``: all) of the training data set's ``split``
    at the model's size, with the data's ``options`` (e.g. the patch size and stride of ``photos``).

    Returns the images and a cache key for their feature statistics (the options are part of it, so two patch grids
    with the same image count do not share cached statistics).
    """
    data_cfg = dataclasses.replace(cfg.data, split=split, limit=num, hflip=False)
    try:
        ds = build_dataset(data_cfg)
    except (ConfigError, ValueError):  # data sets without that split (e.g. folders, digits): use the train split
        data_cfg = dataclasses.replace(data_cfg, split="train")
        ds = build_dataset(data_cfg)
    c, h, w = ds.shape
    options = re.sub(r"[^A-Za-z0-9_.+-]", "", "".join(f"-{k}_{v}" for k, v in sorted(data_cfg.options.items())))
    key = f"{data_cfg.name}-{data_cfg.split}{options}-{c}x{h}x{w}-{len(ds)}".replace("/", "_")
    return ds.images, key


def model_metrics(loaded: LoadedModel, metrics: Sequence[str] | None, *, num: int) -> tuple[str, ...]:
    """The metrics :func:`evaluate_model` computes for ``loaded``: ``metrics``, or the data's defaults for ``None``
    (``accuracy`` dropped for an unconditional model), checked against the model's data and ``num``.

    Raises:
        ConfigError: a metric that does not fit the data, too few samples, or ``accuracy`` alone on an
            unconditional model.
    """
    from simdiff.eval import check_metrics, default_metrics

    data_name = loaded.config.data.name
    metrics = tuple(default_metrics(loaded.image_shape, data_name)) if metrics is None else tuple(metrics)
    if loaded.num_classes == 0:
        if metrics == ("accuracy",):
            raise ConfigError("metric 'accuracy' scores the requested classes; this model is unconditional")
        metrics = tuple(m for m in metrics if m != "accuracy")
    check_metrics(metrics, loaded.image_shape, data_name, num=num)
    return metrics


def evaluate_model(
    loaded: LoadedModel,
    sample_cfg: SampleConfig,
    *,
    num: int = 1000,
    metrics: tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    logsnrs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sample ``num`` images from ``loaded`` and score them against the data set's test split (``logsnrs``: an
    explicit step grid for :func:`~simdiff.generate.generate`, e.g. a tuned one).

    ``metrics=None`` picks them from the data (``simdiff.eval.default_metrics``: MNIST-classifier metrics for 28x28
    grey digits, FID / KID / precision-recall otherwise); explicit ones that do not fit the data are refused.
    """
    from simdiff.eval import evaluate_samples

    data_name = loaded.config.data.name
    metrics = model_metrics(loaded, metrics, num=num)  # checked before any sampling
    labels = torch.arange(num) % loaded.num_classes if loaded.num_classes > 0 else None
    check_sample_config(sample_cfg)
    scores: dict[str, float] = {}
    if "bpd" in metrics:  # a likelihood of real test images: no samples needed
        from simdiff.eval.likelihood import bpd_metric

        scores = bpd_metric(loaded, num=min(num, 256), device=device)
        metrics = tuple(m for m in metrics if m != "bpd")
        if not metrics:
            return scores
    x = generate(loaded.model, loaded.schedule, loaded.image_shape, sample_cfg, num=num, labels=labels,
                 num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes), device=device,
                 progress=progress, process=loaded.process, logsnrs=logsnrs)
    ref, key = reference_images(loaded.config, max(num, 1000))
    from simdiff.eval.evaluate import classifier_for

    domain = classifier_for(loaded.image_shape, data_name) or "mnist"
    return {**evaluate_samples(x, ref, metrics=metrics, labels=labels, reference_key=key, progress=progress,
                               device=device, classifier=domain), **scores}
