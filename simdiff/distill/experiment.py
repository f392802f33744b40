"""Distillation runs: a trained simdiff teacher + a distillation loss object -> a few-step student, via the Trainer.

``simdiff distill --method NAME --teacher RUN [--student-steps K] CONFIG`` calls :func:`distill`. The teacher is
loaded with :func:`simdiff.runs.load_model` (EMA weights, frozen); the student is a copy of the teacher network
(students start from the teacher in all of Salimans & Ho 2022, Meng et al. 2023, Heek et al. 2024, Salimans et al.
2024 and Xie et al. 2024), wrapped where the method needs it:

* ``guided`` (Meng et al. 2023, stage one): :class:`~simdiff.nets.students.GuidanceConditioned` adds a Fourier
  embedding of the guidance weight ``w`` to the network's log-SNR embedding, zero-initialised so the student starts
  as the teacher;
* ``guided_progressive`` (Meng et al. 2023, stage two): progressive distillation of a *guided* student (the teacher
  must be a run of kind ``guided`` or ``guided_progressive``), ``w`` kept as an input; the student is a copy of the
  w-conditioned teacher, ``w_min``/``w_max`` default to the stage-one run's;
* ``em`` (EMD, Xie et al. 2024): :class:`~simdiff.nets.students.DenoiserGenerator` ``g(z) = x_hat(z, lambda*)``;
  its score network is another copy of the teacher;
* ``moment_matching``: its auxiliary denoiser is another copy of the teacher (the loss object's default).

Checkpoints record ``kind = <method>``, the teacher's experiment config (with ``sample`` set to the student's
sampler, so ``simdiff sample RUN`` uses it by default), ``image_shape``, ``num_classes``, ``sampler_spec`` (from
``loss.sampler_spec()``, refreshed at every checkpoint since progressive rounds change it) and ``student`` (how to
rewrap the rebuilt network, :func:`~simdiff.nets.students.wrap_student`). Loss-owned state (moment matching's and
EMD's auxiliary networks with their Adam state, a progressive round's teacher, a consistency EMA target) goes into
every trainer checkpoint (``aux.safetensors``) through the loss object's ``aux_state_dict`` /
``load_aux_state_dict``, so a resume from any checkpoint continues bit for bit.

``student_steps`` (``--student-steps``) is the student's sampling step count; ``train.steps`` counts optimiser
steps. The former spelling ``steps`` of the former is refused with a hint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simdiff.configuration import ConfigError, apply_overrides, from_dict, get_registered, load_yaml, to_dict
from simdiff.data import DataConfig
from simdiff.distill.consistency import MultistepConsistency
from simdiff.distill.em import EMDistillation
from simdiff.distill.guided import GuidanceDistillation, GuidedProgressiveDistillation
from simdiff.distill.moment_matching import MomentMatching
from simdiff.distill.progressive import ProgressiveDistillation, ProgressiveSchedule
from simdiff.generate import SampleConfig, check_sample_config
from simdiff.nets.students import GuidanceConditioned, wrap_student
from simdiff.runs import conditioner_for, student_sample_config
from simdiff.train import TrainConfig, Trainer, refuse_init_from, rundir, validate_train_config

__all__ = ["DistillConfig", "METHODS", "TEACHER_KINDS", "GuidanceConditioned", "load_distill_config", "distill",
           "build_loss", "wrap_student"]

#: method name -> loss class.
METHODS: dict[str, type] = {
    "progressive": ProgressiveDistillation,
    "guided": GuidanceDistillation,
    "consistency": MultistepConsistency,
    "moment_matching": MomentMatching,
    "em": EMDistillation,
    "guided_progressive": GuidedProgressiveDistillation,
}
#: method -> the checkpoint kinds it accepts as a teacher (default: a diffusion model).
TEACHER_KINDS: dict[str, tuple[str, ...]] = {"guided_progressive": ("guided", "guided_progressive"),
                                             "progressive": ("diffusion", "progressive")}
#: constructor arguments the glue sets itself (not allowed in ``method_params``).
_GLUE_SET = {"student_steps", "curriculum", "segments", "steps", "sample_steps", "score_net", "aux", "param_teacher"}
#: extra ``method_params`` the glue understands per method.
_GLUE_PARAMS = {"progressive": {"start_steps", "steps_per_round"}, "em": {"logsnr_star"},
                "guided_progressive": {"start_steps", "steps_per_round"}}
#: the one-line answer to the former spelling of ``student_steps``.
_RENAMED_STEPS = ("'steps' of a distillation is now 'student_steps' (--student-steps): the student's sampling steps; "
                  "train.steps counts optimiser steps")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run (``simdiff distill``; validated with ``configuration.from_dict``).

    Attributes:
        method: one of :data:`METHODS`. teacher: run dir / checkpoint dir / exported ``.safetensors``.
        student_steps: the student's sampling steps (progressive, guided_progressive: the *final* count; the rounds
            halve from ``method_params.start_steps``, default ``2 * student_steps``, every
            ``method_params.steps_per_round`` trainer steps, default ``train.steps // rounds``). consistency: the
            segment count K; em: must be 1.
        method_params: keyword options of the method's loss class (unknown keys are an error naming them).
        train: the trainer config (the student is the trained model; ``train.steps`` counts optimiser steps).
        data: default: the teacher's data config.
        sample: ``num``/``seed``/``batch_size``/``guidance`` of the final grid (sampler/steps/grid come from the
            method's sampler spec).
    """

    name: str = "distill"
    method: str = "progressive"
    teacher: str = ""
    student_steps: int = 4
    method_params: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig | None = None
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(num=64))


