"""Editing real images: invert with the source condition, re-generate with the target condition.

:func:`invert` maps images to the state a method re-generates from; :func:`regenerate` runs the generation back
with any condition (the source one reconstructs, another one edits); :func:`edit` is the two together. Methods:

========== ============================================================ ========================================
method     inversion                                                    re-generation
========== ============================================================ ========================================
ddim       DDIM / multistep inversion (``order``), source condition,   deterministic sampler of the same order,
           ``source_guidance`` (default 0)                              target condition, ``guidance``
edict      EDICT (exact), source condition at ``guidance``              EDICT sampling, target, ``guidance``
nulltext   null-text inversion for ``guidance``                         guided DDIM with the optimised nulls
negprompt  DDIM inversion, source condition, unguided                   guided DDIM, null condition = source
ddpm       edit-friendly DDPM noise maps, ``source_guidance``           DDPM with the maps, target, ``guidance``
           (default ``guidance``: reconstruction is then exact)
ode        exact PF-ODE inversion (DOP853, float64, ``ode_tol``),       PF-ODE (DOP853), target, ``guidance``
           unguided; landing: up to ``max(land_iters, 20)`` iterations
========== ============================================================ ========================================

Strength: ``strength`` in (0, 1] keeps the last ``round(strength * steps)`` steps of the grid, so inversion stops at
an intermediate level and re-generation starts there (less change, more faithfulness; SDEdit-style start step).
``skip`` (edit-friendly DDPM's ``T_skip``, usable with every method) sets the number of skipped noisiest steps
directly and overrides ``strength``. Guidance weights use simdiff's convention (``w = 0`` is the conditional
model; diffusers' scale is ``1 + w``).

Everything but null-text optimisation and the PF-ODE solves runs under ``torch.inference_mode`` (those two run under
``torch.no_grad`` and turn gradients on where they need them: null-text with respect to the null values), so do not
call them inside an inference-mode block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from simdiff.invert.ddim import ddim_invert, reconstruct
from simdiff.invert.ddpm_friendly import ddpm_invert, ddpm_sample
from simdiff.invert.edict import DEFAULT_MIXING, EdictState, edict_invert, edict_sample
from simdiff.invert.nulltext import nulltext_invert, nulltext_sample
from simdiff.invert.ode import Float64, ode_invert, ode_reconstruct
from simdiff.samplers import make_grid

__all__ = ["METHODS", "Inversion", "EditResult", "CountCalls", "as_cond", "edit_grid", "invert", "regenerate", "edit"]

METHODS: tuple[str, ...] = ("ddim", "edict", "nulltext", "negprompt", "ddpm", "ode")


class CountCalls:
    """A denoiser that counts the examples it evaluates; ``nfe`` = examples / ``batch`` (a guided call on ``2B``
    examples counts 2). Other attributes are the wrapped denoiser's."""

    def __init__(self, denoise: Callable, batch: int) -> None:
        self.denoise, self.batch, self.rows = denoise, int(batch), 0

    def __call__(self, z: Tensor, lam: Tensor, **cond: Any):
        self.rows += z.shape[0]
        return self.denoise(z, lam, **cond)

    def __getattr__(self, name: str) -> Any:
        if name in ("denoise", "batch", "rows"):
            raise AttributeError(name)
        return getattr(self.denoise, name)

    @property
    def nfe(self) -> float:
        return self.rows / max(self.batch, 1)


@dataclass
class Inversion:
    """What :func:`invert` returns: the method, the grid the state lives on (``grid[0]`` is its level), the state
    (a tensor, :class:`~simdiff.invert.edict.EdictState`, :class:`~simdiff.invert.ddpm_friendly.DDPMInversion` or
    :class:`~simdiff.invert.nulltext.NullTextInversion`), the source conditioning, the guidance it was made for, the
    re-generation options and the network evaluations spent (per image)."""

    method: str
    grid: Tensor
    state: Any
    source_cond: dict[str, Any]
    guidance: float
    options: dict[str, Any] = field(default_factory=dict)
    nfe: float = 0.0

    @property
    def latent(self) -> Tensor:
        """The (first) latent tensor at ``grid[0]``."""
        s = self.state
        return s.x if isinstance(s, EdictState) else getattr(s, "latent", s)


@dataclass
class EditResult:
    """``edited`` ``[B, ...]``, the :class:`Inversion` and the re-generation's network evaluations per image."""

    edited: Tensor
    inversion: Inversion
    nfe: float = 0.0


def _is_loaded(model: Any) -> bool:
    return hasattr(model, "model") and hasattr(model, "schedule")


