"""Moment matching and EMD trained by the Trainer on a tiny 2-D mixture teacher, in one process or as one rank.

    torchrun --nproc_per_node 2 tests/scripts/distill_ddp_check.py OUT_DIR    (or: python ... OUT_DIR for 1 process)

Writes OUT_DIR/<method>_world<W>_rank<r>.safetensors with the student weights (``student.*``) and the loss object's
auxiliary state (``aux.*``: network and Adam moments) after :data:`STEPS` steps of global batch :data:`BATCH`.

For the runs to be comparable, each example must see the same random numbers whatever the number of processes:
the loss generator is re-seeded from the step alone (not the rank), and every draw the methods make through
``rand`` / ``randn`` / ``randint`` (all shaped ``[B, ...]``) is drawn for the global batch and this rank's rows are
kept (:func:`shared_noise`). The trainer's own per-rank seeding is left alone otherwise (the nets have no dropout).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from simdiff.distill import em as em_mod
from simdiff.distill import moment_matching as mm_mod
from simdiff.distill.em import DenoiserGenerator, EMDistillation
from simdiff.distill.moment_matching import MomentMatching
from simdiff.schedules import CosineSchedule
from simdiff.toy import GaussianMixture
from simdiff.toy_nets import MLPDenoiser
from simdiff.train import BatchIterator, OptimConfig, TrainConfig, Trainer, mix_seed
from simdiff.train import distributed as D

STEPS, BATCH = 3, 16
SCHED = CosineSchedule()
GM = GaussianMixture.random(2, 8, std=0.1, seed=0)


@contextlib.contextmanager
def shared_noise(rank: int, world: int) -> Iterator[None]:
    """Draw every ``[B, ...]`` random tensor for the global batch ``[B * world, ...]`` and keep this rank's rows."""
    saved = []
    for mod in (mm_mod, em_mod):
        for name in ("rand", "randn", "randint"):
            fn = getattr(mod, name, None)
            if fn is None:
                continue
            saved.append((mod, name, fn))

            def draw(*args, _fn=fn, _randint=name == "randint", **kw):
                if _randint:
                    high, shape = args
                else:
                    (shape,) = args
                shape = tuple(shape)
                full = (shape[0] * world, *shape[1:])
                out = _fn(high, full, **kw) if _randint else _fn(full, **kw)
                return out[rank * shape[0] : (rank + 1) * shape[0]]

            setattr(mod, name, draw)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


class StepSeeded:
    """Wraps a distillation loss: its generator is seeded from the step only (the same on every rank)."""

    def __init__(self, method) -> None:
        self.method, self.step = method, 0

    def set_step(self, step: int) -> None:
        self.step = step
        if hasattr(self.method, "set_step"):
            self.method.set_step(step)

    def aux_state_dict(self) -> dict[str, torch.Tensor]:
        return self.method.aux_state_dict()

    def load_aux_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.method.load_aux_state_dict(state)

    def __call__(self, model, batch, generator):
        generator.manual_seed(mix_seed("shared", self.step))
        return self.method(model, batch, generator)


def build(method: str):
    """(student, loss object) with the same initial weights in every process."""
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=32, depth=2)
    if method == "mm":
        student = net
        loss = MomentMatching(student, GM.denoise, SCHED, steps=2, aux_lr=1e-3)
    else:
        student = DenoiserGenerator(net, logsnr_star=-2.0)
        loss = EMDistillation(student, GM.denoise, SCHED, langevin_steps=2, aux_lr=1e-3)
    return student, loss


def run(method: str, rank: int, world: int, run_dir: Path) -> dict[str, torch.Tensor]:
    """Train ``method`` for :data:`STEPS` steps; return ``student.*`` weights and ``aux.*`` state on CPU."""
    student, loss = build(method)
    data = {"x": GM.sample(64, generator=torch.Generator().manual_seed(1))[0].float()}
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, seed=0, optim=OptimConfig(lr=1e-3, warmup_steps=0),
                      ema_half_life_images=0.0, checkpoint_every=0, log_every=1, progress=False, device="cpu")
    with shared_noise(rank, world):
        trainer = Trainer(student, StepSeeded(loss), BatchIterator(data, BATCH, seed=2, rank=rank, world_size=world),
                          cfg, run_dir)
        trainer.fit()
    out = {f"student.{k}": v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    out.update({f"aux.{k}": v.detach().clone().contiguous() for k, v in loss.aux_state_dict().items()})
    return out


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    for method in ("mm", "emd"):
        with tempfile.TemporaryDirectory() as d:
            # every rank trains in its own directory; only rank 0 writes into it
            state = run(method, info.rank, info.world_size, Path(d) / f"rank{info.rank}")
        save_file(copy.copy(state), str(out / f"{method}_world{info.world_size}_rank{info.rank}.safetensors"))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
