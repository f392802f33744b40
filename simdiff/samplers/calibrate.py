"""The "calibrated" step grid: the "auto" logistic grid with its centre and width measured on the model itself.

The "auto" grid (:mod:`simdiff.samplers.policy`) puts its levels at equal mass of a logistic density in log-SNR
with constants chosen on Gaussian mixtures; images decide their structure at lower log-SNR than those mixtures
(on the shipped MNIST model a lower, wider logistic was better). Here the density is located from the model, once,
with no reference solution:

1. Pilot: one deterministic DDIM run (Song et al. 2021, eq. 12) on ``pilot_size`` starting noises over a fine
   uniform log-SNR grid of ``pilot_steps`` steps records the denoiser's prediction x_hat at every level. The rate
   ``r(lambda) = rms_batch ||x_hat(lambda_{k+1}) - x_hat(lambda_k)|| / (lambda_{k+1} - lambda_k)`` is where the
   sample's content is being decided (``lambda`` = log-SNR).
2. Fit: with the weight ``w = r^(1/2)``, the weighted median ``m`` and quartiles ``q1, q3`` of lambda give the
   logistic ``mu = m + OFFSET`` and ``s = SCALE_FACTOR (q3 - q1) / (2 ln 3)`` (a logistic's interquartile range is
   ``2 s ln 3``).
3. Grid for ``steps`` calls: ``steps`` finite levels at equal logistic(mu, s) mass from ``logsnr_min`` to
   ``end = min(logsnr_max, (1 + 2 steps) / 3 + END_SHIFT (mu - 2))``, then the final step to data (with
   ``END_SHIFT = 0``: the "auto" grid's end rule).

``OFFSET = 2.3`` and ``SCALE_FACTOR = 1.2`` were chosen by measurement (RMSE of UniPC against the PF-ODE
solution) on the "train" mixtures of ``benchmarks/samplers.py`` and on 32 samples of the shipped MNIST model; on
the mixtures the fitted rule gives centres near the "auto" grid's 2 and scales near its 2.5, on MNIST (-2.6, 4.8).
An end that moves with the centre (``END_SHIFT = 0.5``) lowered the RMSE on both but raised MNIST-FD at 4-6 calls
(1530 / 947 / 689 vs 1365 / 658 / 527 at 500 samples): it lands earlier, on the blurred posterior mean, which the
RMSE rewards and a perceptual metric does not, so the end rule is the "auto" one. This is an empirical rule, not a
derived optimum: the error-equidistributing density of de Boor (``error_balanced_grid``) on the same pilot was
measured and lost at 8+ calls (its density vanishes at high log-SNR, leaving one long last step).

Cached per model: :func:`calibration_for_run` stores the fitted ``(mu, s)`` next to ``simdiff tune-grid``'s grids
(``RUN/tuned_grids.json``, or ``FILE.grids.json`` beside an exported file), keyed by guidance and a SHA-256 of the
weights, so it is measured once per model and re-measured when the weights change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from simdiff.samplers.policy import END_BASE, END_SLOPE, logistic_levels

__all__ = ["OFFSET", "SCALE_FACTOR", "END_SHIFT", "PILOT_STEPS", "PILOT_SIZE", "GridCalibration",
           "xhat_rate",
           "fit_calibration", "calibrate", "calibrated_grid", "calibrated_end", "weights_fingerprint",
           "model_calibration", "pilot_calibration", "calibration_for_run", "calibrated_grid_for", "grids_file",
           "calibration_key"]

OFFSET = 2.3
SCALE_FACTOR = 1.2
END_SHIFT = 0.0
#: centre the end rule is anchored at (the "auto" grid's centre).
END_ANCHOR = 2.0
PILOT_STEPS = 96
PILOT_SIZE = 16


@dataclass(frozen=True)
class GridCalibration:
    """A fitted logistic in log-SNR: centre ``mu`` and scale ``scale`` (> 0)."""

    mu: float
    scale: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"GridCalibration: need a finite mu and scale > 0, got {self.mu}, {self.scale}")


def xhat_rate(denoise: Callable, schedule, z: Tensor, *, pilot_steps: int = PILOT_STEPS,
              cond: dict | None = None) -> tuple[Tensor, Tensor]:
    """Rate of change of x_hat along one fine DDIM run from ``z`` (module doc, step 1).

    Args:
        denoise: ``denoise(z, logsnr[B], **cond) -> DenoiserOutput``.
        schedule: gives ``logsnr_min`` / ``logsnr_max`` (the pilot grid's ends).
        z: ``[B, ...]`` starting noise.
        pilot_steps: DDIM steps (network calls) of the pilot, >= 4.

    Returns:
        ``(levels [pilot_steps - 1], rate [pilot_steps - 1])``, float64: midpoints of consecutive pilot levels and
        the batch-rms norm of x_hat's change per unit log-SNR between them.
    """
    from simdiff.samplers.first_order import sample_ddim

    if pilot_steps < 4:
        raise ValueError(f"xhat_rate: pilot_steps must be >= 4, got {pilot_steps}")
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    grid = torch.linspace(lo, hi, pilot_steps + 1, dtype=torch.float64)
    xs: list[Tensor] = []
    with torch.no_grad():
        sample_ddim(denoise, z, grid, callback=lambda d: xs.append(d["x"].detach().to("cpu", torch.float64)),
                    cond=cond)
    x = torch.stack(xs[:pilot_steps])  # x_hat at grid[0 .. pilot_steps - 1]
    rate = torch.diff(x, dim=0).flatten(2).pow(2).sum(2).mean(1).sqrt() / (grid[1] - grid[0])
    return 0.5 * (grid[:-2] + grid[1:-1]), rate


def _weighted_quantile(levels: Tensor, weight: Tensor, q: float) -> float:
    cum = torch.cumsum(weight, 0)
    cum = cum / cum[-1]
    i = int(torch.searchsorted(cum, torch.tensor([q], dtype=cum.dtype)).clamp(max=levels.shape[0] - 1))
    return float(levels[i])


def fit_calibration(levels: Tensor, rate: Tensor) -> GridCalibration:
    """The logistic (module doc, step 2) from a measured ``rate`` at ``levels`` (both ``[P]``).

    Raises:
        ValueError: shapes differ, or the rate is not finite / is zero everywhere (nothing to locate).
    """
    if levels.shape != rate.shape or levels.dim() != 1 or levels.shape[0] < 3:
        raise ValueError(f"fit_calibration: need 1-D levels and rate of one length >= 3, got {tuple(levels.shape)} "
                         f"and {tuple(rate.shape)}")
    if not bool(torch.isfinite(rate).all()) or not float(rate.max()) > 0:
        raise ValueError("fit_calibration: the pilot's x_hat rate is not finite or is zero everywhere")
    weight = rate.to(torch.float64).clamp_min(0).sqrt()
    median = _weighted_quantile(levels, weight, 0.5)
    iqr = _weighted_quantile(levels, weight, 0.75) - _weighted_quantile(levels, weight, 0.25)
    step = float(levels[1] - levels[0])
    return GridCalibration(mu=median + OFFSET, scale=SCALE_FACTOR * max(iqr, step) / (2 * math.log(3)))


def calibrate(denoise: Callable, schedule, z: Tensor, *, pilot_steps: int = PILOT_STEPS,
              cond: dict | None = None) -> GridCalibration:
    """Pilot run + fit (``pilot_steps`` network calls on ``z`` ``[B, ...]``); see the module doc."""
    levels, rate = xhat_rate(denoise, schedule, z, pilot_steps=pilot_steps, cond=cond)
    return fit_calibration(levels, rate)


def calibrated_end(schedule, steps: int, calibration: GridCalibration) -> float:
    """The calibrated grid's last finite level (module doc, step 3)."""
    return min(float(schedule.logsnr_max), END_BASE + END_SLOPE * steps + END_SHIFT * (calibration.mu - END_ANCHOR))


def calibrated_grid(schedule, steps: int, calibration: GridCalibration, *, start: float | None = None) -> Tensor:
    """The float64 ``[steps + 1]`` grid ``[logsnr_min, interior..., +inf]`` for ``calibration`` (module doc, step 3).

    ``start`` (above ``logsnr_min``, below the end) replaces ``logsnr_min`` as the first level: the grid of a run
    whose noise was carried to ``start`` without the network (:mod:`simdiff.samplers.gaussian`). A grid whose end
    falls at or below ``logsnr_min`` (a schedule above the rule's range) is uniform in log-SNR to ``logsnr_max``
    instead, as the "auto" grid does.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"calibrated_grid: steps must be an integer >= 1, got {steps}")
    steps = int(steps)
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    if start is not None:
        if not lo <= start < calibrated_end(schedule, steps, calibration):
            raise ValueError(f"calibrated_grid: start {start} must lie in [logsnr_min, end) = [{lo}, "
                             f"{calibrated_end(schedule, steps, calibration)})")
        lo = float(start)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    if steps == 1:
        return torch.cat([torch.tensor([lo], dtype=torch.float64), inf])
    end = calibrated_end(schedule, steps, calibration)
    if not end > lo:
        return torch.cat([lo + (hi - lo) * torch.arange(steps, dtype=torch.float64) / (steps - 1), inf])
    return torch.cat([logistic_levels(lo, end, steps, mu=calibration.mu, scale=calibration.scale), inf])


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ cache
#: key prefix of calibrations in the grids file (the same file ``simdiff tune-grid`` writes its grids to).
KEY_PREFIX = "calibration"
_MEMO: dict[tuple, GridCalibration] = {}


def calibration_key(guidance: float) -> str:
    """The cache key ``"calibration/<guidance>"``."""
    return f"{KEY_PREFIX}/{float(guidance):g}"


def grids_file(source: str | Path) -> Path:
    """Where the grids of ``source`` are stored: ``RUN/tuned_grids.json`` for a run directory, ``FILE.grids.json``
    beside an exported file."""
    from simdiff.samplers.tune_cli import FILE

    source = Path(source)
    return source / FILE if source.is_dir() else source.with_name(source.name + ".grids.json")


def _settings() -> dict:
    return {"offset": OFFSET, "scale_factor": SCALE_FACTOR, "pilot_steps": PILOT_STEPS, "pilot_size": PILOT_SIZE}


def model_calibration(model: Callable, schedule, shape: tuple[int, ...], *, num_classes: int = 0,
                      guidance: float = 0.0, device: str | torch.device = "cpu") -> GridCalibration:
    """The calibration of a network ``model(z, logsnr, **cond)``, measured once per process.

    The pilot: ``PILOT_STEPS`` DDIM calls on ``PILOT_SIZE`` noises ``[PILOT_SIZE, *shape]`` from seed 0; a
    class-conditional model (``num_classes > 0``) gets the labels 0, 1, ... and, for ``guidance != 0``,
    classifier-free guidance against the null class. Memoised by the weights fingerprint (an ``nn.Module``; other
    callables by identity), schedule, shape and guidance.

    Raises:
        ConfigError: ``guidance != 0`` on an unconditional model.
    """
    from types import SimpleNamespace

    from simdiff.configuration import ConfigError
    from simdiff.samplers.tune_cli import _denoiser

    if guidance != 0.0 and num_classes == 0:
        raise ConfigError(f"grid 'calibrated': guidance {guidance:g} needs a class-conditional model")
    ident = weights_fingerprint(model) if isinstance(model, torch.nn.Module) else f"id:{id(model)}"
    memo_key = (ident, repr(schedule), tuple(shape), float(guidance), tuple(sorted(_settings().items())))
    if memo_key not in _MEMO:
        denoise = _denoiser(SimpleNamespace(model=model, num_classes=num_classes), guidance)
        z = torch.randn((PILOT_SIZE, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        _MEMO[memo_key] = calibrate(denoise, schedule, z)
    return _MEMO[memo_key]


def pilot_calibration(denoise: Callable, schedule, shape: tuple[int, ...], *, cond: dict | None = None,
                      memo_key: tuple | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> GridCalibration:
    """The calibration of the denoiser that will be sampled (guidance wrapper included), with its conditioning.

    The pilot noise is ``[B, *shape]`` from seed 0, ``B`` = the rows of ``cond`` (``PILOT_SIZE`` without ``cond``;
    give at most ``PILOT_SIZE`` rows). With ``memo_key`` (everything the result depends on: e.g. the weights
    fingerprint, guidance settings and the conditioning rows) the result is memoised for the process.
    """
    cond = dict(cond or {})
    rows = next((int(v.shape[0]) for v in cond.values() if torch.is_tensor(v) and v.dim() > 0), PILOT_SIZE)
    key = None if memo_key is None else ("pilot", repr(schedule), tuple(shape), *memo_key)
    if key is not None and key in _MEMO:
        return _MEMO[key]
    z = torch.randn((rows, *shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    cal = calibrate(denoise, schedule, z, cond=cond)
    if key is not None:
        _MEMO[key] = cal
    return cal


def calibration_for_run(source: str | Path, loaded, *, guidance: float = 0.0, device: str | torch.device = "cpu",
                        store: bool = True) -> GridCalibration:
    """The calibration of a loaded model (:func:`simdiff.runs.load_model` of ``source``), measured once and cached.

    Reused from :func:`grids_file` when its entry for ``guidance`` has the same weights fingerprint
    (:func:`weights_fingerprint`), schedule and pilot settings; otherwise measured by :func:`model_calibration`
    and written back (``store``; a location that cannot be written is skipped: the calibration is then kept for
    this process only).

    Raises:
        ConfigError: ``guidance != 0`` on an unconditional model, or a non-isotropic process.
        ValueError: the grids file is not valid JSON.
    """
    from simdiff.configuration import ConfigError
    from simdiff.samplers.tune_cli import _read, save_entry

    if loaded.process is not None and not loaded.process.isotropic:
        raise ConfigError("grid 'calibrated': the model's process is not isotropic; calibrated grids are log-SNR grids")
    if guidance != 0.0 and loaded.num_classes == 0:
        raise ConfigError(f"grid 'calibrated': guidance {guidance:g} needs a class-conditional model")
    want = {"fingerprint": weights_fingerprint(loaded.model), "schedule": repr(loaded.schedule), **_settings()}
    path, key = grids_file(source), calibration_key(guidance)
    entry = _read(path).get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in want.items()):
        try:
            return GridCalibration(mu=float(entry["mu"]), scale=float(entry["scale"]))
        except (KeyError, TypeError, ValueError):
            pass
    cal = model_calibration(loaded.model, loaded.schedule, loaded.image_shape, num_classes=loaded.num_classes,
                            guidance=guidance, device=device)
    if store:
        try:
            save_entry(path, key, {"mu": cal.mu, "scale": cal.scale, **want})
        except OSError:
            pass
    return cal


def calibrated_grid_for(source: str | Path, loaded, steps: int, *, guidance: float = 0.0,
                        device: str | torch.device = "cpu", gaussian_start: bool = False) -> Tensor:
    """``calibrated_grid(loaded.schedule, steps, calibration_for_run(source, loaded, ...))``: the CLI's grid; with
    ``gaussian_start`` it starts at :func:`simdiff.samplers.gaussian.start_level` (the caller has checked that the
    Gaussian start applies: ``generate`` then carries the noise there)."""
    from simdiff.samplers.gaussian import start_level

    cal = calibration_for_run(source, loaded, guidance=guidance, device=device)
    start = None
    if gaussian_start:
        start = start_level(loaded.schedule, cal.mu, calibrated_end(loaded.schedule, steps, cal), steps)
    return calibrated_grid(loaded.schedule, steps, cal, start=start)
