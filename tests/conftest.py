"""Test-wide settings: one intra-op thread per worker (pytest-xdist runs one worker per core; more threads only
oversubscribe the CPU and make small tensor ops slower)."""

import pytest
import torch

torch.set_num_threads(1)


class ConditionalMixture:
    """A 2-class, 8-component 2-D Gaussian mixture with its exact class-conditional teacher (``labels == 2`` is the
    null label) and an MLP fitted to that teacher: the "pretrained class-conditional network" students start from."""

    def __init__(self) -> None:
        from simdiff.distill.moment_matching import NullLabelMixture
        from simdiff.schedules import CosineSchedule
        from simdiff.toy import GaussianMixture
        from simdiff.toy_nets import MLPDenoiser, fit_denoiser

        self.schedule = CosineSchedule()
        self.mixture = GaussianMixture.random(2, 8, std=0.1, num_classes=2, seed=3)
        self.teacher = NullLabelMixture(self.mixture)
        torch.manual_seed(0)
        net = MLPDenoiser(2, hidden=64, depth=2, num_classes=2)
        self.fitted = fit_denoiser(net, self.teacher, self.schedule, self.batch, steps=400, lr=3e-3)

    def batch(self, g: torch.Generator, n: int = 256) -> dict:
        x, labels = self.mixture.sample(n, generator=g)
        return {"x": x.float(), "labels": labels}

    def per_class_sw(self, x: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> float:
        """Sliced W2 to ``ref`` averaged over the two classes (same projections for every call)."""
        from simdiff.toy import sliced_wasserstein

        return sum(float(sliced_wasserstein(x[labels == c].double(), ref[labels == c].double(),
                                            generator=torch.Generator().manual_seed(5))) for c in (0, 1)) / 2


@pytest.fixture(scope="session")
def conditional_mixture() -> ConditionalMixture:
    return ConditionalMixture()
