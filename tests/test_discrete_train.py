"""Masked discrete diffusion end to end: byte-level text data split by file, a tiny ``simdiff train`` on
``text_masked.yaml`` that samples text, the samplers through ``generate``, MNIST-style image tokens (4 levels,
class-conditional) and the autoregressive baseline through the same Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simdiff.cli import main
from simdiff.configuration import ConfigError
from simdiff.data import build_dataset
from simdiff.data.text import split_of
from simdiff.discrete import AutoregressiveLM, MaskedDiffusion, TokenTransformer, TokenTransformerConfig, decode_text
from simdiff.experiment import load_model
from simdiff.generate import SampleConfig, generate
from simdiff.processes import build_process, is_discrete
from simdiff.train import BatchIterator, Trainer
from simdiff.train.config import TrainConfig

CONFIGS = Path(__file__).parents[1] / "simdiff" / "configs"
TINY = ["train.steps=6", "train.batch_size=8", "train.log_every=3", "train.sample_every=0", "train.progress=false",
        "train.checkpoint_every=6", "model.options.dim=32", "model.options.depth=1", "model.options.num_heads=2",
        "sample.steps=4", "sample.num=3", "data.options.seq_len=32"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i in range(40):
        path = root / ("pkg" if i % 2 else "") / f"m{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}(x):\n    return x * {i}  # ü\n" * 4)
    (root / "test").mkdir()
    (root / "test" / "skipped.py").write_text("SKIP" * 100)
    return root


def test_text_is_split_by_file_deterministically(corpus):
    opts = {"seq_len": 16}
    parts = {s: build_dataset({"name": "text", "split": s, "root": str(corpus), "options": opts})
             for s in ("train", "valid", "test")}
    files = {s: sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("m*.py") if split_of(
        p.relative_to(corpus).as_posix()) == s) for s in parts}
    assert sum(len(f) for f in files.values()) == 40 and all(parts[s].info["files"] == len(files[s]) for s in parts)
    train = parts["train"]
    assert train.storage.dtype == torch.uint8 and train.shape == (1, 1, 16)
    stream = b"".join((corpus / f).read_bytes() + b"\n" for f in files["train"])
    assert bytes(train.storage[:3].reshape(-1).tolist()) == stream[:48]  # the bytes, exactly, in path order
    tokens = MaskedDiffusion(levels=256).tokens(train[torch.arange(3)]["x"])
    assert torch.equal(tokens.to(torch.uint8), train.storage[:3])  # batches map back to the bytes exactly
    assert b"SKIP" not in stream and split_of("a/b.py") == split_of("a/b.py")
    with pytest.raises(ConfigError, match="unknown option"):
        build_dataset({"name": "text", "root": str(corpus), "options": {"seq_length": 16}})


def test_tiny_text_run_trains_and_samples_text(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(CONFIGS / "text_masked.yaml"), "--run-dir", str(run), *_sets(TINY)]) == 0
    text = (run / "samples" / "final.txt").read_text(encoding="utf-8")
    assert text.count("--- sample") == 3 and (run / "samples" / "final.png").is_file()
    loaded = load_model(run)
    assert isinstance(loaded.model, TokenTransformer) and is_discrete(loaded.process)
    assert loaded.image_shape == (1, 1, 32)
    x = generate(loaded.model, loaded.schedule, loaded.image_shape, SampleConfig(steps=8, num=4),
                 process=loaded.process)
    assert x.shape == (4, 1, 1, 32) and all(len(s) >= 1 for s in decode_text(x))
    assert torch.allclose(torch.round((x + 1) * 127.5), (x + 1) * 127.5, atol=1e-4)  # bytes
    out = loaded.process.save_samples(x, tmp_path / "s.png")
    assert out.is_file() and (tmp_path / "s.txt").read_text(encoding="utf-8").count("--- sample") == 4
    # the first-hitting sampler through generate: one token per call, L calls, nothing left masked
    fh = MaskedDiffusion(levels=256, masking="log_linear", sampler="first_hitting")
    calls = []

    def counted(x_t, t, **cond):
        calls.append(int((x_t == fh.mask_id).sum()))
        return loaded.model(x_t, t, **cond)

    y = generate(counted, None, loaded.image_shape, SampleConfig(steps=32, num=2), process=fh)
    assert len(calls) == 32 and calls == [2 * (32 - i) for i in range(32)]
    assert torch.allclose(torch.round((y + 1) * 127.5), (y + 1) * 127.5, atol=1e-4)
    calls.clear()
    fh4 = MaskedDiffusion(levels=256, sampler="first_hitting", tokens_per_call=4)
    generate(counted, None, loaded.image_shape, SampleConfig(steps=5, num=2), process=fh4)
    assert calls == [64, 56, 48, 40, 32]  # four per call, the rest at the last step


def test_image_tokens_four_levels_class_conditional():
    proc = build_process({"name": "masked", "levels": 4, "masking": "cosine"}, None)
    x = torch.tensor([[-1.0, -0.4, 0.2, 1.0]])
    assert proc.tokens(x).tolist() == [[0, 1, 2, 3]] and torch.allclose(proc.to_data(proc.tokens(x)),
                                                                       torch.tensor([[-1.0, -1 / 3, 1 / 3, 1.0]]))
    kw = proc.network_kwargs((1, 8, 8), 10)
    net = TokenTransformer(TokenTransformerConfig(dim=16, depth=1, num_heads=2), **kw)
    batch = {"x": torch.rand(6, 1, 8, 8) * 2 - 1, "labels": torch.arange(6)}
    loss = proc.loss(net, batch, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and bool(torch.isfinite(loss).all())
    imgs = generate(net, None, (1, 8, 8), SampleConfig(steps=3, num=4), labels=torch.arange(4), process=proc)
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    assert imgs.shape == (4, 1, 8, 8) and bool(((imgs[..., None] - levels).abs().amin(-1) < 1e-6).all())
    for bad, match in (({"masking": "sqrt"}, "unknown mask schedule"), ({"levels": 300}, "levels"),
                       ({"sampler": "euler"}, "unknown sampler"), ({"precision": "half"}, "unknown precision")):
        with pytest.raises(ConfigError, match=match):
            build_process({"name": "masked", **bad}, None)


def test_autoregressive_baseline_trains_with_the_same_trainer(tmp_path):
    ar = AutoregressiveLM(levels=256)
    cfg = TokenTransformerConfig(dim=32, depth=1, num_heads=2, causal=True)
    net = TokenTransformer(cfg, **ar.network_kwargs((1, 1, 16)))
    x = torch.randint(256, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 256
    torch.nn.init.normal_(net.head.weight)
    a, b = net(ar._inputs(x)), net(ar._inputs(y))
    assert torch.equal(a[:, :11], b[:, :11]) and not torch.equal(a[:, 11:], b[:, 11:])  # causal
    data = {"x": torch.randint(256, (64, 1, 1, 16)).float() / 127.5 - 1}
    tcfg = TrainConfig(steps=4, batch_size=8, log_every=2, checkpoint_every=0, progress=False,
                       ema_half_life_images=0)
    trainer = Trainer(net, ar.loss, BatchIterator(data, 8), tcfg, tmp_path / "ar")
    summary = trainer.fit()
    assert summary["step"] == 4 and torch.isfinite(torch.tensor(summary["loss"]))
    toks = ar.tokens(data["x"][:4])
    nll = ar.nll(net, toks)
    assert nll.shape == (4,) and torch.allclose(nll, ar.loss(net, {"x": data["x"][:4]}))
    s = ar.sample(net, 3, 16, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 16) and int(s.max()) < 256


def test_cli_sample_writes_text_and_takes_the_discrete_sampler_flags(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(CONFIGS / "text_masked.yaml"), "--run-dir", str(run), *_sets(TINY)]) == 0
    out = tmp_path / "fh.png"
    assert main(["sample", str(run), "--discrete-sampler", "first_hitting", "--steps", "32", "--num", "2",
                 "--out", str(out)]) == 0
    assert "first_hitting (float64)" in capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".txt").read_text(encoding="utf-8").count("--- sample") == 2
    for flags, needle in ((["--tokens-per-call", "0"], "--tokens-per-call"), (["--precision", "float16"], "precision")):
        assert main(["sample", str(run), "--out", str(tmp_path / "bad.png"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0 and not (tmp_path / "bad.png").exists(), err
    assert main(["sample", "pretrained", "--discrete-sampler", "first_hitting", "--out", str(tmp_path / "p.png")]) == 2
    assert "masked discrete diffusion models only" in capsys.readouterr().err
