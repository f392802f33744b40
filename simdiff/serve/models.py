"""The models a ``simdiff serve`` page may sample, and the checking of one sample request against them.

A model is chosen by its id, never by a path: the server holds a fixed list of :class:`ModelEntry` built at start
from the shipped model and the sources named on the command line (:func:`build_entries`), and a request naming
anything else is answered "unknown model". Every request parameter is checked here, with one message that names it
(:class:`ParamError`), before a job is queued.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simdiff.configuration import ConfigError, to_dict
from simdiff.generate import SampleConfig, sample_field_problem
from simdiff.runs import LoadedModel, check_student_sampling, load_model, student_sample_config
from simdiff.samplers import check_process, nfe
from simdiff.train.checkpoint import CheckpointError

__all__ = ["PRETRAINED", "ModelEntry", "ParamError", "SampleRequest", "Limits", "build_entries", "make_entry",
           "parse_request", "PARAMS"]

from simdiff.shipped import PRETRAINED, resolve_source  # noqa: E402

#: the parameters a sample request may carry (anything else is refused, so no path ever reaches the filesystem).
PARAMS = ("model", "labels", "sampler", "steps", "grid", "guidance", "interval", "seed", "num")
#: step-distilled students sample only with these (recorded in their ``sampler_spec``).
LOCKED = ("sampler", "steps", "grid")


class ParamError(ValueError):
    """A request parameter that cannot be sampled: ``param`` is its name, the message one line naming it."""

    def __init__(self, param: str | None, message: str, *, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: images per request, sampler steps, waiting requests per model."""

    max_images: int = 64
    max_steps: int = 1000
    max_queue: int = 4


@dataclass
class ModelEntry:
    """One model the page offers: its id (what requests name), a display name, where it came from, the model."""

    id: str
    name: str
    loaded: LoadedModel
    source: str = ""

    @property
    def kind(self) -> str:
        return str(self.loaded.meta.get("kind", "diffusion"))

    @property
    def discrete(self) -> bool:
        from simdiff.processes import is_discrete

        return bool(is_discrete(self.loaded.process))

    def locked(self) -> dict[str, Any] | None:
        """The sampler, steps and grid a step-distilled student is fixed to (``None``: any sampler may run it)."""
        spec = self.loaded.meta.get("sampler_spec") or {}
        if self.kind == "diffusion" or "sampler" not in spec or "steps" not in spec:
            return None
        cfg = student_sample_config(spec, self.loaded.config.sample)
        try:  # a student whose kind accepts any sampler (guided stage one) is not locked
            check_student_sampling(self.loaded.meta, dataclasses.replace(cfg, sampler="ddim", steps=cfg.steps + 1))
            return None
        except ConfigError:
            return {"sampler": cfg.sampler, "steps": cfg.steps, "grid": cfg.grid}

    def defaults(self) -> dict[str, Any]:
        """The values the page starts from: the model's own sampling settings (a student's recorded ones)."""
        s = self.loaded.config.sample
        c = self.loaded.num_classes
        out = {"sampler": s.sampler, "steps": s.steps, "grid": s.grid, "guidance": s.guidance,
               "interval": list(s.interval) if s.interval is not None else None, "seed": s.seed,
               "num": c if 0 < c <= 16 else 16}
        locked = self.locked()
        if locked:
            out.update(locked, guidance=0.0, interval=None)
        return out

    def info(self) -> dict[str, Any]:
        """What ``GET /api/models`` says about this model."""
        lm = self.loaded
        doc = {"id": self.id, "name": self.name, "kind": self.kind, "num_classes": lm.num_classes,
               "class_conditional": lm.num_classes > 0, "image_shape": list(lm.image_shape),
               "parameters": sum(p.numel() for p in lm.model.parameters()), "data": lm.config.data.name,
               "arch": lm.config.model.arch, "discrete": self.discrete, "defaults": self.defaults(),
               "locked": self.locked(), "source": self.source}
        if self.kind != "diffusion":
            doc["sampler_spec"] = to_dict(lm.meta.get("sampler_spec"))
        return doc


