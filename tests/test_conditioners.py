"""Conditioners (class labels, none, frozen encoders) and the one null-conditioning substitution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simdiff.conditioners import ClassLabels, Conditioner, FrozenEncoder, NoCondition, null_conditioning
from simdiff.distill.guided import cfg_teacher_x
from simdiff.guidance import classifier_free_guidance
from simdiff.nets.denoiser import DiffusionModel
from simdiff.process import to_output
from simdiff.toy import GaussianMixture

F64 = torch.float64
NC = 3
GM = GaussianMixture.random(4, 6, num_classes=NC, std=0.3)


def _null_label_denoiser(z, logsnr, labels=None):
    """Exact mixture denoiser where ``labels == NC`` is unconditional (a network trained with label dropout)."""
    null = (labels == NC).reshape(-1, *([1] * (z.dim() - 1)))
    x = torch.where(null, GM.posterior_mean(z, logsnr), GM.posterior_mean(z, logsnr, labels.clamp(max=NC - 1)))
    return to_output("x", x, z=z, logsnr=logsnr)


def test_null_conditioning_semantics():
    labels = torch.tensor([0, 2, 1])
    ctx = torch.ones(3, 2, 4, dtype=F64)
    mask, flag = torch.ones(3, 2, dtype=torch.bool), object()
    cond = {"labels": labels, "context": ctx, "context_mask": mask, "flag": flag, "absent": None}
    out = null_conditioning(cond, {"labels": NC, "context": torch.zeros(1, 2, 4)}, batch=3)
    assert torch.equal(out["labels"], torch.full((3,), NC)) and out["labels"].dtype == labels.dtype
    assert out["context"].shape == (3, 2, 4) and out["context"].dtype == F64 and (out["context"] == 0).all()
    assert out["context_mask"] is mask and out["flag"] is flag and out["absent"] is None  # passed through
    assert cond["labels"] is labels  # the call's dict is not modified
    assert null_conditioning(cond, {"labels": None}, batch=3)["labels"] is None  # the denoiser's own null path
    assert null_conditioning(cond, {"absent": 7}, batch=3)["absent"] is None  # already unconditional


@pytest.mark.parametrize("cond, null, match", [
    ({"labels": torch.zeros(3)}, {"context": 0.0}, r"null_cond has \['context'\] but the call's conditioning"),
    ({"labels": torch.zeros(2)}, {"labels": 3}, r"'labels' must be a \[B=3, \.\.\.\] tensor"),
    ({"labels": 1}, {"labels": 3}, r"'labels' must be a \[B=3, \.\.\.\] tensor to be replaced, got int"),
    ({"labels": torch.zeros(3)}, {"labels": torch.tensor([1, 2])}, r"shape \(2,\) does not broadcast"),
])
def test_null_conditioning_errors(cond, null, match):
    with pytest.raises(ValueError, match=match):
        null_conditioning(cond, null, batch=3)


@pytest.mark.parametrize("null_cond, teacher", [({"labels": NC}, _null_label_denoiser),
                                                ({"labels": None}, GM.denoise)])
def test_both_call_sites_give_the_exact_guided_prediction(null_cond, teacher):
    """CFG (simdiff.guidance) and guided distillation's teacher target use the same substitution."""
    g = torch.Generator().manual_seed(0)
    z, labels = torch.randn(5, 4, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1])
    lam = torch.linspace(-3, 3, 5, dtype=F64)
    w = torch.full((5,), 2.0, dtype=F64)
    expect = 3.0 * GM.posterior_mean(z, lam, labels) - 2.0 * GM.posterior_mean(z, lam)
    got_distill = cfg_teacher_x(teacher, z, lam, w=w, cond={"labels": labels}, null_cond=null_cond)
    got_cfg = classifier_free_guidance(teacher, weight=2.0, null_cond=null_cond)(z, lam, labels=labels).x
    torch.testing.assert_close(got_distill, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_cfg, expect, rtol=1e-10, atol=1e-12)