def load_distill_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """YAML file (or defaults) + ``a.b=value`` overrides -> validated :class:`DistillConfig`.

    Raises:
        ConfigError: one line; a top-level ``steps`` (the former name of ``student_steps``) is refused with a hint.
    """
    data = apply_overrides(load_yaml(path) if path is not None else {}, list(overrides))
    if "steps" in data:
        raise ConfigError(_RENAMED_STEPS)
    cfg = from_dict(DistillConfig, data)
    check_sample_config(cfg.sample, where="sample")  # a bad sample.* is found before any training
    return cfg


def _check_params(method: str, params: dict[str, Any]) -> None:
    cls = METHODS[method]
    sig = inspect.signature(cls.__init__)
    allowed = {n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY} - _GLUE_SET
    allowed |= _GLUE_PARAMS.get(method, set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"unknown method_params {unknown} for method {method!r}; valid: {', '.join(sorted(allowed))}")


def _progressive_curriculum(cfg: DistillConfig) -> ProgressiveSchedule:
    start = cfg.method_params.get("start_steps", 2 * cfg.student_steps)
    ratio = start // cfg.student_steps if isinstance(start, int) and cfg.student_steps >= 1 else 0
    rounds = max(ratio.bit_length() - 1, 1)
    per_round = cfg.method_params.get("steps_per_round", max(cfg.train.steps // rounds, 1))
    sched = ProgressiveSchedule(start_steps=start, end_steps=cfg.student_steps, steps_per_round=per_round)
    need = (sched.num_rounds - 1) * per_round
    if cfg.train.steps <= need:
        raise ConfigError(f"progressive: train.steps={cfg.train.steps} never reaches the last of {sched.num_rounds} "
                          f"rounds (steps_per_round={per_round}); need train.steps > {need}")
    return sched


def build_loss(cfg: DistillConfig, student: nn.Module, teacher: nn.Module, schedule, num_classes: int):
    """The method's loss object for ``student`` (a module the trainer will train) and the frozen ``teacher``."""
    method = cfg.method
    _check_params(method, cfg.method_params)
    params = {k: v for k, v in cfg.method_params.items() if k not in _GLUE_PARAMS.get(method, set())}
    null = dict(conditioner_for(num_classes).null_cond)
    if method == "progressive":
        return ProgressiveDistillation(student, teacher, schedule, curriculum=_progressive_curriculum(cfg), **params)
    if method == "guided":
        if num_classes == 0:
            raise ConfigError("guided distillation needs a class-conditional teacher (this one has num_classes = 0)")
        params.setdefault("null_cond", null)
        return GuidanceDistillation(student, teacher, schedule, sample_steps=cfg.student_steps, **params)
    if method == "consistency":
        return MultistepConsistency(student, teacher, schedule, segments=cfg.student_steps, **params)
    if method == "moment_matching":
        if params.get("guidance_weight", 0.0) != 0.0:
            if num_classes == 0:
                raise ConfigError("moment_matching guidance_weight needs a class-conditional teacher")
            params.setdefault("null_cond", null)
        extra = {"param_teacher": teacher} if params.get("variant") == "parameter" else {}
        return MomentMatching(student, teacher, schedule, steps=cfg.student_steps, **extra, **params)
    if method == "guided_progressive":
        if not getattr(teacher, "guidance_input", False):
            raise ConfigError("guided_progressive needs a w-conditioned teacher (a 'guided' student)")
        return GuidedProgressiveDistillation(student, teacher, schedule, curriculum=_progressive_curriculum(cfg),
                                             **params)
    if cfg.student_steps != 1:
        raise ConfigError(f"em distils a one-step generator: student_steps must be 1, got {cfg.student_steps}")
    return EMDistillation(student, teacher, schedule, **params)


def _make_student(cfg: DistillConfig, teacher_net: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    net = copy.deepcopy(teacher_net).train().requires_grad_(True)
    if cfg.method == "guided_progressive":  # the teacher is already w-conditioned: copy it as it is
        return net, {"wrapper": "guidance"}
    if cfg.method == "guided":
        info: dict[str, Any] = {"wrapper": "guidance"}
    elif cfg.method == "em":
        info = {"wrapper": "generator", "logsnr_star": float(cfg.method_params.get("logsnr_star", 0.0))}
        if not math.isfinite(info["logsnr_star"]):
            raise ConfigError(f"em: logsnr_star must be finite, got {info['logsnr_star']}")
    else:
        info = {"wrapper": "none"}
    return wrap_student(net, info), info


def _record_sampler_spec(config_dict: dict[str, Any], spec: dict[str, Any], base: SampleConfig) -> None:
    """Write the student's sampler spec (and the sample config it implies) into a checkpoint config dict."""
    config_dict["sampler_spec"] = spec
    config_dict["experiment"] = {**config_dict["experiment"], "sample": to_dict(student_sample_config(spec, base))}


class _DistillTrainer(Trainer):
    """The trainer, with the loss object's current sampler spec recorded in every checkpoint it writes (a
    progressive round changes the student's step count)."""

    def __init__(self, *args: Any, sample_base: SampleConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_base = sample_base

    def save(self):
        _record_sampler_spec(self.config_dict, self.loss_fn.sampler_spec(), self.sample_base)
        return super().save()


def _load_teacher(path: str, device: torch.device, kinds: tuple[str, ...] = ("diffusion",)):
    from simdiff.runs import load_model
    from simdiff.train import CheckpointError

    if not path:
        raise ConfigError("distill needs a teacher (--teacher RUN_DIR | CHECKPOINT | FILE.safetensors)")
    try:
        loaded = load_model(path, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"teacher: {e}") from None
    kind = loaded.meta.get("kind", "diffusion")
    if kind not in kinds:
        if kinds[0] == "diffusion":
            also = f" or a {' / '.join(kinds[1:])} student" if len(kinds) > 1 else ""
            raise CheckpointError(f"teacher: {path} is a distilled {kind!r} student; this method needs a simdiff "
                                  f"diffusion model{also}")
        raise CheckpointError(f"teacher: {path} is of kind {kind!r}; this method needs one of: {', '.join(kinds)}")
    return loaded


def _continue_progressive(cfg: DistillConfig, meta: dict[str, Any]) -> DistillConfig:
    """A progressive run whose teacher is itself a progressive student (distilled for ``N`` steps) continues the
    halving from that student: the first round distils its ``N`` steps (``start_steps`` defaults to ``N``)."""
    if meta.get("kind") not in ("progressive", "guided_progressive"):
        return cfg
    n = int((meta.get("sampler_spec") or {}).get("steps", 0))
    start = cfg.method_params.get("start_steps", n)
    if start != n:
        raise ConfigError(f"{cfg.method}: the teacher is a progressive student for {n} steps, so start_steps must be "
                          f"{n} (got {start})")
    return dataclasses.replace(cfg, method_params={**cfg.method_params, "start_steps": n})


def distill(cfg: DistillConfig, run_dir: str | Path, *, resume: bool = True) -> dict[str, Any]:
    """Distil ``cfg.teacher`` with ``cfg.method`` into ``run_dir``; returns the trainer's summary (+ ``sample_grid``).

    Raises:
        ConfigError / CheckpointError / ValueError: one-line messages for a bad teacher, method or step count.
    """
    from simdiff.train import distributed as D

    get_registered(METHODS, cfg.method, "distillation method")
    _check_params(cfg.method, cfg.method_params)
    if isinstance(cfg.student_steps, bool) or cfg.student_steps < 1:
        raise ConfigError(f"student_steps must be an integer >= 1, got {cfg.student_steps}")
    validate_train_config(cfg.train)
    refuse_init_from(cfg.train, "distillation (the student starts from its teacher)")
    check_sample_config(cfg.sample, where="sample")
    info = D.init_distributed(cfg.train.device)
    validate_train_config(cfg.train, info.world_size)
    run_dir = Path(run_dir)
    return rundir.owned_run(run_dir, lambda: _distill_locked(cfg, run_dir, info, resume=resume), rank=info.rank)


def _distill_locked(cfg: DistillConfig, run_dir: Path, info, *, resume: bool) -> dict[str, Any]:
    """:func:`distill` once the run directory is owned (rank 0) and the options are checked."""
    from simdiff.data import build_dataset
    from simdiff.experiment import network_differences
    from simdiff.runs import batch_transform, sample_grid
    from simdiff.train import BatchIterator

    teacher = _load_teacher(cfg.teacher, info.device, TEACHER_KINDS.get(cfg.method, ("diffusion",)))
    if teacher.process is not None:
        raise ConfigError(f"{cfg.method}: distillation is implemented for the isotropic Gaussian process; the teacher "
                          f"uses process {teacher.process.to_dict()}")
    if cfg.method == "guided_progressive":  # keep the stage-one guidance range unless overridden
        stage_one = (teacher.meta.get("distill") or {}).get("method_params") or {}
        inherited = {k: stage_one[k] for k in ("w_min", "w_max") if k in stage_one}
        cfg = dataclasses.replace(cfg, method_params={**inherited, **cfg.method_params})
    cfg = _continue_progressive(cfg, teacher.meta)
    student, student_info = _make_student(cfg, teacher.model)
    student.to(info.device)
    loss = build_loss(cfg, student, teacher.model, teacher.schedule, teacher.num_classes)
    data_cfg = cfg.data if cfg.data is not None else teacher.config.data
    dataset = build_dataset(data_cfg)
    if dataset.shape != teacher.image_shape:
        raise ConfigError(f"data images have shape {dataset.shape} but the teacher was trained on "
                          f"{teacher.image_shape}")
    exp = dataclasses.replace(teacher.config, name=cfg.name, data=data_cfg, train=cfg.train)
    config_dict = {"kind": cfg.method, "experiment": to_dict(exp), "image_shape": list(teacher.image_shape),
                   "num_classes": teacher.num_classes, "student": student_info, "distill": to_dict(cfg),
                   "teacher_kind": teacher.meta.get("kind", "diffusion"),
                   "conditioner": conditioner_for(teacher.num_classes).identity()}
    _record_sampler_spec(config_dict, loss.sampler_spec(), cfg.sample)
    data = BatchIterator(dataset, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                         transform=batch_transform(dataset, labels=teacher.num_classes > 0))

    def on_resume(ck) -> None:  # after the checkpoint is read, before anything is written
        if ck is not None:
            diffs = network_differences(ck.state.get("config") or {}, config_dict)
            if diffs:
                raise ConfigError(f"{run_dir}: cannot resume from {ck.path.name}, it was distilled with another "
                                  f"network ({'; '.join(diffs)}); distil into a new --run-dir")
        if info.rank == 0:
            rundir.write_run_yaml(run_dir, "distill.yaml", to_dict(cfg))

    trainer = _DistillTrainer(student, loss, data, cfg.train, run_dir, config_dict=config_dict, resume=resume,
                              sample_base=cfg.sample, on_resume=on_resume)
    summary = trainer.fit()
    summary["sampler_spec"] = loss.sampler_spec()
    if info.rank == 0:
        student.eval()
        if trainer.ema is not None:
            trainer.ema.copy_to(student)
        scfg = student_sample_config(loss.sampler_spec(), cfg.sample)
        out = run_dir / "samples" / "final.png"
        try:
            path = sample_grid(student, teacher.schedule, scfg, image_shape=teacher.image_shape,
                               num_classes=teacher.num_classes, out=out, device=info.device)
        except OSError as e:
            raise rundir.write_error(e, run_dir=run_dir, what="the final sample grid", path=out) from None
        summary["sample_grid"] = str(path)
    return summary
