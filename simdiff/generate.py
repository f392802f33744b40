"""Generation: noise -> sampler (over a denoiser, optionally guided) -> images.

One function, :func:`generate`, is what the CLI, the trainer's sample-grid hook, the evaluation and the
benchmarks call. It builds the step grid from the model's schedule, wraps the denoiser in classifier-free
guidance when asked, draws the starting noise from a seeded generator and runs the chosen sampler (any entry of
``simdiff.samplers.SAMPLERS``, distilled students' samplers included) in float32 (or float64) while the network may
run in bf16. Everything runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.guidance import classifier_free_guidance
from simdiff.processes import is_discrete
from simdiff.samplers import GRID_KINDS, MODEL_GRIDS, SAMPLERS, check_process, get_sampler, make_grid
from simdiff.schedules import Schedule

__all__ = ["SampleConfig", "generate", "check_sample_config", "sample_field_problem", "resolve_grid",
           "gaussian_start_parts", "start_noise"]


@dataclass(frozen=True)
class SampleConfig:
    """How to sample. ``guidance`` uses the Ho & Salimans convention: 0 is plain conditional sampling.

    ``interval`` is a log-SNR range ``(lo, hi)`` where guidance is applied (guidance interval,
    Kynkäänniemi et al. 2024); ``None`` applies it everywhere.

    ``gaussian_start``: for a model that carries its data moments (runs trained by simdiff, their exports, the
    shipped class-conditional models) and an ODE sampler, the "calibrated" grid starts above the schedule's first
    level and the starting noise is carried there without the network, along the flow of a Gaussian with the data's
    moments (:mod:`simdiff.samplers.gaussian`); so is any explicit grid that starts above the first level. ``False``
    starts the calibrated grid at the schedule's first level.
    """

    sampler: str = "unipc"
    steps: int = 50
    grid: str = "calibrated"
    guidance: float = 0.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    eta: float = 0.0
    num: int = 64
    seed: int = 0
    batch_size: int = 256
    gaussian_start: bool = True


#: the samplers a Gaussian start is used with (deterministic PF-ODE solvers; the stochastic ones and students start
#: at the schedule's first level).
_GAUSSIAN_START_SAMPLERS = ("unipc", "dpmpp_2m", "dpmpp_3m", "ddim", "euler", "heun")

#: the largest accepted ``seed`` + 1 (per-batch generator seeds ``seed * 1_000_003 + start`` stay within int64).
SEED_LIMIT = 2**32


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sample_field_problem(field: str, value: Any) -> str | None:
    """What is wrong with ``value`` for :class:`SampleConfig` field ``field`` (``None`` if nothing): the text that
    follows the setting's name in an error message, e.g. ``"must be an integer >= 1, got 0"``."""
    if field == "sampler":
        if value not in SAMPLERS:
            return f"unknown sampler {value!r}; valid: {', '.join(sorted(SAMPLERS))}"
    elif field == "grid":
        if value not in GRID_KINDS and value not in MODEL_GRIDS:
            return f"unknown grid {value!r}; valid: {', '.join(sorted(GRID_KINDS) + list(MODEL_GRIDS))}"
    elif field in ("steps", "num", "batch_size"):
        if not _is_int(value) or value < 1:
            return f"must be an integer >= 1, got {value!r}"
    elif field == "seed":
        if not _is_int(value) or not 0 <= value < SEED_LIMIT:
            return f"must be an integer in [0, 2**32), got {value!r}"
    elif field == "guidance":
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a finite number (0 = plain conditional sampling), got {value!r}"
    elif field == "rescale":
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            return f"must be a number in [0, 1], got {value!r}"
    elif field == "eta":
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            return f"must be a number in [0, 1], got {value!r}"
    elif field == "gaussian_start":
        if not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
    elif field == "interval":
        if value is None:
            return None
        if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value)
                or any(math.isnan(v) for v in value) or value[0] > value[1]):
            return f"must be two log-SNR values LO <= HI (not NaN), got {value!r}"
    return None


def check_sample_config(cfg: SampleConfig, *, where: str = "sample",
                        names: dict[str, str] | None = None) -> SampleConfig:
    """Refuse, with one line naming the setting, a :class:`SampleConfig` that cannot be sampled; returns ``cfg``.

    Checked: the sampler and grid are registered names, ``steps``, ``num`` and ``batch_size`` are >= 1, ``seed`` is
    in [0, 2**32), ``guidance`` is finite, ``rescale`` and ``eta`` are in [0, 1], ``interval`` is (LO, HI) with
    LO <= HI. The setting is named ``names[field]`` when given (e.g. a command-line flag), else ``where.field``.

    Raises:
        ConfigError: the first field that is wrong.
    """
    for f in dataclasses.fields(cfg):
        problem = sample_field_problem(f.name, getattr(cfg, f.name))
        if problem is not None:
            name = (names or {}).get(f.name) or (f"{where}.{f.name}" if where else f.name)
            raise ConfigError(f"{name} {problem}" if problem.startswith("must") else f"{name}: {problem}")
    return cfg