def test_class_labels_and_no_condition():
    cl = ClassLabels(10)
    assert isinstance(cl, Conditioner) and isinstance(NoCondition(), Conditioner)
    out = cl({"x": torch.zeros(3), "labels": torch.tensor([1, 2, 3], dtype=torch.int32)})
    assert out["labels"].dtype == torch.long and out["labels"].tolist() == [1, 2, 3]
    assert cl.null(4)["labels"].tolist() == [10] * 4 and cl.null_cond == {"labels": 10}
    assert cl.identity() == {"name": "class_labels", "version": 1, "num_classes": 10}
    with pytest.raises(ValueError, match="no 'labels'"):
        cl({"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="num_classes >= 1"):
        ClassLabels(0)
    none = NoCondition()
    assert none({"labels": torch.zeros(2)}) == {} and none.null(3) == {} and none.null_cond == {}


class CountingEncoder(nn.Module):
    """A tiny 'text encoder': characters -> mean of embedding rows; counts how many keys it encoded."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.embed = nn.Embedding(128, dim)
        self.encoded: list[str] = []

    def forward(self, texts: list[str]) -> torch.Tensor:
        self.encoded.extend(texts)
        rows = [self.embed(torch.tensor([ord(c) for c in t] or [0])).mean(0) for t in texts]
        return torch.stack(rows)[:, None, :]  # [n, 1 token, dim]


class Captions(FrozenEncoder):
    def __init__(self, module: CountingEncoder, **kw):
        super().__init__(module, name="counting-encoder", version="0.1", batch_key="captions", cond_key="context",
                         **kw)

    def encode(self, keys):
        return self.module(keys)


class ContextBackbone(nn.Module):
    """A small trained backbone that uses a ``context [B, L, C]``."""

    num_classes = 0
    image_shape = (1, 2, 2)

    def __init__(self, dim: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 4)

    def forward(self, z, logsnr, labels=None, context=None, context_mask=None):
        return z + self.proj(context.mean(1)).reshape(z.shape)


def test_frozen_encoder_stays_outside_the_trained_model_and_caches_per_key():
    torch.manual_seed(0)
    module = CountingEncoder()
    enc = Captions(module)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    model = DiffusionModel(ContextBackbone(), "eps")
    params_before = [n for n, _ in model.named_parameters()]
    keys_before = set(model.state_dict())
    model.conditioner = enc  # even held by the model, its weights are not the model's
    assert [n for n, _ in model.named_parameters()] == params_before and set(model.state_dict()) == keys_before
    frozen = {id(p) for p in module.parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert not frozen & {id(p) for group in opt.param_groups for p in group["params"]}

    batch = {"captions": ["a cat", "a dog", "a cat", ""]}
    with torch.inference_mode():  # e.g. first seen while sampling: the cached rows are still ordinary tensors
        enc(batch)
    assert not any(row.is_inference() for row in enc._cache.values())
    cond = enc(batch)
    assert not cond["context"].is_inference()
    assert cond["context"].shape == (4, 1, 4) and module.encoded == ["a cat", "a dog", ""]  # one call per key
    torch.testing.assert_close(cond["context"][0], cond["context"][2], rtol=0, atol=0)
    cond2 = enc({"captions": ["a dog", "a bird", "a bird"]})
    assert module.encoded == ["a cat", "a dog", "", "a bird"]
    torch.testing.assert_close(cond2["context"][0], cond["context"][1], rtol=0, atol=0)

    # a training step through the embeddings: the model's weights move, the encoder's do not
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    z = torch.randn(4, 1, 2, 2)
    loss = model(z, torch.zeros(4), **cond).eps.pow(2).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in module.parameters())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())

    # null conditioning: the empty caption's embedding, also as guidance's null_cond
    null = enc.null(3)["context"]
    assert null.shape == (3, 1, 4) and torch.equal(null[1], cond["context"][3])
    assert enc.null_cond["context"].shape == (1, 1, 4)
    assert module.encoded == ["a cat", "a dog", "", "a bird"]  # "" came from the cache
    seen = []

    def denoise(z, logsnr, context=None):
        seen.append(context)
        return model(z, logsnr, context=context)

    classifier_free_guidance(denoise, weight=1.0, null_cond=enc.null_cond)(z, torch.zeros(4), context=cond["context"])
    assert seen[0].shape == (8, 1, 4) and torch.equal(seen[0][4:], null[:1].expand(4, 1, 4))
    ident = enc.identity()
    assert ident["name"] == "counting-encoder" and ident["version"] == "0.1" and ident["parameters"] == 128 * 4


def test_frozen_encoder_cache_limit_and_bad_encode():
    module = CountingEncoder()
    enc = Captions(module, max_cache=2)
    enc({"captions": ["a", "b"]})
    enc({"captions": ["c"]})
    enc({"captions": ["a"]})  # evicted: encoded again
    assert module.encoded == ["a", "b", "c", "a"]

    class Broken(FrozenEncoder):
        def encode(self, keys):
            return torch.zeros(len(keys) + 1, 2)

    with pytest.raises(ValueError, match="encode returned"):
        Broken(nn.Linear(1, 1), name="b", version="0", batch_key="k", cond_key="c")({"k": ["x"]})
    with pytest.raises(ValueError, match="no 'captions'"):
        enc({"labels": torch.zeros(1)})
