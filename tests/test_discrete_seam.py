"""The discrete sibling seam: a toy discrete process trains, checkpoints, reloads and samples through the same
experiment code as the Gaussian processes (objective, network builder and ``generate`` dispatch on the process)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from simdiff.cli import main
from simdiff.experiment import build_objective, load_config, load_model
from simdiff.generate import SampleConfig, generate
from simdiff.losses import LossConfig
from simdiff.nets import BACKBONES
from simdiff.processes import PROCESSES, DiscreteProcess, build_process, is_discrete
from simdiff.schedules import get_schedule

LEVELS = 4


class CoarseTokens:
    """A toy discrete process (not a published method): images quantised to ``LEVELS`` grey levels; at time ``t``
    each token is kept with probability ``1 - t`` and otherwise replaced by a uniform random token."""

    name = "coarse_tokens_test"

    def __init__(self, schedule, *, levels: int = LEVELS):
        self.schedule, self.levels, self.steps_taken = schedule, levels, 0

    def tokens(self, x):
        return ((x.clamp(-1, 1) + 1) / 2 * (self.levels - 1)).round().long()

    def to_data(self, tokens):
        return tokens.float() / (self.levels - 1) * 2 - 1

    def network_kwargs(self, data_shape, num_classes):
        return {"vocab_size": self.levels, "length": int(torch.Size(data_shape).numel())}

    def prior(self, shape, *, generator=None, device="cpu"):
        return torch.randint(self.levels, shape, generator=generator).to(device)

    def corrupt(self, x, t, generator=None):
        u = torch.rand(x.shape, generator=generator, device=x.device)
        noise = torch.randint(self.levels, x.shape, generator=generator, device=x.device)
        return torch.where(u < t.reshape(-1, *[1] * (x.dim() - 1)), noise, x)

    def loss(self, model, batch, generator=None):
        x = self.tokens(batch["x"])
        t = torch.rand(x.shape[0], generator=generator, device=x.device)
        logits = model(self.corrupt(x, t, generator), t)
        return F.cross_entropy(logits.movedim(-1, 1), x, reduction="none").flatten(1).mean(1)

    def step(self, model, x_t, *, t, s, generator=None, **cond):
        self.steps_taken += 1
        probs = model(x_t, t).softmax(-1)
        x0 = torch.multinomial(probs.reshape(-1, self.levels), 1, generator=generator).reshape(x_t.shape)
        return self.corrupt(x0, s, generator)


@dataclass(frozen=True)
class TokenMLPConfig:
    hidden: int = 16


class TokenMLP(nn.Module):
    """Token embedding + time -> per-token logits ``[B, *shape, vocab]`` (a test backbone)."""

    def __init__(self, cfg: TokenMLPConfig, *, vocab_size: int, length: int):
        super().__init__()
        self.vocab, self.embed = vocab_size, nn.Embedding(vocab_size, cfg.hidden)
        self.mix = nn.Linear(length * cfg.hidden + 1, length * vocab_size)

    def forward(self, x, t):
        h = torch.cat([self.embed(x).flatten(1), t.reshape(-1, 1).float()], 1)
        return self.mix(h).reshape(*x.shape, self.vocab)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PROCESSES, CoarseTokens.name, CoarseTokens)
    monkeypatch.setitem(BACKBONES, "token_mlp_test", (TokenMLPConfig, TokenMLP))


CONFIG = {
    "name": "tokens",
    "data": {"name": "digits", "image_size": 8},
    "model": {"arch": "token_mlp_test", "options": {"hidden": 8}},
    "diffusion": {"process": {"name": CoarseTokens.name}},
    "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 1, "progress": False},
    "sample": {"steps": 3, "num": 10},
}


def test_a_discrete_process_is_its_own_family(registered):
    proc = build_process({"name": CoarseTokens.name}, get_schedule("cosine"))
    assert isinstance(proc, DiscreteProcess) and is_discrete(proc)
    assert not is_discrete(build_process(None, get_schedule("cosine"))) and not is_discrete(None)
    objective = build_objective(LossConfig(process={"name": CoarseTokens.name}))
    assert objective.__self__.name == CoarseTokens.name  # the trainer's loss_fn is the process's own loss


def test_discrete_run_trains_reloads_and_samples(registered, tmp_path, capsys):
    cfg = tmp_path / "tokens.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    assert (run / "samples" / "final.png").is_file() and (run / "checkpoints" / "step_000003").is_dir()
    loaded = load_model(run)
    assert isinstance(loaded.model, TokenMLP) and is_discrete(loaded.process)
    assert loaded.model.mix.out_features == 64 * LEVELS  # built from the process's data arguments
    loaded.process.steps_taken = 0
    x = generate(loaded.model, loaded.schedule, loaded.image_shape, SampleConfig(steps=4, num=5, batch_size=3),
                 process=loaded.process)
    assert x.shape == (5, 1, 8, 8) and loaded.process.steps_taken == 4 * 2  # two batches of four steps
    grey = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    assert bool(((x[..., None] - grey).abs().amin(-1) < 1e-6).all())  # to_data of tokens: four grey levels only
    again = generate(loaded.model, loaded.schedule, loaded.image_shape, SampleConfig(steps=4, num=5, batch_size=3),
                     process=loaded.process)
    assert torch.equal(x, again)  # seeded
    with pytest.raises(ValueError, match="guidance is not available for the discrete process"):
        generate(loaded.model, loaded.schedule, loaded.image_shape, SampleConfig(steps=2, num=2, guidance=1.0),
                 process=loaded.process)
    assert load_config(cfg).diffusion.process == {"name": CoarseTokens.name}
