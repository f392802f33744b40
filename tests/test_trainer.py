"""Trainer, schedules, EMA and BatchIterator tests (CPU, tiny MLP on synthetic tensors)."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from simdiff.configuration import ConfigError, from_dict
from simdiff.train import (
    EMA,
    BatchIterator,
    NonFiniteError,
    OptimConfig,
    TrainConfig,
    Trainer,
    ema_decay,
    list_checkpoints,
    load_latest,
    lr_at,
    rundir,
)
from simdiff.train.logging import read_metrics

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_train import TinyNet, make_data, noisy_loss  # noqa: E402


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=8, seed=1, optim=OptimConfig(lr=1e-2, warmup_steps=0), ema_half_life_images=80.0,
                checkpoint_every=0, log_every=1, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ schedules
def test_lr_schedule_values():
    o = OptimConfig(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    lin = OptimConfig(lr=2.0, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_at(25, lin, 100) == pytest.approx(1.5)
    rs = OptimConfig(lr=1.0, warmup_steps=4, decay="rsqrt")
    assert lr_at(3, rs, 100) == pytest.approx(1.0) and lr_at(15, rs, 100) == pytest.approx(0.5)
    assert lr_at(50, OptimConfig(lr=3.0, warmup_steps=0, decay="none"), 100) == 3.0
    with pytest.raises(ConfigError, match="decay"):
        from_dict(TrainConfig, {"optim": {"decay": "exp"}})


def test_ema_half_life_math():
    # After half_life / batch steps the old weight is exactly halved.
    d = ema_decay(64, 6400.0)
    assert d == 0.5 ** (64 / 6400)
    assert d ** (6400 // 64) == pytest.approx(0.5, rel=1e-12)
    assert ema_decay(64, 0.0) == 0.0
    assert ema_decay(64, 1000.0, images_seen=100, rampup_ratio=0.5) == 0.5 ** (64 / 50)


def test_ema_update_swap_and_state():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(m)
    w0 = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update(m, 0.75)
    assert torch.allclose(ema.shadow["0.weight"], w0 + 0.25)
    assert ema.shadow["0.weight"].dtype == torch.float32
    live = m[0].weight.detach().clone()
    with ema.swapped(m):
        assert torch.allclose(m[0].weight, w0 + 0.25)
    assert torch.equal(m[0].weight, live)
    fresh = EMA(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="shape"):
        EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).load_state_dict(ema.state_dict())


# ------------------------------------------------------------------------------------------- BatchIterator
def test_batch_iterator_determinism_sharding_and_resume():
    data = {"x": torch.arange(20).float()[:, None], "i": torch.arange(20)}
    a, b = BatchIterator(data, 6, seed=5), BatchIterator(data, 6, seed=5)
    seq_a = [next(a)["i"] for _ in range(7)]
    assert all(torch.equal(u, next(b)["i"]) for u in seq_a)
    epoch0 = torch.cat(seq_a[:3])
    assert len(set(epoch0.tolist())) == 18  # drop_last: 3 batches of 6 from 20, no repeats inside an epoch
    assert not torch.equal(epoch0, torch.cat(seq_a[3:6]))  # new permutation per epoch
    assert not torch.equal(torch.cat([next(BatchIterator(data, 6, seed=6))["i"]]), seq_a[0])
    # shards: disjoint and their concatenation is the single-process batch
    shards = [BatchIterator(data, 6, seed=5, rank=r, world_size=3) for r in range(3)]
    for t in range(4):
        parts = [next(s)["i"] for s in shards]
        assert all(len(p) == 2 for p in parts)
        assert torch.equal(torch.cat(parts), seq_a[t])
    # state round trip
    c = BatchIterator(data, 6, seed=5)
    for _ in range(4):
        next(c)
    state = c.state_dict()
    assert state == {"epoch": 1, "position": 1}
    d = BatchIterator(data, 6, seed=5)
    d.load_state_dict(state)
    assert torch.equal(next(d)["i"], seq_a[4])
    with pytest.raises(ValueError, match="out of range"):
        d.load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchIterator(data, 32)


def test_batch_iterator_transform_generator_is_deterministic():
    data = {"x": torch.zeros(8, 2)}

    def jitter(batch, g):
        return {"x": batch["x"] + torch.randn(batch["x"].shape, generator=g)}

    a = BatchIterator(data, 4, transform=jitter)
    first = [next(a)["x"] for _ in range(3)]
    b = BatchIterator(data, 4, transform=jitter)
    b.load_state_dict({"epoch": 0, "position": 1})
    assert torch.equal(next(b)["x"], first[1]) and not torch.equal(first[0], first[1])


# ------------------------------------------------------------------------------------------------ training
def test_overfit_loss_falls_10x(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    data = BatchIterator(make_data(n=8), 8, seed=0)
    cfg = _cfg(steps=150, optim=OptimConfig(lr=1e-2, warmup_steps=5), log_every=10)
    out = Trainer(model, noisy_loss, data, cfg, tmp_path).fit()
    rows = read_metrics(tmp_path / "metrics.csv")
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < first / 10, (first, last)
    assert out["step"] == 150 and out["images_seen"] == 1200
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000150"]


def test_grad_accum_matches_full_batch(tmp_path):
    params = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = TinyNet(dropout=0.0)
        cfg = _cfg(steps=3, grad_accum=accum, ema_half_life_images=0.0)
        Trainer(model, lambda m, b, g: (m(b["x"]) - b["y"]).pow(2).mean(1), BatchIterator(make_data(), 8), cfg,
                tmp_path / str(accum)).fit()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)


def test_in_process_resume_is_bit_identical(tmp_path):
    class Crash(Exception):
        pass

    def run(run_dir, crash_at=None):
        torch.manual_seed(0)
        calls = []

        def loss_fn(m, b, g):
            calls.append(1)
            if len(calls) == crash_at:
                raise Crash
            return noisy_loss(m, b, g)

        cfg = _cfg(steps=14, checkpoint_every=4, optim=OptimConfig(lr=5e-3, warmup_steps=2, decay="cosine"))
        return Trainer(TinyNet(), loss_fn, BatchIterator(make_data(), 8, seed=2), cfg, run_dir).fit()

    run(tmp_path / "full")
    with pytest.raises(Crash):
        run(tmp_path / "cut", crash_at=11)  # dies in step 11 (checkpoints at 4, 8; rows up to step 10 logged)
    assert len(read_metrics(tmp_path / "cut" / "metrics.csv")) == 10
    out = run(tmp_path / "cut")
    assert out["resumed_from"] == 8
    full, cut = read_metrics(tmp_path / "full" / "metrics.csv"), read_metrics(tmp_path / "cut" / "metrics.csv")
    key = ("step", "loss", "lr", "grad_norm")
    assert [tuple(r[k] for k in key) for r in full] == [tuple(r[k] for k in key) for r in cut]
    a, b = load_latest(tmp_path / "full"), load_latest(tmp_path / "cut")
    assert all(torch.equal(a.model[k], b.model[k]) and torch.equal(a.ema[k], b.ema[k]) for k in a.model)


def test_resume_inside_a_logging_window_logs_what_the_uninterrupted_run_logs(tmp_path):
    """log_every=3 with checkpoints every 4 steps: the run resumed from step 8 logs at step 9 the mean over steps
    7-9, as the uninterrupted run does (the window's float64 sum and count are in the checkpoint)."""
    class Crash(Exception):
        pass

    def run(run_dir, crash_at=None):
        torch.manual_seed(0)
        calls = []

        def loss_fn(m, b, g):
            calls.append(1)
            assert rundir.lock_holder(run_dir) == os.getpid()  # fit() owns the run directory
            if len(calls) == crash_at:
                raise Crash
            return noisy_loss(m, b, g)

        cfg = _cfg(steps=12, checkpoint_every=4, log_every=3)
        return Trainer(TinyNet(), loss_fn, BatchIterator(make_data(), 8, seed=2), cfg, run_dir).fit()

    run(tmp_path / "full")
    with pytest.raises(Crash):
        run(tmp_path / "cut", crash_at=11)
    assert not (tmp_path / "cut" / rundir.LOCK_NAME).exists()  # released on the way out
    assert load_latest(tmp_path / "cut").state["loss_window"]["count"] == 2  # steps 7 and 8
    assert run(tmp_path / "cut")["resumed_from"] == 8
    full, cut = read_metrics(tmp_path / "full" / "metrics.csv"), read_metrics(tmp_path / "cut" / "metrics.csv")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert [r["step"] for r in full] == ["3", "6", "9", "12"] and drop(full) == drop(cut)


def test_train_options_are_validated_with_their_full_names(tmp_path):
    for bad, needle in [(dict(optim=OptimConfig(grad_clip=math.nan)), "train.optim.grad_clip must be a finite number "
                                                                     ">= 0, got nan"),
                        (dict(optim=OptimConfig(lr=math.inf)), "train.optim.lr must be a finite number > 0, got inf"),
                        (dict(optim=OptimConfig(betas=(0.9, 1.5))), "train.optim.betas"),
                        (dict(ema_half_life_images=-1.0), "train.ema_half_life_images"),
                        (dict(log_every=-2), "train.log_every must be an integer >= 0"),
                        (dict(device="gpu"), "train.device")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8, seed=2), _cfg(**bad), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_nan_steps_are_skipped_and_params_unchanged(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    bad_steps, seen, snapshots = {3, 4, 7}, [], {}

    def loss_fn(m, b, g):
        step = len(seen)
        seen.append(step)
        snapshots[step] = [p.detach().clone() for p in model.parameters()]
        loss = noisy_loss(m, b, g)
        return loss * math.nan if step in bad_steps else loss

    out = Trainer(model, loss_fn, BatchIterator(make_data(), 8), _cfg(steps=10, max_nonfinite=3), tmp_path).fit()
    assert out["nonfinite_total"] == 3 and out["step"] == 10
    for s in (3, 4, 7):  # the update made at step s is skipped: params entering s+1 equal those entering s
        assert all(torch.equal(a, b) for a, b in zip(snapshots[s], snapshots[s + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[5], snapshots[6]))
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[3]["loss"] == "nan" and rows[-1]["nonfinite"] == "3"
    assert math.isfinite(float(rows[-1]["loss"]))


def test_too_many_nan_aborts_without_nan_checkpoint(tmp_path):
    torch.manual_seed(0)

    calls = []

    def loss_fn(m, b, g):
        calls.append(1)
        loss = noisy_loss(m, b, g)
        return loss + math.inf if len(calls) > 6 else loss  # steps 6, 7, 8, 9 are non-finite

    cfg = _cfg(steps=30, checkpoint_every=2, max_nonfinite=4)
    with pytest.raises(NonFiniteError, match="4 consecutive non-finite") as err:
        Trainer(TinyNet(), loss_fn, BatchIterator(make_data(), 8), cfg, tmp_path).fit()
    assert "\n" not in str(err.value)
    ckpts = list_checkpoints(tmp_path)
    assert ckpts[-1].name == "step_000008"  # skipped updates leave finite weights; nothing after the abort
    last = load_latest(tmp_path)
    assert all(torch.isfinite(t).all() for t in [*last.model.values(), *last.ema.values()])


def test_hooks_get_ema_weights_on_schedule(tmp_path):
    torch.manual_seed(0)
    calls = []

    def hook(trainer, step):
        ema_w = trainer.ema.shadow["net.0.weight"]
        calls.append((step, torch.equal(trainer.model.net[0].weight, ema_w), trainer.model.training))

    cfg = _cfg(steps=6, sample_every=3)
    t = Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8), cfg, tmp_path, hooks=[hook])
    t.fit()
    assert calls == [(3, True, False), (6, True, False)]
    assert not torch.equal(t.model.net[0].weight, t.ema.shadow["net.0.weight"])  # live weights restored
    assert t.model.training


def test_bf16_on_cpu_runs_and_bad_config_is_refused(tmp_path):
    torch.manual_seed(0)
    out = Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8), _cfg(steps=3, bf16=True), tmp_path).fit()
    assert math.isfinite(out["loss"])
    with pytest.raises(ValueError, match="compile=True is supported on CUDA only"):
        Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8), _cfg(compile=True), tmp_path / "c")
    with pytest.raises(ValueError, match="batch_size, rank, world_size"):
        Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 16), _cfg(), tmp_path / "d")
    with pytest.raises(ConfigError, match="not divisible"):
        Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8), _cfg(grad_accum=3), tmp_path / "e")
    with pytest.raises(ValueError, match=r"shape \(8,\), got \(\)"):
        Trainer(TinyNet(), lambda m, b, g: noisy_loss(m, b, g).mean(), BatchIterator(make_data(), 8),
                _cfg(steps=1), tmp_path / "f").fit()


