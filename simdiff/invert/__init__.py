"""Inversion of real images to latents and editing by re-generation (``simdiff.invert``, ``simdiff edit``).

* :func:`ddim_invert` / :func:`reconstruct`: deterministic inversion along a sampler grid (orders 1-3).
* :func:`edict_invert` / :func:`edict_sample`: EDICT, exact inversion with two coupled sequences (Wallace et al.
  2023).
* :func:`nulltext_invert` / :func:`nulltext_sample`: null-text (null-condition) inversion (Mokady et al. 2023).
* :func:`ddpm_invert` / :func:`ddpm_sample`: edit-friendly DDPM noise maps (Huberman-Spiegelglas et al. 2024).
* :func:`ode_invert` / :func:`ode_reconstruct`: exact probability-flow ODE inversion (DOP853, the reference).
* :func:`invert`, :func:`regenerate`, :func:`edit`: the editing API over all methods (also negative-prompt
  inversion, Miyake et al. 2023); ``simdiff edit`` is :mod:`simdiff.invert.cli`.
"""

from simdiff.invert.ddim import ddim_invert, invert_trajectory, land_invert, reconstruct
from simdiff.invert.ddpm_friendly import DDPMInversion, ddpm_invert, ddpm_sample
from simdiff.invert.edict import DEFAULT_MIXING, EdictState, edict_invert, edict_sample
from simdiff.invert.edit import METHODS, EditResult, Inversion, as_cond, edit, edit_grid, invert, regenerate
from simdiff.invert.nulltext import NullEmbedding, NullTextInversion, nulltext_invert, nulltext_sample
from simdiff.invert.ode import ode_invert, ode_reconstruct

__all__ = [
    "ddim_invert",
    "reconstruct",
    "invert_trajectory",
    "land_invert",
    "EdictState",
    "DEFAULT_MIXING",
    "edict_invert",
    "edict_sample",
    "NullEmbedding",
    "NullTextInversion",
    "nulltext_invert",
    "nulltext_sample",
    "DDPMInversion",
    "ddpm_invert",
    "ddpm_sample",
    "ode_invert",
    "ode_reconstruct",
    "METHODS",
    "Inversion",
    "EditResult",
    "as_cond",
    "edit_grid",
    "invert",
    "regenerate",
    "edit",
]