def _null_cond(null_cond: dict | None, conditioner: Any, num_classes: int) -> dict[str, Any]:
    """Explicit ``null_cond``, else the conditioner's, else the null class label ``num_classes`` (if any)."""
    if null_cond is not None:
        return dict(null_cond)
    if conditioner is not None:
        return dict(conditioner.null_cond)
    return {"labels": num_classes} if num_classes > 0 else {}


def _per_example(cond: dict[str, Tensor] | None, labels: Tensor | None, num: int) -> dict[str, Tensor]:
    out = dict(cond or {})
    if labels is not None:
        if "labels" in out:
            raise ValueError("give labels either as labels= or in cond=, not both")
        out["labels"] = labels
    for key, val in out.items():
        if not torch.is_tensor(val) or val.dim() == 0 or val.shape[0] != num:
            got = tuple(val.shape) if torch.is_tensor(val) else type(val).__name__
            raise ValueError(f"{key} must have shape ({num}, ...), got {got}")
    return out


def _calibrated(denoise, raw, schedule: Schedule, cfg: SampleConfig, shape, per_example: dict[str, Tensor],
                device, dtype, moments: Any = None) -> Tensor:
    """The "calibrated" grid of the denoiser that will be sampled (a pilot run on the first rows' conditioning,
    memoised for the process by the weights and everything else the pilot depends on); with data ``moments`` and
    ``cfg.gaussian_start``, it starts at :func:`simdiff.samplers.gaussian.start_level`."""
    from simdiff.samplers.calibrate import (
        PILOT_SIZE,
        calibrated_end,
        calibrated_grid,
        pilot_calibration,
        weights_fingerprint,
    )
    from simdiff.samplers.gaussian import start_level

    rows = min(PILOT_SIZE, next((int(v.shape[0]) for v in per_example.values()), PILOT_SIZE))
    cond = {k: v[:rows].to(device) for k, v in per_example.items()}
    ident = weights_fingerprint(raw) if isinstance(raw, torch.nn.Module) else f"id:{id(raw)}"
    key = (ident, float(cfg.guidance), cfg.interval, float(cfg.rescale), str(dtype),
           tuple((k, v.shape, v.float().sum().item()) for k, v in sorted(cond.items())))
    cal = pilot_calibration(denoise, schedule, shape, cond=cond, memo_key=key, device=device, dtype=dtype)
    start = None
    if moments is not None and cfg.gaussian_start:
        start = start_level(schedule, cal.mu, calibrated_end(schedule, cfg.steps, cal), cfg.steps)
    return calibrated_grid(schedule, cfg.steps, cal, start=start)


def resolve_grid(denoise, raw, schedule: Schedule, cfg: SampleConfig, shape, *, per_example: dict[str, Tensor],
                 process: Any = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 logsnrs: Tensor | None = None, moments: Any = None) -> Tensor:
    """The float64 step grid ``[cfg.steps + 1]`` that :func:`generate` samples on.

    ``logsnrs`` when given (checked); else ``cfg.grid``: a closed-form kind from :func:`make_grid`, or
    ``"calibrated"``, fitted to a pilot run of ``denoise`` (the guided denoiser that will be sampled; ``raw`` is the
    network whose weights key the memo) on the first rows of ``per_example``. A non-isotropic process has levels
    that are not log-SNRs, so there "calibrated" falls back to the schedule's uniform-t grid. With data ``moments``
    (and ``cfg.gaussian_start``) the calibrated grid starts above the schedule's first level (see
    :class:`SampleConfig`)."""
    if logsnrs is None and cfg.grid == "calibrated":
        if process is not None and not process.isotropic:
            logsnrs = make_grid(schedule, cfg.steps, kind="uniform_t")
        else:
            logsnrs = _calibrated(denoise, raw, schedule, cfg, shape, per_example, device, dtype, moments)
    return _grid(schedule, cfg, logsnrs)


def _grid(schedule: Schedule, cfg: SampleConfig, logsnrs: Tensor | None) -> Tensor:
    """The step grid: ``logsnrs`` when given (it must have ``cfg.steps + 1`` increasing levels ending at +inf),
    else ``make_grid(schedule, cfg.steps, kind=cfg.grid)``; ``grid: tuned`` needs ``logsnrs``."""
    if logsnrs is None:
        if cfg.grid == "tuned":
            raise ConfigError("grid 'tuned' needs the fitted grid: sample from the run directory `simdiff tune-grid` "
                              "wrote it to (--grid tuned), or pass logsnrs=")
        return make_grid(schedule, cfg.steps, kind=cfg.grid)
    grid = torch.as_tensor(logsnrs, dtype=torch.float64).cpu()
    if (grid.dim() != 1 or grid.shape[0] != cfg.steps + 1 or grid[-1] != math.inf
            or not bool((torch.diff(grid[:-1]) > 0).all()) or bool(grid[:-1].isnan().any())):
        raise ConfigError(f"logsnrs must be {cfg.steps + 1} increasing log-SNR levels ending at +inf (steps="
                          f"{cfg.steps}), got {grid.tolist()}")
    return grid