# ------------------------------------------------------------------------------- device-side skip, no host syncs
def _nan_run(run_dir, *, device_skip: bool, monkeypatch, bad=(3, 4, 7), steps=10, **kw):
    """A run with NaN losses at ``bad`` steps; with the fused optimizer and the skip on the device or the host."""
    import simdiff.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "_use_fused", lambda device: True)  # fused AdamW (supported on CPU too)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    seen, snapshots = [], {}

    def loss_fn(m, b, g):
        step = len(seen)
        seen.append(step)
        snapshots[step] = [p.detach().clone() for p in model.parameters()]
        loss = noisy_loss(m, b, g)
        return loss * math.nan if step in bad else loss

    t = Trainer(model, loss_fn, BatchIterator(make_data(), 8, seed=2), _cfg(steps=steps, **kw), run_dir)
    assert t.device_skip  # fused and not sharded
    t.device_skip = device_skip
    return t, snapshots


def test_device_side_skip_equals_host_side_skip(tmp_path, monkeypatch):
    runs = {}
    for mode in (True, False):
        t, snaps = _nan_run(tmp_path / str(mode), device_skip=mode, monkeypatch=monkeypatch, max_nonfinite=3)
        runs[mode] = (t, t.fit(), snaps)
    (a, out_a, snaps), (b, out_b, _) = runs[True], runs[False]
    assert out_a["nonfinite_total"] == out_b["nonfinite_total"] == 3
    for s in (3, 4, 7):  # the fused kernel's found_inf skipped the update: weights entering s+1 == entering s
        assert all(torch.equal(x, y) for x, y in zip(snaps[s], snaps[s + 1]))
    assert not all(torch.equal(x, y) for x, y in zip(snaps[5], snaps[6]))
    for k, v in a.model.state_dict().items():  # weights bit for bit; the EMA to float rounding (see EMA.update)
        assert torch.equal(v, b.model.state_dict()[k])
        torch.testing.assert_close(a.ema.shadow[k], b.ema.shadow[k], rtol=1e-6, atol=1e-7)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][key], sb[i][key]) for i in sa for key in sa[i])
    assert float(sa[0]["step"]) == 7  # 10 steps, 3 skipped: the skipped ones did not advance Adam's step
    rows = [read_metrics(tmp_path / m / "metrics.csv") for m in ("True", "False")]
    assert rows[0] == [{**r, "images_per_s": rows[0][i]["images_per_s"]} for i, r in enumerate(rows[1])]


