"""aDDIM (Heek, Hoogeboom & Salimans 2024, Algorithm 3) for the distillation methods: the step, the x-variance
estimates and the sampler live in :mod:`simdiff.samplers.addim` (aDDIM is also a core sampler, ``"addim"``)."""

from simdiff.samplers.addim import addim_step, analytic_x_var, estimated_x_var, sample_addim

__all__ = ["addim_step", "analytic_x_var", "estimated_x_var", "sample_addim"]
