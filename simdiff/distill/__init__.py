"""Few-step distillation methods as loss objects (see :mod:`simdiff.distill.base` for the contract).

Progressive (Salimans & Ho 2022), guided (Meng et al. 2023) and multistep consistency (Heek et al. 2024)
distillation here; moment matching (:mod:`simdiff.distill.moment_matching`) and EM distillation
(:mod:`simdiff.distill.em`) in their modules. The aDDIM sampler (Heek et al. 2024, Algorithm 3) is
:mod:`simdiff.samplers.addim`; the students' samplers are registered in :data:`simdiff.samplers.SAMPLERS`.
"""

from simdiff.distill.base import DistillationLoss, frozen_copy, uniform_t_grid
from simdiff.distill.consistency import MultistepConsistency, pseudo_huber, teacher_steps_at
from simdiff.distill.guided import GuidanceDistillation, GuidedProgressiveDistillation, sample_stochastic
from simdiff.distill.progressive import ProgressiveDistillation, ProgressiveSchedule, next_round

__all__ = [
    "DistillationLoss",
    "frozen_copy",
    "uniform_t_grid",
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