class _HostReads(TorchDispatchMode):
    """Records ``aten._local_scalar_dense`` (every tensor -> host scalar read: ``item``, ``bool``, a tensor passed
    as a Scalar argument) with ``where()`` at the time."""

    def __init__(self, where):
        super().__init__()
        self.where, self.reads = where, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(self.where())
        return func(*args, **(kwargs or {}))


def test_no_host_reads_between_sync_points(tmp_path, monkeypatch):
    """With the skip on the device, a training step reads nothing back to the host: the only reads are the
    guard's, at log / checkpoint steps and every max_nonfinite steps."""
    from simdiff.train.guard import StepGuard

    t, _ = _nan_run(tmp_path, device_skip=True, monkeypatch=monkeypatch, bad=(), steps=24, log_every=8,
                    max_nonfinite=12)
    guard_reads = []
    real_read = StepGuard.read
    monkeypatch.setattr(StepGuard, "read", lambda self, **kw: (guard_reads.append(t.step), real_read(self, **kw))[1])
    with _HostReads(lambda: t.step) as mode:
        t.fit()
    assert sorted(set(guard_reads)) == [8, 12, 16, 24]  # log steps 8, 16, 24; guard-only read at 12
    assert mode.reads and set(mode.reads) <= set(guard_reads), mode.reads


