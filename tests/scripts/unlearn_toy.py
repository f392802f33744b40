"""The unlearning test bed: a class-conditional MLP denoiser fitted to an exact 2-D Gaussian mixture (one component per
class, at the corners of a square), forget / retain pools drawn from the mixture, unlearning through the trainer, and
the nearest-component judge."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from simdiff.conditioners import ClassLabels
from simdiff.eval.unlearning import forgetting_rate, integrity_score, nearest_component_judge
from simdiff.generate import SampleConfig, generate
from simdiff.process import to_output
from simdiff.schedules import schedule_from_dict
from simdiff.toy import GaussianMixture
from simdiff.toy_nets import MLPDenoiser, fit_denoiser
from simdiff.train import BatchIterator, TrainConfig, Trainer
from simdiff.train.config import OptimConfig
from simdiff.unlearn import PairedPools, Pool, build_unlearn_loss

K = 4
MEANS = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
SAMPLER = SampleConfig(sampler="ddim", steps=16, grid="uniform_t", num=128, seed=1)


def mixture() -> GaussianMixture:
    return GaussianMixture(MEANS.clone(), 0.02)


def schedule():
    return schedule_from_dict({"name": "cosine"})


def fit_teacher(steps: int = 250, seed: int = 0):
    """``(net, mixture, schedule)``: the MLP regressed on the exact (conditional and, for the null label K,
    unconditional) posterior mean."""
    mix, sched = mixture(), schedule()
    torch.manual_seed(seed)
    net = MLPDenoiser(2, hidden=64, depth=2, num_classes=K)

    def batch(g):
        lab = torch.randint(0, K + 1, (64,), generator=g)
        return {"x": torch.zeros(64, 2), "labels": lab}

    def exact(z, lam, labels=None, **_):
        cond = mix.posterior_mean(z, lam, labels.clamp(max=K - 1))
        uncond = mix.posterior_mean(z, lam, None)
        return to_output("x", torch.where((labels == K)[:, None], uncond, cond), z=z, logsnr=lam)

    def sample_batch(g):
        b = batch(g)
        x, _ = mix.sample(64, generator=g, labels=b["labels"].clamp(max=K - 1))
        xu, _ = mix.sample(64, generator=g)
        b["x"] = torch.where((b["labels"] == K)[:, None], xu, x).float()
        return b

    fit_denoiser(net, exact, sched, sample_batch, steps=steps, lr=3e-3, seed=seed)
    return net.eval().requires_grad_(False), mix, sched


def pools(mix, *, forget: int = 0, anchor: int = 1, n: int = 256, seed: int = 5) -> tuple[Pool, Pool]:
    g = torch.Generator().manual_seed(seed)
    xf, _ = mix.sample(n, generator=g, labels=torch.full((n,), forget))
    retain = torch.tensor([c for c in range(K) if c != forget]).repeat(n)[:n]
    xr, _ = mix.sample(n, generator=g, labels=retain)
    fpool = Pool(xf.float(), {"labels": torch.full((n,), forget)}, {"labels": torch.full((n,), anchor)})
    return fpool, Pool(xr.float(), {"labels": retain})


def bed():
    """``(teacher net, mixture, schedule, forget pool, retain pool)``: the test bed both unlearning test files use."""
    net, mix, sched = fit_teacher()
    fpool, rpool = pools(mix)
    return net, mix, sched, fpool, rpool


def unlearn_toy(method: str, net, sched, fpool: Pool, rpool: Pool, run_dir: Path, *, steps: int = 150,
                lr: float = 1e-3, checkpoint_every: int = 0, **params):
    """Fine-tune a copy of ``net`` with ``method`` through the trainer; returns ``(student, loss)``."""
    student = copy.deepcopy(net).train().requires_grad_(True)
    mask_batch = {k: v[:64] for k, v in fpool.tensors("f_").items()}
    loss = build_unlearn_loss(method, student, net, sched, null_cond=ClassLabels(K).null(1), params=params,
                              mask_batch=mask_batch)
    cfg = TrainConfig(steps=steps, batch_size=32, ema_half_life_images=0, checkpoint_every=checkpoint_every,
                      log_every=0, progress=False, optim=OptimConfig(lr=lr, warmup_steps=0))
    Trainer(student, loss, BatchIterator(PairedPools(fpool, rpool), 32, seed=0), cfg, run_dir).fit()
    return student.eval().requires_grad_(False), loss


def samples(model, sched, labels: torch.Tensor) -> torch.Tensor:
    return generate(model, sched, (2,), SAMPLER, num=len(labels), labels=labels, num_classes=K)


def class_rate(model, sched, cls: int, n: int = 128) -> float:
    """How often samples of ``cls`` land nearest a component of ``cls``."""
    labels = torch.full((n,), cls)
    return forgetting_rate(samples(model, sched, labels), labels.tolist(), nearest_component_judge(mixture()))


def retain_integrity(original, model, sched, *, forget: int = 0, n: int = 120) -> dict[str, float]:
    labels = torch.tensor([c for c in range(K) if c != forget]).repeat(n)[:n]
    return integrity_score(samples(original, sched, labels), samples(model, sched, labels), features="pixel",
                           num_boot=200)
