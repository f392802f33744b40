"""Samplers over a denoiser callable, step grids, a reference ODE solver and tuned grids.

All samplers share one signature (k-diffusion style, stateless):

    sample_x(denoise, z, logsnrs, *, generator=None, callback=None, cond=None, **options) -> Tensor

``logsnrs`` is a strictly increasing float64 grid (``make_grid``), last entry +inf = land on data. See
``_common.py`` for the grid rules and ``nfe`` for network calls per run.

The core samplers also take ``process=`` (a :class:`simdiff.processes.GaussianProcess`; ``None`` = the isotropic VP
process, bit-identical to passing nothing). "ddim", "ddpm" and "dpmpp_2m" run on any diagonal process, per basis
coordinate; the others refuse a non-isotropic process with one line.
"""

from __future__ import annotations

from collections.abc import Callable

from simdiff.configuration import get_registered
from simdiff.samplers._common import require_isotropic
from simdiff.samplers.addim import sample_addim
from simdiff.samplers.dpm_solver import sample_dpmpp_2m, sample_dpmpp_3m
from simdiff.samplers.edm import sample_edm
from simdiff.samplers.first_order import sample_ddim, sample_ddpm
from simdiff.samplers.grids import GRID_KINDS, MODEL_GRIDS, make_grid
from simdiff.samplers.noise import BrownianTreeNoise
from simdiff.samplers.ode import sample_euler, sample_heun, solve_reference
from simdiff.samplers.stochastic import sample_dpmpp_2m_sde
from simdiff.samplers.students import STUDENT_SAMPLERS
from simdiff.samplers.tuned import fit_grids, optimize_grid
from simdiff.samplers.unipc import sample_unipc

__all__ = [
    "SAMPLERS",
    "STOCHASTIC",
    "PER_COORDINATE",
    "check_process",
    "GRID_KINDS",
    "MODEL_GRIDS",
    "get_sampler",
    "nfe",
    "make_grid",
    "solve_reference",
    "optimize_grid",
    "fit_grids",
    "BrownianTreeNoise",
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_unipc",
    "sample_dpmpp_2m_sde",
    "sample_addim",
    "sample_edm",
]

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "sde": sample_dpmpp_2m_sde,
    "addim": sample_addim,
    "edm": sample_edm,
    **STUDENT_SAMPLERS,
}

#: samplers that draw noise ("ddim" only with eta > 0).
STOCHASTIC: frozenset[str] = frozenset({"ddpm", "sde", "moment_matching", "moment_matching_large", "guided_stochastic"})
#: samplers with a per-coordinate form: they run on any diagonal Gaussian process (the one-step generator never
#: touches the process). The others refuse a non-isotropic process with one line.
PER_COORDINATE: frozenset[str] = frozenset({"ddpm", "ddim", "dpmpp_2m", "moment_matching", "moment_matching_large",
                                           "generator"})


def get_sampler(name: str) -> Callable:
    """The sampler registered as ``name``; unknown names raise a ValueError listing the valid ones."""
    return get_registered(SAMPLERS, name, "sampler")


def check_process(name: str, process) -> None:
    """Refuse, with one line, sampler ``name`` on a non-isotropic ``process`` when it has no per-coordinate form
    (what the sampler itself would raise on its first step; callers use it to fail before any work)."""
    get_sampler(name)
    if name not in PER_COORDINATE:
        require_isotropic(process, name)


def nfe(name: str, steps: int) -> int:
    """Network evaluations for ``steps`` steps on a grid ending at +inf (``make_grid``): ``steps`` for every
    sampler except Heun and EDM's sampler, ``2 steps - 1`` (the last step to +inf is an Euler step), and the
    one-step generator."""
    get_sampler(name)
    if steps < 1:
        raise ValueError(f"nfe: steps must be >= 1, got {steps}")
    if name == "generator":
        return 1
    return 2 * steps - 1 if name in ("heun", "edm") else steps