def test_ema_device_flag_update_reads_nothing_and_matches_lerp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema, ref = EMA(m), EMA(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m(torch.randn(5, 3))  # moves the BatchNorm running stats
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with _HostReads(lambda: None) as mode:
        ema.update(m, 0.9, apply=torch.tensor(False))
        assert all(torch.equal(before[k], v) for k, v in ema.shadow.items())  # skipped: exactly unchanged
        ema.update(m, 0.9, apply=torch.tensor(True))
    assert mode.reads == []
    ref.update(m, 0.9)
    for k, v in ref.shadow.items():
        torch.testing.assert_close(ema.shadow[k], v, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.shadow["0.weight"], before["0.weight"])
    assert torch.equal(ema.shadow["1.running_mean"], m[1].running_mean)


def test_abort_found_late_reports_and_keeps_the_state_of_the_trip_step(tmp_path, monkeypatch):
    # non-finite from step 5 on, max 3 consecutive: trips at step 7; with no log/checkpoint steps the guard is read
    # at step 9 (every max_nonfinite steps), and nothing after step 7 changed the weights.
    t, snaps = _nan_run(tmp_path, device_skip=True, monkeypatch=monkeypatch, bad=set(range(5, 30)), steps=30,
                        log_every=0, max_nonfinite=3)
    with pytest.raises(NonFiniteError, match="aborting at step 7: 3 consecutive non-finite updates"):
        t.fit()
    assert t.step == 9 and t.nonfinite_total == 3 and list_checkpoints(tmp_path) == []
    assert all(torch.equal(x, y) for x, y in zip(snaps[5], t.model.parameters()))


def test_checkpoint_config_with_removed_num_workers_still_loads():
    from simdiff.train.config import upgrade_train_dict

    saved = {"steps": 5, "num_workers": 0, "optim": {"lr": 1e-3}}  # as written by earlier versions
    cfg = from_dict(TrainConfig, upgrade_train_dict(saved))
    assert cfg.steps == 5 and not hasattr(cfg, "num_workers")
    with pytest.raises(ConfigError, match="unknown config key 'train.num_workers'"):
        from_dict(TrainConfig, {"num_workers": 0}, where="train")
    with pytest.raises(ConfigError, match=r"'train.num_workers' was removed .*; delete the key \(got 4\)"):
        upgrade_train_dict({"num_workers": 4})


# ------------------------------------------------------------------------- CUDA niceties: CPU-equivalent paths
def test_cuda_flags_are_ignored_on_cpu(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32
    t = Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8), _cfg(steps=1, tf32=True, channels_last=True),
                tmp_path)
    assert not t.channels_last and not t.device_skip and torch.backends.cuda.matmul.allow_tf32 == before