def _check_image_model(loaded: LoadedModel, where: str) -> None:
    shape = tuple(loaded.image_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or hasattr(loaded.process, "preview"):
        raise ConfigError(f"{where}: not an image model (data shape {list(shape)}); simdiff serve samples models "
                          f"of grey or RGB images")


def make_entry(loaded: LoadedModel, *, id: str, name: str | None = None, source: str = "") -> ModelEntry:
    """A :class:`ModelEntry` for an already loaded model (refused, with one line, if it does not make images)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", id):
        raise ValueError(f"model id {id!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'")
    _check_image_model(loaded, id)
    return ModelEntry(id, name or id, loaded, source)


def _slug(path: Path) -> str:
    stem = path.stem if path.is_file() else path.name
    return re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-.") or "model"


#: shipped image models the page offers by default: short name -> label (the text-to-image model needs prompts).
SHIPPED_LABELS = {"pretrained": "shipped MNIST model", "pretrained-student": "shipped MNIST 4-step student",
                  "pretrained-fashion": "shipped Fashion-MNIST model"}


def build_entries(sources: list[str] | tuple[str, ...] = (), *, device: str | torch.device = "cpu",
                  pretrained: bool = True) -> list[ModelEntry]:
    """Load the shipped image models (ids ``pretrained``, ``pretrained-student``, ``pretrained-fashion``) when
    ``pretrained``, and every run directory, checkpoint directory or exported ``.safetensors`` file in ``sources``
    (a shipped short name names that shipped model). These are the only models a server built on them will sample.

    Raises:
        CheckpointError: a source that does not exist or is not a simdiff model.
        ConfigError: a source that is not an image model.
    """
    shipped_ids = {resolve_source(name).resolve(): name for name in SHIPPED_LABELS}
    wanted: list[tuple[str, Path]] = [(name, resolve_source(name)) for name in SHIPPED_LABELS] if pretrained else []
    seen = {p.resolve() for _, p in wanted}
    for s in sources:
        path = resolve_source(s)
        if not path.exists():
            raise CheckpointError(f"{s}: no such run directory, checkpoint or file")
        path = path.resolve()
        if path in seen:
            continue
        seen.add(path)
        ids = {i for i, _ in wanted}
        base = shipped_ids.get(path) or _slug(path)
        new, k = base, 2
        while new in ids:
            new, k = f"{base}-{k}", k + 1
        wanted.append((new, path))
    entries = []
    for id_, path in wanted:
        loaded = load_model(path, device=device)
        kind = loaded.meta.get("kind", "diffusion")
        label = SHIPPED_LABELS.get(shipped_ids.get(path.resolve(), ""), path.name)
        name = label if kind == "diffusion" else f"{label} (distilled: {kind})"
        entries.append(make_entry(loaded, id=id_, name=name, source=str(path)))
    return entries


@dataclass(frozen=True)
class SampleRequest:
    """A checked request: the model, the sampling settings, the labels (``[num]`` or ``None``), the grid columns,
    and the number of network calls it takes (the denominator of its progress)."""

    entry: ModelEntry
    cfg: SampleConfig
    labels: torch.Tensor | None
    nrow: int | None
    total_calls: int

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": self.entry.id, "sampler": c.sampler, "steps": c.steps, "grid": c.grid,
                "guidance": c.guidance, "interval": list(c.interval) if c.interval is not None else None,
                "seed": c.seed, "num": c.num, "labels": None if self.labels is None else self.labels.tolist()}


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _int(name: str, v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ParamError(name, f"{name} must be an integer, got {v!r}")


def _float(name: str, v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ParamError(name, f"{name} must be a number, got {v!r}")


def _check_field(name: str, value: Any) -> None:
    problem = sample_field_problem(name, value)
    if problem is not None:
        raise ParamError(name, f"{name} {problem}" if problem.startswith("must") else f"{name}: {problem}")


def _labels(v: Any, num: int, num_classes: int) -> tuple[torch.Tensor | None, int | None]:
    """Requested labels (a list of integers or ``"0,3,7"``; blank = every class in turn) cycled to ``num``, and the
    grid's columns (one per requested label when they tile the grid, else square)."""
    if num_classes == 0:
        if not _blank(v) and v != []:
            raise ParamError("labels", "labels: this model is unconditional (it has no classes); leave labels empty")
        return None, None
    if _blank(v) or v == []:
        values = list(range(num_classes))
    else:
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, list):
            raise ParamError("labels", f"labels must be a list of class numbers like 0,3,7, got {v!r}")
        values = [_int("labels", x) for x in items if not _blank(x)]
        if not values:
            values = list(range(num_classes))
    bad = [x for x in values if not 0 <= x < num_classes]
    if bad:
        raise ParamError("labels", f"labels: {bad[0]} is out of range; this model has classes 0..{num_classes - 1}")
    labels = torch.tensor(values).repeat(math.ceil(num / len(values)))[:num]
    nrow = len(values) if len(values) <= 16 and num % len(values) == 0 else None
    return labels, nrow


