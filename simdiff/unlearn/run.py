"""Unlearning runs: the original model (a simdiff run) + forget / retain sets + a method -> an unlearned run.

``simdiff unlearn --method NAME --teacher RUN --forget FILE --retain FILE --run-dir OUT`` calls :func:`unlearn`.
The original is loaded with :func:`simdiff.runs.load_model` (EMA weights, frozen); the student is a copy of it and
is fine-tuned by :class:`simdiff.train.Trainer` with the method's loss object, so exact resume, atomic checkpoints,
the EMA, the non-finite guard and the metrics log work as in every other run. The output directory is an ordinary
run of kind ``diffusion`` (``simdiff sample OUT`` loads it like the original), whose checkpoints also record
``unlearn`` (method, settings, the forget / retain sets and the original's path) for :mod:`simdiff.eval.unlearning`.

The forget and retain pools (the original model's samples of each set, or the sets' own images) are written once to
``OUT/unlearn_pools.safetensors`` and read back on resume, so a resumed run trains on the same pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simdiff.configuration import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from simdiff.generate import SampleConfig, check_sample_config, generate
from simdiff.train import TrainConfig, Trainer, refuse_init_from, rundir, validate_train_config
from simdiff.unlearn.losses import SalUn, UnlearnLoss, method_class
from simdiff.unlearn.sets import ConceptSet, PairedPools, Pool, make_pool, read_concept_set

__all__ = ["UnlearnConfig", "load_unlearn_config", "unlearn", "build_unlearn_loss", "model_conditioner",
           "concept_samples", "concept_grid", "POOL_FILE", "DEFAULT_TRAIN"]

POOL_FILE = "unlearn_pools.safetensors"
#: a short fine-tune from converged weights: no warm-up, constant lr, no EMA (set train.ema_half_life_images to
#: keep one), a checkpoint every 50 steps.
DEFAULT_TRAIN = TrainConfig(steps=200, batch_size=16, ema_half_life_images=0.0, checkpoint_every=50, keep_last=2,
                            log_every=10, sample_every=0,
                            optim=dataclasses.replace(TrainConfig().optim, lr=1e-4, warmup_steps=0))


@dataclass(frozen=True)
class UnlearnConfig:
    """One unlearning run (validated with ``configuration.from_dict``).

    Attributes:
        method: a name of :data:`simdiff.unlearn.METHODS` (``esd``, ``ascent``, ``graddiff``, ``salun``,
            ``ablation`` and each with ``_ip``).
        teacher: the original run / checkpoint / export. forget, retain: set files (:mod:`simdiff.unlearn.sets`).
        anchor: concept ablation's anchor for every forget key when the forget file names none (a prompt, or a
            class index as text; empty: the unconditional input).
        method_params: keyword options of the method's loss (``eta``, ``preserve``, ``retain_weight``,
            ``mask_fraction``, ``weighting``); ``preserve`` defaults to 1 for ``_ip`` methods and 0 otherwise.
        pool_size: images generated per set when a set has no images.
        pool_sample: the sampler of the pools (default: the original run's sampler settings, eta 0).
        train: the trainer config (``train.steps``: optimiser steps; the update budget).
    """

    name: str = "unlearn"
    method: str = "esd"
    teacher: str = ""
    forget: str = ""
    retain: str = ""
    anchor: str = ""
    method_params: dict[str, Any] = field(default_factory=dict)
    pool_size: int = 256
    pool_sample: SampleConfig | None = None
    train: TrainConfig = DEFAULT_TRAIN


def _content(entry):
    """A run record entry without the set file's path: a set moved or rewritten elsewhere with the same content
    is the same set."""
    return {k: v for k, v in entry.items() if k != "source"} if isinstance(entry, dict) else entry


def load_unlearn_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> UnlearnConfig:
    """YAML file (or defaults) + ``a.b=value`` overrides -> validated :class:`UnlearnConfig`."""
    data = apply_overrides(load_yaml(path) if path is not None else {}, list(overrides))
    base = to_dict(DEFAULT_TRAIN)
    merged = {**base, **(data.get("train") or {})}
    merged["optim"] = {**base["optim"], **((data.get("train") or {}).get("optim") or {})}
    data = {**data, "train": merged}
    cfg = from_dict(UnlearnConfig, data)
    method_class(cfg.method)
    validate_train_config(cfg.train)
    if cfg.pool_sample is not None:
        check_sample_config(cfg.pool_sample, where="pool_sample")
    if isinstance(cfg.pool_size, bool) or cfg.pool_size < 1:
        raise ConfigError(f"pool_size must be an integer >= 1, got {cfg.pool_size}")
    return cfg


def model_conditioner(loaded, *, device: torch.device | str = "cpu"):
    """``(conditioner, is_text)`` of a loaded model: the recorded text encoder for a text model, else
    :class:`~simdiff.conditioners.ClassLabels`. An unconditional model has nothing to forget by prompt or label."""
    from simdiff.runs import conditioner_for

    if loaded.config.model.arch == "text_uvit":
        from simdiff.text_prompts import conditioner_from_meta

        return conditioner_from_meta(loaded.meta, device=device), True
    if loaded.num_classes <= 0:
        raise ConfigError("unlearning needs a class-conditional or text-conditioned model; this one is unconditional")
    return conditioner_for(loaded.num_classes), False


_PARAMS = {"eta", "preserve", "retain_weight", "mask_fraction", "weighting", "mask_seed"}


def build_unlearn_loss(method: str, student: torch.nn.Module, teacher, schedule, *, null_cond: dict[str, Any],
                       params: dict[str, Any] | None = None, mask_batch: dict[str, torch.Tensor] | None = None
                       ) -> UnlearnLoss:
    """The loss object of ``method`` (``_ip``: ``preserve`` defaults to 1). Unknown ``params`` are a one-line
    ConfigError naming the valid ones for the method."""
    import inspect

    cls, ip = method_class(method)
    params = dict(params or {})
    allowed = {"preserve", "weighting"} | {n for n, p in inspect.signature(cls.__init__).parameters.items()
                                           if p.kind is p.KEYWORD_ONLY} & _PARAMS
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"unknown method_params {unknown} for {method!r}; valid: {', '.join(sorted(allowed))}")
    params.setdefault("preserve", 1.0 if ip else 0.0)
    if cls is SalUn:
        params["mask_batch"] = mask_batch
    return cls(student, teacher, schedule, null_cond=null_cond, **params)


def _pool_sample_config(cfg: UnlearnConfig, loaded) -> SampleConfig:
    base = cfg.pool_sample or loaded.config.sample
    return dataclasses.replace(base, eta=0.0, seed=int(cfg.train.seed))


def _generator(loaded, conditioner, sample_cfg: SampleConfig, device):
    def gen(cond: dict[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(cond.values())).shape[0]
        scfg = dataclasses.replace(sample_cfg, num=n)
        return generate(loaded.model, loaded.schedule, loaded.image_shape, scfg, cond=cond, conditioner=conditioner,
                        device=device, process=loaded.process)

    return gen


def _pool_identity(cfg: UnlearnConfig, forget: ConceptSet, retain: ConceptSet, *, anchor_images: bool) -> str:
    """What the pools are made of (sets, anchors, original, size, sampler); stored in the pool file's metadata."""
    return json.dumps({"forget": forget.to_record(), "retain": retain.to_record(), "teacher": str(Path(cfg.teacher)
                       .resolve()), "pool_size": cfg.pool_size, "anchor_images": anchor_images,
                       "pool_sample": None if cfg.pool_sample is None else to_dict(cfg.pool_sample),
                       "seed": cfg.train.seed}, sort_keys=True)


def _pools(cfg: UnlearnConfig, loaded, conditioner, forget: ConceptSet, retain: ConceptSet, run_dir: Path, device,
           *, anchor_images: bool) -> tuple[Pool, Pool]:
    """The forget / retain pools: read back from ``run_dir`` when they were made from the same sets, original and
    settings (a resume), else generated and written atomically."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / POOL_FILE
    ident = _pool_identity(cfg, forget, retain, anchor_images=anchor_images)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as fh:
                same = (fh.metadata() or {}).get("identity") == ident
        except Exception:  # a damaged pool file is made again
            same = False
        if same:
            d = load_file(str(path))
            return Pool.from_tensors(d, "f_"), Pool.from_tensors(d, "r_")
    gen = _generator(loaded, conditioner, _pool_sample_config(cfg, loaded), device)
    if anchor_images and forget.images is None:  # concept ablation trains on the anchor's images
        fpool = _anchor_pool(forget, conditioner, cfg.pool_size, gen)
    else:
        fpool = make_pool(forget, conditioner, cfg.pool_size, generate_fn=gen, anchors=True)
    rpool = make_pool(retain, conditioner, cfg.pool_size, generate_fn=gen)
    tensors = {k: v.contiguous() for k, v in {**fpool.tensors("f_"), **rpool.tensors("r_")}.items()}
    tmp = path.with_suffix(".tmp")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"identity": ident})
        tmp.replace(path)
    except OSError as e:
        raise rundir.write_error(e, run_dir=run_dir, what="the unlearning pools", path=path) from None
    return fpool, rpool


def _anchor_pool(forget: ConceptSet, conditioner, size: int, gen) -> Pool:
    pool = make_pool(forget, conditioner, size, generate_fn=lambda c: torch.zeros(1), anchors=True)
    return Pool(gen(pool.anchor).float().cpu(), pool.cond, pool.anchor)


def unlearn(cfg: UnlearnConfig, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Unlearn ``cfg.forget`` from ``cfg.teacher`` with ``cfg.method`` into ``run_dir``; returns the trainer's summary.

    Raises:
        ConfigError / CheckpointError: one line for a bad method, set file, teacher or setting.
    """
    from simdiff.train import distributed as D

    method_class(cfg.method)
    validate_train_config(cfg.train)
    refuse_init_from(cfg.train, "unlearning (it fine-tunes a copy of its teacher)")
    for what in ("teacher", "forget", "retain"):
        if not getattr(cfg, what):
            raise ConfigError(f"unlearn needs --{what}")
    for what in ("forget", "retain"):
        if not Path(getattr(cfg, what)).is_file():
            raise ConfigError(f"{getattr(cfg, what)}: no such {what} set file")
    info = D.init_distributed(cfg.train.device)
    run_dir = Path(run_dir)
    return rundir.owned_run(run_dir, lambda: _unlearn_locked(cfg, run_dir, info, resume=resume), rank=info.rank)


def _load_original(path: str, device):
    from simdiff.runs import load_model
    from simdiff.train import CheckpointError

    try:
        loaded = load_model(path, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"teacher: {e}") from None
    if loaded.meta.get("kind", "diffusion") != "diffusion":
        raise CheckpointError(f"teacher: {path} is a distilled {loaded.meta.get('kind')!r} student; unlearning needs "
                              "a diffusion model")
    if loaded.process is not None:
        raise ConfigError(f"unlearning is implemented for the isotropic Gaussian process; the teacher uses "
                          f"{loaded.process.to_dict()}")
    return loaded


def _unlearn_locked(cfg: UnlearnConfig, run_dir: Path, info, *, resume: bool) -> dict[str, Any]:
    from simdiff.experiment import network_differences

    device = info.device
    loaded = _load_original(cfg.teacher, device)
    conditioner, text = model_conditioner(loaded, device=device)
    forget = read_concept_set(cfg.forget, text=text, image_shape=loaded.image_shape)
    retain = read_concept_set(cfg.retain, text=text, image_shape=loaded.image_shape)
    if cfg.anchor and not forget.anchors:
        forget.anchors = [cfg.anchor if text else _int(cfg.anchor)]
    forget.check(text=text, num_classes=loaded.num_classes, what="forget")
    retain.check(text=text, num_classes=loaded.num_classes, what="retain")
    cls, _ = method_class(cfg.method)
    fpool, rpool = _pools(cfg, loaded, conditioner, forget, retain, run_dir, device,
                          anchor_images=cls.name == "ablation")
    student = copy.deepcopy(loaded.model).train().requires_grad_(True).to(device)
    mask_batch = None
    if cls is SalUn:
        n = min(len(fpool), 64)
        mask_batch = {k: v[:n].to(device) for k, v in {**fpool.tensors("f_")}.items()}
    null_cond = conditioner.null(1, device="cpu")
    loss = build_unlearn_loss(cfg.method, student, loaded.model, loaded.schedule, null_cond=null_cond,
                              params=cfg.method_params, mask_batch=mask_batch)
    data_set = PairedPools(fpool, rpool)
    from simdiff.train import BatchIterator

    data = BatchIterator(data_set, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                         world_size=info.world_size)
    exp = dataclasses.replace(loaded.config, name=cfg.name)
    record = {"method": cfg.method, "loss": loss.describe(), "teacher": str(Path(cfg.teacher).resolve()),
              "forget": forget.to_record(), "retain": retain.to_record(), "pool_size": cfg.pool_size,
              "text": text, "config": to_dict(cfg)}
    config_dict = {"kind": "diffusion", "experiment": to_dict(exp), "image_shape": list(loaded.image_shape),
                   "num_classes": loaded.num_classes, "conditioner": conditioner.identity(), "unlearn": record}

    def on_resume(ck) -> None:
        if ck is not None:
            saved = ck.state.get("config") or {}
            diffs = network_differences(saved, config_dict)
            before = saved.get("unlearn") or {}
            diffs += [f"{k}: {before.get(k)!r} -> {record[k]!r}" for k in ("method", "teacher", "forget", "retain")
                      if k in before and _content(before[k]) != _content(record[k])]
            if diffs:
                raise ConfigError(f"{run_dir}: cannot resume from {ck.path.name}, it was unlearned with other "
                                  f"settings ({'; '.join(diffs)}); unlearn into a new --run-dir")
        if info.rank == 0:
            rundir.write_run_yaml(run_dir, "unlearn.yaml", to_dict(cfg))

    trainer = Trainer(student, loss, data, cfg.train, run_dir, config_dict=config_dict, resume=resume,
                      on_resume=on_resume)
    summary = trainer.fit()
    summary["method"] = cfg.method
    if isinstance(loss, SalUn):
        summary["mask_density"] = loss.mask_density()
    if info.rank == 0:
        student.eval()
        if trainer.ema is not None:
            trainer.ema.copy_to(student)
        out = run_dir / "samples" / "final.png"
        try:
            summary["sample_grid"] = str(concept_grid(student, loaded, conditioner, forget.keys, retain.keys, out,
                                                      device=device))
        except OSError as e:
            raise rundir.write_error(e, run_dir=run_dir, what="the final sample grid", path=out) from None
    return summary


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--anchor: a class-conditional model needs a class index, got {text!r}") from None


def concept_samples(model, loaded, conditioner, keys, *, per_key: int = 4, device="cpu",
                    sample_cfg: SampleConfig | None = None) -> torch.Tensor:
    """``per_key`` samples of each key (key-major) through the run's sampler with ``eta = 0`` and its seed, so two
    models give pairs from the same starting noise."""
    from simdiff.unlearn.sets import encode_keys

    cond = encode_keys(conditioner, [k for k in keys for _ in range(per_key)])
    scfg = dataclasses.replace(sample_cfg or loaded.config.sample, num=len(keys) * per_key, eta=0.0)
    return generate(model, loaded.schedule, loaded.image_shape, scfg, cond=cond, conditioner=conditioner,
                    device=device, process=loaded.process)


def concept_grid(model, loaded, conditioner, forget_keys, retain_keys, out: str | Path, *, per_key: int = 4,
                 max_keys: int = 4, device="cpu", sample_cfg: SampleConfig | None = None) -> Path:
    """A PNG grid: one row per key (up to ``max_keys`` forget keys, then retain keys), ``per_key`` samples each."""
    from simdiff.images import save_grid

    keys = list(forget_keys)[:max_keys] + list(retain_keys)[:max_keys]
    x = concept_samples(model, loaded, conditioner, keys, per_key=per_key, device=device, sample_cfg=sample_cfg)
    return save_grid(x, out, nrow=per_key, scale=max(1, 64 // loaded.image_shape[-1]))