def test_additive_context_mask_equals_bool_mask_and_reference():
    from simdiff.nets.layers import additive_mask, attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 16, generator=g) for n in (5, 7, 7))
    mask = torch.rand(3, 1, 1, 7, generator=g) > 0.4
    mask[..., 0] = True  # every query can attend somewhere (the null token in the nets)
    ident = nn.Identity()
    got = attend(q, k, v, num_heads=2, q_norm=ident, k_norm=ident, mask=mask)
    same = attend(q, k, v, num_heads=2, q_norm=ident, k_norm=ident, mask=additive_mask(mask, q.dtype))
    qh, kh, vh = (x.view(3, -1, 2, 8).transpose(1, 2) for x in (q, k, v))
    bool_sdpa = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    logits = (qh @ kh.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf"))
    ref = (logits.softmax(-1) @ vh).transpose(1, 2).reshape(3, 5, 16)
    assert torch.equal(got, same)
    torch.testing.assert_close(got, bool_sdpa.transpose(1, 2).reshape(3, 5, 16), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    masked_keys_ignored = attend(q, k.masked_fill(~mask[:, 0, 0, :, None], 1e3), v.masked_fill(
        ~mask[:, 0, 0, :, None], 1e3), num_heads=2, q_norm=ident, k_norm=ident, mask=mask)
    torch.testing.assert_close(masked_keys_ignored, got, rtol=0, atol=1e-5)


def test_channels_last_unet_matches_contiguous_on_cpu():
    from simdiff.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=(8, 16), attention_levels=(1,), num_heads=2), image_channels=1, image_size=8,
               num_classes=0)
    for p in net.parameters():  # perturb the zero-initialised output layers so the output depends on everything
        p.data.add_(0.05 * torch.randn_like(p))
    z, lam = torch.randn(2, 1, 8, 8), torch.tensor([-1.0, 2.0])
    ref = net(z, lam)
    net.to(memory_format=torch.channels_last)
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = net(z.contiguous(memory_format=torch.channels_last), lam)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_prefetcher_yields_the_same_batches_and_resumes_at_the_first_unconsumed(tmp_path, monkeypatch):
    from simdiff.train.batches import DevicePrefetcher

    data = {"i": torch.arange(20)}
    ref = [next(it)["i"] for it in [BatchIterator(data, 6, seed=5)] for _ in range(8)]
    pre = DevicePrefetcher(BatchIterator(data, 6, seed=5), torch.device("cpu"), depth=3)
    got = [next(pre)["i"] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    state = pre.state_dict()  # the thread has run ahead, the state has not
    pre.close()
    assert state == {"epoch": 1, "position": 2}
    again = BatchIterator(data, 6, seed=5)
    again.load_state_dict(state)
    assert torch.equal(next(again)["i"], ref[5])
    # the trainer with the prefetcher (forced on for the CPU) repeats the run without it, checkpoints included
    import simdiff.train.trainer as trainer_mod

    outs = {}
    for on in (False, True):
        monkeypatch.setattr(trainer_mod, "_use_prefetcher", lambda device, _on=on: _on)
        torch.manual_seed(0)
        t = Trainer(TinyNet(), noisy_loss, BatchIterator(make_data(), 8, seed=2), _cfg(steps=11, checkpoint_every=4),
                    tmp_path / str(on))
        t.fit()
        outs[on] = (read_metrics(tmp_path / str(on) / "metrics.csv"), load_latest(tmp_path / str(on)), t.data)
    (rows_a, ck_a, data_a), (rows_b, ck_b, data_b) = outs[False], outs[True]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert ck_a.state["data"] == ck_b.state["data"] == data_b.state_dict() == data_a.state_dict()
    assert all(torch.equal(ck_a.model[k], ck_b.model[k]) for k in ck_a.model)