def parse_request(body: Any, entries: dict[str, ModelEntry], limits: Limits = Limits()) -> SampleRequest:
    """A sample request's JSON body -> :class:`SampleRequest`; blank values take the model's defaults.

    Raises:
        ParamError: the first parameter that is wrong (status 404 for a model id the server does not hold).
    """
    if not isinstance(body, dict):
        raise ParamError(None, "the request body must be a JSON object of sampling parameters")
    unknown = [k for k in body if k not in PARAMS]
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter {unknown[0]!r}: models are chosen by 'model' (an id from "
                                     f"/api/models), never by path; valid parameters: {', '.join(PARAMS)}")
    model_id = body.get("model")
    if _blank(model_id):
        raise ParamError("model", "model: required (an id from /api/models)")
    entry = entries.get(model_id) if isinstance(model_id, str) else None
    if entry is None:
        raise ParamError("model", f"model: unknown model {str(model_id)[:80]!r}; this server samples only "
                                  f"{', '.join(sorted(entries))}", status=404)
    d = entry.defaults()
    get = {k: (d[k] if _blank(body.get(k)) else body[k]) for k in ("sampler", "grid")}
    sampler, grid = get["sampler"], get["grid"]
    _check_field("sampler", sampler)
    _check_field("grid", grid)
    steps = _int("steps", d["steps"] if _blank(body.get("steps")) else body["steps"])
    _check_field("steps", steps)
    if steps > limits.max_steps:
        raise ParamError("steps", f"steps must be at most {limits.max_steps} here, got {steps}")
    num = _int("num", d["num"] if _blank(body.get("num")) else body["num"])
    _check_field("num", num)
    if num > limits.max_images:
        raise ParamError("num", f"num: at most {limits.max_images} images per request, got {num}")
    seed = _int("seed", d["seed"] if _blank(body.get("seed")) else body["seed"])
    _check_field("seed", seed)
    guidance = _float("guidance", d["guidance"] if _blank(body.get("guidance")) else body["guidance"])
    _check_field("guidance", guidance)
    interval = body.get("interval")
    if _blank(interval) or (isinstance(interval, list) and all(_blank(v) for v in interval)):
        interval = None
    else:
        if not isinstance(interval, list) or len(interval) != 2:
            raise ParamError("interval", f"interval must be two log-SNR values LO <= HI, got {interval!r}")
        if any(_blank(v) for v in interval):
            raise ParamError("interval", "interval needs both LO and HI (or neither, to guide at every level)")
        interval = tuple(_float("interval", v) for v in interval)
        _check_field("interval", interval)
    labels, nrow = _labels(body.get("labels"), num, entry.loaded.num_classes)
    if guidance != 0.0 and labels is None:
        raise ParamError("guidance", "guidance needs a class-conditional model; this one is unconditional (use 0)")
    if guidance != 0.0 and (entry.discrete or sampler == "generator"):
        raise ParamError("guidance", "guidance is not available for this model's sampler (use 0)")
    cfg = dataclasses.replace(entry.loaded.config.sample, sampler=sampler, steps=steps, grid=grid,
                              guidance=guidance, interval=interval, seed=seed, num=num, rescale=0.0, eta=0.0)
    _check_model_sampler(entry, cfg)
    batches = math.ceil(num / cfg.batch_size)
    total = (steps if entry.discrete else nfe(sampler, steps)) * batches
    return SampleRequest(entry, cfg, labels, nrow, total)


def _check_model_sampler(entry: ModelEntry, cfg: SampleConfig) -> None:
    """A student's fixed sampler, steps and grid; samplers the model's process or kind cannot run."""
    locked = entry.locked()
    if locked is not None:
        bad = [k for k in LOCKED if getattr(cfg, k) != locked[k] and not (k == "grid" and locked["sampler"] ==
                                                                           "generator")]
        if bad:
            fixed = f"sampler {locked['sampler']}, {locked['steps']} steps, grid {locked['grid']}"
            raise ParamError(bad[0], f"{bad[0]}: this {entry.kind} student was distilled for {fixed} and samples "
                                     f"only with those; got {getattr(cfg, bad[0])!r}")
    try:
        check_student_sampling(entry.loaded.meta, cfg)
        if not entry.discrete:
            check_process(cfg.sampler, entry.loaded.process)
    except (ConfigError, ValueError) as e:
        raise ParamError("sampler", f"sampler: {e}") from None
