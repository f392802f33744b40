"""Run under torchrun (2 ranks, gloo): dump one step's averaged gradients, then train a few steps.

    torchrun --nproc_per_node 2 tests/scripts/ddp_check.py OUT_DIR

Writes OUT_DIR/grads_rank{r}.safetensors (gradients after one forward_backward, plus the all-reduced loss) and
OUT_DIR/params_rank{r}.safetensors (weights after fit); rank r trains in OUT_DIR/run_rank{r} so the test can
check that only rank 0 wrote anything there.
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


def make(run_dir: Path, steps: int, rank: int, world: int) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=16, grad_accum=2, seed=3, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                      ema_half_life_images=64.0, checkpoint_every=2, log_every=1, progress=False, device="cpu")
    data = BatchIterator(make_data(), 16, seed=7, rank=rank, world_size=world)
    return Trainer(TinyNet(dropout=0.0), mse, data, cfg, run_dir)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    assert info.world_size == 2 and D.is_distributed()
    t = make(out / f"run_rank{info.rank}", 4, info.rank, info.world_size)
    loss = t.forward_backward(t._to_device(next(t.data)), step=0)
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters()}
    grads["__loss__"] = torch.tensor(loss, dtype=torch.float64)
    save_file(grads, str(out / f"grads_rank{info.rank}.safetensors"))
    t.optimizer.zero_grad(set_to_none=True)
    t = make(out / f"run_rank{info.rank}", 4, info.rank, info.world_size)
    t.fit()
    params = {k: v.contiguous() for k, v in t.model.state_dict().items()}
    save_file(params, str(out / f"params_rank{info.rank}.safetensors"))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
