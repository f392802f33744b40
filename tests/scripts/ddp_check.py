"""Run under torchrun (2 ranks, gloo): DDP and FSDP checks in one launch (torchrun start-up is the slow part).

    torchrun --nproc_per_node 2 tests/scripts/ddp_check.py OUT_DIR

DDP: writes OUT_DIR/grads_rank{r}.safetensors (gradients after one forward_backward, plus the all-reduced loss) and
OUT_DIR/params_rank{r}.safetensors (weights after fit); rank r trains in OUT_DIR/run_rank{r} so the test can
check that only rank 0 wrote anything there.

FSDP (``strategy="fsdp"``): run A trains 4 steps in OUT_DIR/fsdp_rank{r} (only rank 0 may write) with a hook that
dumps the weights it sees to fsdp_hook_step{k}.safetensors; fsdp_params.safetensors holds A's gathered weights and
fsdp_local_rank{r}.safetensors each rank's shard. In shared run dirs: fsdp_resume (FSDP 2 steps, then resumed under
FSDP to 4), ddp_to_fsdp (DDP 2 steps, FSDP to 4), fsdp_to_ddp (FSDP 2 steps, DDP to 4).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from simdiff.train import BatchIterator, OptimConfig, TrainConfig, Trainer
from simdiff.train import distributed as D

sys.path.insert(0, str(Path(__file__).parent))
from tiny_train import TinyNet, make_data  # noqa: E402


def mse(m, b, g):
    return (m(b["x"]) - b["y"]).pow(2).mean(1)


def make(run_dir: Path, steps: int, rank: int, world: int, *, strategy: str = "ddp", hooks=()) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=16, grad_accum=2, seed=3, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                      ema_half_life_images=64.0, checkpoint_every=2, log_every=1, sample_every=2, progress=False,
                      device="cpu", strategy=strategy)
    data = BatchIterator(make_data(), 16, seed=7, rank=rank, world_size=world)
    return Trainer(TinyNet(dropout=0.0), mse, data, cfg, run_dir, hooks=hooks)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def ddp_checks(out: Path, rank: int) -> None:
    t = make(out / f"run_rank{rank}", 4, rank, 2)
    loss = t.forward_backward(t._to_device(next(t.data)), step=0)
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters()}
    grads["__loss__"] = torch.tensor(loss, dtype=torch.float64)
    save_file(grads, str(out / f"grads_rank{rank}.safetensors"))
    t.optimizer.zero_grad(set_to_none=True)
    t = make(out / f"run_rank{rank}", 4, rank, 2)
    t.fit()
    save_file(_contiguous(t.model.state_dict()), str(out / f"params_rank{rank}.safetensors"))


def fsdp_checks(out: Path, rank: int) -> None:
    def hook(trainer: Trainer, step: int) -> None:
        sd = _contiguous(trainer.model.state_dict())
        sd["__sharded__"] = torch.tensor(float(D.is_sharded(trainer.model)))
        sd["__training__"] = torch.tensor(float(trainer.model.training))
        save_file(sd, str(out / f"fsdp_hook_step{step}.safetensors"))

    a = make(out / f"fsdp_rank{rank}", 4, rank, 2, strategy="fsdp", hooks=[hook])
    assert D.is_sharded(a.model) and a.sharded
    a.fit()
    local = {n: p.to_local().contiguous() for n, p in a.model.named_parameters()}
    save_file(local, str(out / f"fsdp_local_rank{rank}.safetensors"))
    full = D.full_model_state_dict(a.model)
    if rank == 0:
        save_file(_contiguous(full), str(out / "fsdp_params.safetensors"))
    for name, first, second in (("fsdp_resume", "fsdp", "fsdp"), ("ddp_to_fsdp", "ddp", "fsdp"),
                                ("fsdp_to_ddp", "fsdp", "ddp")):
        make(out / name, 2, rank, 2, strategy=first).fit()
        resumed = make(out / name, 4, rank, 2, strategy=second)
        summary = resumed.fit()
        assert summary["resumed_from"] == 2, summary


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    assert info.world_size == 2 and D.is_distributed()
    ddp_checks(out, info.rank)
    fsdp_checks(out, info.rank)
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