def _model_parts(model: Any, schedule: Any, process: Any) -> tuple[Callable, Any, Any]:
    """A :class:`simdiff.runs.LoadedModel` or a bare denoiser -> (denoiser, schedule, process)."""
    if _is_loaded(model):
        return model.model, schedule or model.schedule, process if process is not None else model.process
    if schedule is None:
        raise ValueError("editing a bare denoiser needs schedule= (or pass a simdiff.runs.LoadedModel)")
    return model, schedule, process


def as_cond(value: Any, batch: int, *, device: torch.device | str | None = None) -> dict[str, Any]:
    """A condition as denoiser keywords: a dict as is, ``None`` -> ``{}``, an int or a ``[B]`` / ``[1]`` tensor of
    class labels -> ``{"labels": [B] long}``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, int | Tensor):
        raise ValueError(f"a condition must be a class label, a [B] label tensor or a dict, got {type(value).__name__}")
    labels = torch.as_tensor(value, dtype=torch.long, device=device).reshape(-1)
    if labels.shape[0] == 1:
        labels = labels.expand(batch)
    if labels.shape[0] != batch:
        raise ValueError(f"{labels.shape[0]} labels for {batch} images")
    return {"labels": labels}


def edit_grid(schedule: Any, steps: int, *, strength: float = 1.0, skip: int | None = None,
              kind: str = "uniform_t") -> Tensor:
    """The grid of an edit: ``make_grid(schedule, steps, kind)`` without its ``skip`` noisiest levels (``skip``
    defaults to ``steps - round(strength * steps)``, at least one step kept).

    Raises:
        ValueError: ``strength`` outside (0, 1], ``skip`` outside [0, steps - 1].
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if skip is None:
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        skip = steps - max(1, round(float(strength) * steps))
    if int(skip) != skip or not 0 <= skip <= steps - 1:
        raise ValueError(f"skip must be an integer in [0, {steps - 1}] for {steps} steps, got {skip!r}")
    return make_grid(schedule, int(steps), kind=kind)[int(skip):]


def _null_keys(denoise: Callable, null_cond: dict[str, Any] | None) -> dict[str, Any] | None:
    if null_cond is not None:
        return null_cond
    n = getattr(denoise, "num_classes", None)
    return {"labels": n} if isinstance(n, int) and n > 0 else None


