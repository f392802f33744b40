"""Inversion of real images to latents and editing by re-generation (``simdiff.invert``, ``simdiff edit``).

* :func:`ddim_invert` / :func:`reconstruct`: deterministic inversion along a sampler grid (orders 1-3).
"""

from simdiff.invert.ddim import ddim_invert, invert_trajectory, land_invert, reconstruct

__all__ = ["ddim_invert", "reconstruct", "invert_trajectory", "land_invert"]
