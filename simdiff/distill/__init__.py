"""Few-step distillation methods as loss objects (see :mod:`simdiff.distill.base` for the contract).

Progressive (Salimans & Ho 2022), guided (Meng et al. 2023) and multistep consistency (Heek et al. 2024)
distillation, and the aDDIM sampler (Heek et al. 2024, Algorithm 3).
"""

from simdiff.distill.addim import addim_step, analytic_x_var, estimated_x_var, sample_addim
from simdiff.distill.base import DistillationLoss, ddim_sample, frozen_copy, uniform_t_grid
from simdiff.distill.consistency import MultistepConsistency, pseudo_huber, teacher_steps_at
from simdiff.distill.guided import GuidanceDistillation, GuidedProgressiveDistillation, sample_stochastic
from simdiff.distill.progressive import ProgressiveDistillation, ProgressiveSchedule, next_round

__all__ = [
    "DistillationLoss",
    "ddim_sample",
    "frozen_copy",
    "uniform_t_grid",
    "addim_step",
    "analytic_x_var",
    "estimated_x_var",
    "sample_addim",
    "ProgressiveDistillation",
    "ProgressiveSchedule",
    "next_round",
    "GuidanceDistillation",
    "GuidedProgressiveDistillation",
    "sample_stochastic",
    "MultistepConsistency",
    "pseudo_huber",
    "teacher_steps_at",
]