def gaussian_start_parts(raw, cfg: SampleConfig, *, process: Any = None, null: dict | None = None,
                         moments: Any = None) -> tuple[Any, Any]:
    """``(moments, surrogate)`` for the Gaussian start of a run (see :class:`SampleConfig`): the data moments
    (``moments``, else ``raw.data_moments``) when they apply (an ODE sampler, the isotropic process, not a student
    that takes the guidance weight as input), and their :class:`~simdiff.samplers.gaussian.GaussianDenoiser`, wrapped
    in the run's guidance when ``null`` (the null conditioning) is given, when ``cfg.gaussian_start`` too."""
    moments = getattr(raw, "data_moments", None) if moments is None else moments
    if moments is None or bool(getattr(raw, "guidance_input", False)) or cfg.sampler not in _GAUSSIAN_START_SAMPLERS \
            or (process is not None and not process.isotropic):
        return None, None
    if not cfg.gaussian_start:
        return moments, None
    from simdiff.samplers.gaussian import GaussianDenoiser

    surrogate: Any = GaussianDenoiser(moments)
    if null is not None:
        surrogate = classifier_free_guidance(surrogate, weight=cfg.guidance, null_cond=null, interval=cfg.interval,
                                             rescale=cfg.rescale, process=process)
    return moments, surrogate