def invert(
    model: Any,
    x: Tensor,
    *,
    cond: Any = None,
    method: str = "ddim",
    steps: int = 50,
    strength: float = 1.0,
    skip: int | None = None,
    guidance: float = 0.0,
    source_guidance: float | None = None,
    order: int = 1,
    mixing: float = DEFAULT_MIXING,
    grid_kind: str = "uniform_t",
    null_cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    inner_steps: int = 10,
    lr: float = 1e-2,
    land_iters: int = 1,
    lookahead: bool = False,
    ode_tol: float = 1e-6,
    schedule: Any = None,
    process: Any = None,
) -> Inversion:
    """Invert images ``x`` ``[B, C, H, W]`` (in [-1, 1]) with ``method`` (module docstring).

    Args:
        model: a :class:`simdiff.runs.LoadedModel`, or a denoiser with ``schedule=`` (and ``process=``).
        cond: the source condition (:func:`as_cond`: class label(s) or keywords).
        steps, strength, skip, grid_kind: the grid (:func:`edit_grid`).
        guidance: the weight re-generation will use (EDICT inverts with it; null-text optimises for it).
        source_guidance: inversion guidance of "ddim" (default 0) and "ddpm" (default ``guidance``).
        order: 1-3, for "ddim". mixing: EDICT's p. null_cond: unconditional keywords (default: the null class).
        generator: noise of "ddpm". inner_steps, lr: null-text optimiser. land_iters, lookahead: see
            :func:`simdiff.invert.ddim.ddim_invert` ("ddim" with ``order = 1`` and "negprompt").
        ode_tol: "ode": DOP853's rtol and atol (inversion and re-generation).
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; valid: {', '.join(METHODS)}")
    denoise, schedule, process = _model_parts(model, schedule, process)
    grid = edit_grid(schedule, steps, strength=strength, skip=skip, kind=grid_kind)
    src = as_cond(cond, x.shape[0], device=x.device)
    null = _null_keys(denoise, null_cond)
    counter = CountCalls(denoise, x.shape[0])
    if source_guidance is None:
        source_guidance = guidance if method == "ddpm" else 0.0
    sg = float(source_guidance)
    common = dict(cond=src, process=process)
    options: dict[str, Any] = {"null_cond": null, "order": order, "mixing": mixing, "ode_tol": ode_tol}
    ctx = torch.no_grad() if method in ("nulltext", "ode") else torch.inference_mode()
    with ctx:
        if method in ("ddim", "negprompt"):
            g = sg if method == "ddim" else 0.0
            state = ddim_invert(counter, x, grid, order=order if method == "ddim" else 1, guidance=g,
                                null_cond=null, land_iters=land_iters, lookahead=lookahead, **common)
        elif method == "edict":
            state = edict_invert(counter, x, grid, mixing=mixing, guidance=guidance, null_cond=null, **common)
        elif method == "nulltext":
            state = nulltext_invert(counter, x, grid, guidance=guidance, null_cond=null, inner_steps=inner_steps,
                                    lr=lr, land_iters=land_iters, **common)
        elif method == "ddpm":
            state = ddpm_invert(counter, x, grid, guidance=sg, null_cond=null, generator=generator, **common)
            options["source_guidance"] = sg
        else:
            net = Float64(counter)
            tol = 1e-10 if net.dtype == torch.float64 else 1e-5
            state = ode_invert(net, x.to(torch.float64), grid, rtol=ode_tol, atol=ode_tol, land_tol=tol,
                               land_max_iters=max(land_iters, 20), land_strict=False, **common).to(x.dtype)
    return Inversion(method, grid, state, src, float(guidance), options, counter.nfe)


def regenerate(model: Any, inversion: Inversion, *, cond: Any = None, guidance: float | None = None,
               process: Any = None) -> tuple[Tensor, float]:
    """Generate from ``inversion`` with condition ``cond`` (default: the source one, i.e. reconstruct) and guidance
    weight ``guidance`` (default: the inversion's). Returns ``(images [B, ...], network evaluations per image)``.

    EDICT and null-text re-generate with the guidance they were inverted for (a different weight raises).
    """
    denoise = model.model if _is_loaded(model) else model
    if process is None and _is_loaded(model):
        process = model.process
    inv, grid = inversion, inversion.grid
    latent = inv.latent
    b = latent.shape[0]
    target = inv.source_cond if cond is None else as_cond(cond, b, device=latent.device)
    w = inv.guidance if guidance is None else float(guidance)
    if inv.method in ("edict", "nulltext") and w != inv.guidance:
        raise ValueError(f"{inv.method}: inverted for guidance {inv.guidance}, cannot re-generate with {w}")
    null = inv.options.get("null_cond")
    counter = CountCalls(denoise, b)
    with torch.no_grad() if inv.method == "ode" else torch.inference_mode():
        if inv.method == "ddim":
            out = reconstruct(counter, latent, grid, cond=target, process=process, order=inv.options["order"],
                              guidance=w, null_cond=null)
        elif inv.method == "negprompt":
            neg = {k: inv.source_cond[k] for k in (null or {}) if k in inv.source_cond} or null
            out = reconstruct(counter, latent, grid, cond=target, process=process, guidance=w, null_cond=neg)
        elif inv.method == "edict":
            out = edict_sample(counter, inv.state, grid, cond=target, process=process, mixing=inv.options["mixing"],
                               guidance=w, null_cond=null).x
        elif inv.method == "nulltext":
            out = nulltext_sample(counter, latent, grid, cond=target, inversion=inv.state, guidance=w,
                                  process=process)
        elif inv.method == "ddpm":
            out = ddpm_sample(counter, inv.state, grid, cond=target, process=process, guidance=w, null_cond=null)
        else:
            den = Float64(counter)
            den = den if w == 0.0 else _guided_ode(den, w, null, process)
            tol = inv.options["ode_tol"]
            out = ode_reconstruct(den, latent.to(torch.float64), grid, cond=target, process=process, rtol=tol,
                                  atol=tol).to(latent.dtype)
    return out, counter.nfe


def _guided_ode(denoise: Callable, w: float, null: dict[str, Any] | None, process: Any) -> Callable:
    from simdiff.invert.ddim import guided

    return guided(denoise, w, null_cond=null, process=process)


def edit(
    model: Any,
    x: Tensor,
    *,
    source_cond: Any,
    target_cond: Any,
    method: str = "ddim",
    steps: int = 50,
    strength: float = 1.0,
    skip: int | None = None,
    guidance: float = 0.0,
    mixing: float = DEFAULT_MIXING,
    **options: Any,
) -> EditResult:
    """Edit images ``x`` ``[B, C, H, W]`` from ``source_cond`` to ``target_cond`` (class labels or keywords).

    Invert with the source condition (:func:`invert`, which takes the remaining ``options``: ``order``,
    ``source_guidance``, ``grid_kind``, ``null_cond``, ``generator``, ``inner_steps``, ``lr``, ``land_iters``,
    ``schedule``, ``process``), then :func:`regenerate` with the target condition at ``guidance``.
    """
    inv = invert(model, x, cond=source_cond, method=method, steps=steps, strength=strength, skip=skip,
                 guidance=guidance, mixing=mixing, **options)
    out, nfe = regenerate(model, inv, cond=target_cond, guidance=guidance, process=options.get("process"))
    return EditResult(out, inv, nfe)