def start_noise(surrogate, z: Tensor, schedule: Schedule, logsnrs: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """``z`` carried by the Gaussian ``surrogate`` from the schedule's first level to the grid's first level (no
    network call); ``z`` itself when there is no surrogate or the grid starts at the first level."""
    lo, start = float(schedule.logsnr_min), float(logsnrs[0])
    if surrogate is None or not start > lo:
        return z
    from simdiff.samplers.gaussian import gaussian_start

    return gaussian_start(surrogate, z, lo, start, cond=cond)


def generate(
    denoise,
    schedule: Schedule,
    shape: tuple[int, ...],
    cfg: SampleConfig = SampleConfig(),
    *,
    num: int | None = None,
    labels: Tensor | None = None,
    cond: dict[str, Tensor] | None = None,
    num_classes: int = 0,
    null_cond: dict[str, Any] | None = None,
    conditioner: Any = None,
    process: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    logsnrs: Tensor | None = None,
    moments: Any = None,
) -> Tensor:
    """Draw ``num`` samples of per-example ``shape`` (e.g. ``(1, 28, 28)``); returns ``[num, *shape]`` on CPU.

    The starting noise of every batch is ``torch.randn`` from a CPU generator seeded with ``cfg.seed`` (so it is the
    same on any device); a sampler's own noise comes from a generator on ``device`` seeded per batch.

    Args:
        denoise: ``denoise(z, logsnr, **cond) -> DenoiserOutput`` (a one-step generator student: ``g(z, **cond)``).
        schedule: the model's log-SNR schedule (defines the grid's range).
        labels: ``[num]`` class labels for a conditional model (``None``: unconditional / null class).
        cond: other per-example conditioning keywords, each ``[num, ...]`` (sliced per batch).
        num_classes: the model's class count; without ``null_cond`` / ``conditioner`` the null label for guidance is
            ``num_classes``.
        null_cond: conditioning meaning "unconditional" for guidance (see :func:`simdiff.guidance.guide`).
        conditioner: a :class:`simdiff.conditioners.Conditioner`; its ``null_cond`` is used when ``null_cond`` is
            not given.
        process: the noising process, passed to the sampler (and to guidance rescale) when not ``None``. A
            discrete process (:class:`simdiff.processes.DiscreteProcess`) is sampled by its own ``prior`` and
            ``step`` on a uniform time grid of ``cfg.steps`` steps (``denoise`` is then its network).
        logsnrs: an explicit step grid (``cfg.steps + 1`` increasing log-SNR levels ending at +inf), e.g. one
            fitted by ``simdiff tune-grid`` (:func:`simdiff.samplers.tune_cli.tuned_grid_for`); it replaces
            ``cfg.grid``, and ``cfg.grid == "tuned"`` requires it.
        moments: the data's Gaussian moments (:class:`simdiff.samplers.gaussian.DataMoments`) for the Gaussian
            start (see :class:`SampleConfig`); default: the ``data_moments`` attribute of ``denoise`` (set by
            :func:`simdiff.runs.load_model` when the run or file carries them). Used by the ODE samplers only, with
            the isotropic process.

    Raises:
        ConfigError: a setting of ``cfg`` that cannot be sampled (see :func:`check_sample_config`), or ``num < 1``.
        ValueError: guidance without any null conditioning, or conditioning of the wrong shape.
    """
    check_sample_config(cfg)
    num = cfg.num if num is None else num
    if not _is_int(num) or num < 1:
        raise ConfigError(f"num must be an integer >= 1, got {num!r}")
    per_example = _per_example(cond, labels, num)
    if is_discrete(process):
        return _generate_discrete(denoise, process, shape, cfg, num, per_example, device, progress)
    guidance_input = bool(getattr(denoise, "guidance_input", False))  # guided students take w as an input
    raw = denoise
    sampler = get_sampler(cfg.sampler)
    check_process(cfg.sampler, process)
    if cfg.guidance != 0.0 and cfg.sampler == "generator" and not guidance_input:
        raise ValueError("guidance is not available for a one-step generator student (sampler 'generator')")
    if cfg.guidance != 0.0 and not guidance_input:
        null = _null_cond(null_cond, conditioner, num_classes)
        if not null:
            raise ValueError("guidance needs null conditioning: this model has no classes (num_classes = 0) and "
                             "no null_cond or conditioner was given")
        missing = sorted(set(null) - set(per_example))
        if missing:
            raise ValueError(f"guidance replaces {missing} with the null conditioning, but no {missing} were given")
        denoise = classifier_free_guidance(
            denoise, weight=cfg.guidance, null_cond=null, interval=cfg.interval, rescale=cfg.rescale, process=process
        )
    # Built once, on the CPU where it is made: the samplers read the float64 grid on the host (validation,
    # coefficients, host levels) and move what the loop needs to the device themselves.
    moments, surrogate = gaussian_start_parts(raw, cfg, process=process, null=null if cfg.guidance != 0.0 and not
                                              guidance_input else None, moments=moments)
    logsnrs = resolve_grid(denoise, raw, schedule, cfg, shape, per_example=per_example, process=process,
                           device=device, dtype=dtype, logsnrs=logsnrs, moments=moments)
    extra: dict[str, Any] = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    if process is not None:
        extra["process"] = process
    # The isotropic process starts from N(0, I) (alpha is ~0 at the grid's first level); a general diagonal process
    # starts from its noise marginal there, sigma_0 eps, which need not be unit variance (e.g. non-VP coefficients).
    start_scaled = process is not None and not process.isotropic
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    out = []
    starts = range(0, num, cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling ({cfg.sampler}, {cfg.steps} steps)", unit="batch")
    with torch.inference_mode():
        for start in starts:
            n = min(cfg.batch_size, num - start)
            z = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
            if start_scaled:  # z ~ q(z | x = 0) at the first level: sigma_0 eps per basis coordinate
                z = process.add_noise(torch.zeros_like(z), z, lam=logsnrs[0].to(device=device, dtype=dtype).expand(n))
            batch_cond = {k: v[start : start + n].to(device) for k, v in per_example.items()}
            z = start_noise(surrogate, z, schedule, logsnrs, batch_cond)
            if guidance_input:
                batch_cond["guidance"] = torch.full((n,), float(cfg.guidance), device=device)
            noise_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
            x = sampler(denoise, z, logsnrs, generator=noise_gen, cond=batch_cond, **extra)
            out.append(x.float().cpu())
        images = torch.cat(out).clamp(-1, 1)
    return images.clone()  # an ordinary tensor (callers may modify it in place)


def _generate_discrete(model, process, shape, cfg: SampleConfig, num: int, per_example: dict[str, Tensor], device,
                       progress: bool) -> Tensor:
    """``process.prior`` then ``cfg.steps`` calls of ``process.step`` from time 1 to 0 per batch; ``to_data``."""
    if cfg.guidance != 0.0:
        raise ValueError(f"guidance is not available for the discrete process {process.name!r}")
    times = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    starts = range(0, num, cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling ({process.name}, {cfg.steps} steps)", unit="batch")
    out = []
    with torch.inference_mode():
        for start in starts:
            n = min(cfg.batch_size, num - start)
            x = process.prior((n, *shape), generator=gen, device=device)
            batch_cond = {k: v[start : start + n].to(device) for k, v in per_example.items()}
            step_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
            for i in range(cfg.steps):
                t, s = (times[j].to(device=device, dtype=torch.float32).expand(n) for j in (i, i + 1))
                x = process.step(model, x, t=t, s=s, generator=step_gen, **batch_cond)
            out.append(process.to_data(x).cpu())
    return torch.cat(out).clone()
