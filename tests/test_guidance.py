import math

import pytest
import torch

from simdiff.guidance import classifier_free_guidance, guide, interval_from_sigma
from simdiff.process import to_output
from simdiff.toy import GaussianMixture

F64 = torch.float64
NC = 3  # number of classes; label NC is the null (unconditional) label
GM = GaussianMixture.random(4, 6, num_classes=NC, std=0.3)


class Counting:
    """Exact class-conditional mixture denoiser (label NC = unconditional) that records each call's batch size."""

    def __init__(self):
        self.sizes = []
        self.conds = []

    def __call__(self, z, logsnr, labels, **cond):
        self.sizes.append(z.shape[0])
        self.conds.append(dict(labels=labels, **cond))
        null = (labels == NC).reshape(-1, 1, 1, 1)
        xc = GM.posterior_mean(z, logsnr, labels=labels.clamp(max=NC - 1))
        xu = GM.posterior_mean(z, logsnr)
        return to_output("x", torch.where(null, xu, xc), z=z, logsnr=logsnr)


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 1, 2, 2, generator=g, dtype=F64)
    labels = torch.arange(b) % NC
    return z, labels


def _expected(z, lam, labels, w):
    xc = GM.posterior_mean(z, lam, labels=labels)
    xu = GM.posterior_mean(z, lam)
    return to_output("x", (1 + w) * xc - w * xu, z=z, logsnr=lam), to_output("x", xc, z=z, logsnr=lam)


def _close(a, b):
    for k in ("x", "eps", "v"):
        torch.testing.assert_close(a.get(k), b.get(k), rtol=1e-9, atol=1e-9)


def test_guided_matches_exact_linear_combination_in_one_2b_call():
    z, labels = _batch()
    lam = torch.linspace(-3, 3, 6, dtype=F64)
    net = Counting()
    out = classifier_free_guidance(net, weight=2.5, null_cond={"labels": NC})(z, lam, labels=labels)
    exp, _ = _expected(z, lam, labels, 2.5)
    _close(out, exp)  # all three views consistent with the guided x
    assert net.sizes == [12]
    assert torch.equal(net.conds[0]["labels"], torch.cat([labels, torch.full_like(labels, NC)]))


def test_weight_zero_is_conditional_single_call():
    z, labels = _batch()
    lam = torch.full((6,), 0.5, dtype=F64)
    net = Counting()
    out = classifier_free_guidance(net, weight=0.0, null_cond={"labels": NC})(z, lam, labels=labels)
    _close(out, _expected(z, lam, labels, 0.0)[1])
    assert net.sizes == [6]


def test_interval_inside_outside_and_mixed():
    z, labels = _batch()
    w, interval = 1.5, (-1.0, 1.0)
    # all inside (closed ends): one call of 2B
    net = Counting()
    lam = torch.tensor([-1.0, -0.5, 0.0, 0.2, 0.9, 1.0], dtype=F64)
    out = classifier_free_guidance(net, weight=w, null_cond={"labels": NC}, interval=interval)(z, lam, labels=labels)
    assert net.sizes == [12]
    _close(out, _expected(z, lam, labels, w)[0])
    # all outside: one conditional call of B
    net = Counting()
    lam = torch.tensor([-4.0, -2.0, -1.01, 1.01, 3.0, 8.0], dtype=F64)
    out = classifier_free_guidance(net, weight=w, null_cond={"labels": NC}, interval=interval)(z, lam, labels=labels)
    assert net.sizes == [6]
    _close(out, _expected(z, lam, labels, w)[1])
    # mixed: one call of B + n_inside; guided inside, conditional outside
    net = Counting()
    lam = torch.tensor([-4.0, 0.3, 2.0, -0.7, 0.0, 5.0], dtype=F64)
    out = classifier_free_guidance(net, weight=w, null_cond={"labels": NC}, interval=interval)(z, lam, labels=labels)
    assert net.sizes == [9]
    assert torch.equal(net.conds[0]["labels"][6:], torch.full((3,), NC))
    guided, cond = _expected(z, lam, labels, w)
    inside = torch.tensor([False, True, False, True, True, False])
    for k in ("x", "eps", "v"):
        torch.testing.assert_close(out.get(k)[inside], guided.get(k)[inside], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.get(k)[~inside], cond.get(k)[~inside], rtol=1e-9, atol=1e-9)


def test_scalar_logsnr_and_gradients():
    z, labels = _batch(4)
    z.requires_grad_(True)
    net = Counting()
    guided = classifier_free_guidance(net, weight=1.0, null_cond={"labels": NC}, interval=(-2.0, 2.0))
    out = guided(z, torch.tensor(0.5, dtype=F64), labels=labels)
    assert net.sizes == [8]
    torch.testing.assert_close(guided(z, 0.5, labels=labels).x, out.x)
    _close(out, _expected(z.detach(), torch.full((4,), 0.5, dtype=F64), labels, 1.0)[0])
    out.x.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_rescale():
    z, labels = _batch(5, seed=3)
    lam = torch.linspace(-2, 2, 5, dtype=F64)
    w = 3.0
    guided, cond = _expected(z, lam, labels, w)
    plain = classifier_free_guidance(Counting(), weight=w, null_cond={"labels": NC}, rescale=0.0)(z, lam, labels=labels)
    _close(plain, guided)
    full = classifier_free_guidance(Counting(), weight=w, null_cond={"labels": NC}, rescale=1.0)(z, lam, labels=labels)
    torch.testing.assert_close(full.x.std(dim=(1, 2, 3)), cond.x.std(dim=(1, 2, 3)), rtol=1e-10, atol=0)
    _close(full, to_output("x", full.x, z=z, logsnr=lam))
    half = classifier_free_guidance(Counting(), weight=w, null_cond={"labels": NC}, rescale=0.5)(z, lam, labels=labels)
    ratio = (cond.x.std(dim=(1, 2, 3)) / guided.x.std(dim=(1, 2, 3))).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(half.x, 0.5 * guided.x * ratio + 0.5 * guided.x, rtol=1e-10, atol=1e-12)
    # guide() directly: rescale=0 combines views linearly (same as rebuilding from x)
    g0 = guide(cond, guided, weight=0.7, z=z, logsnr=lam)
    _close(g0, to_output("x", g0.x, z=z, logsnr=lam))


def test_null_cond_merges_keys():
    b, length, c = 3, 2, 4
    z, labels = _batch(b)
    ctx = torch.ones(b, length, c, dtype=F64)
    mask = torch.ones(b, length, dtype=torch.bool)
    net = Counting()
    guided = classifier_free_guidance(net, weight=1.0, null_cond={"context": torch.zeros(1, length, c)})
    guided(z, torch.zeros(b, dtype=F64), labels=labels, context=ctx, context_mask=mask, flag=None)
    seen = net.conds[0]
    assert seen["context"].shape == (2 * b, length, c) and seen["context"].dtype == F64
    assert (seen["context"][:b] == 1).all() and (seen["context"][b:] == 0).all()
    assert torch.equal(seen["labels"], torch.cat([labels, labels])) and seen["context_mask"].shape == (2 * b, length)
    assert seen["flag"] is None


def test_errors():
    z, labels = _batch(3)
    lam = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"null_cond has \['context'\] but the call's conditioning has \['labels'\]"):
        classifier_free_guidance(Counting(), weight=1.0, null_cond={"context": 0.0})(z, lam, labels=labels)
    with pytest.raises(ValueError, match="lo <= hi"):
        classifier_free_guidance(Counting(), weight=1.0, null_cond={"labels": NC}, interval=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"logsnr must be \[B\] or scalar, got \(2,\) for z \(3, 1, 2, 2\)"):
        classifier_free_guidance(Counting(), weight=1.0, null_cond={"labels": NC})(z, lam[:2], labels=labels)
    with pytest.raises(ValueError, match=r"null_cond\['labels'\] of shape \(2,\) does not broadcast"):
        classifier_free_guidance(Counting(), weight=1.0, null_cond={"labels": torch.tensor([3, 3])})(
            z, lam, labels=labels
        )
    with pytest.raises(ValueError, match="rescale must be in"):
        classifier_free_guidance(Counting(), weight=1.0, null_cond={"labels": NC}, rescale=2.0)


def test_interval_from_sigma():
    lo, hi = interval_from_sigma(0.28, 1.61)
    assert lo == pytest.approx(-2 * math.log(1.61)) and hi == pytest.approx(-2 * math.log(0.28))
    assert lo < hi
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        interval_from_sigma(2.0, 1.0)


class Spy(torch.Tensor):
    """Records every torch function applied to it (and to tensors derived from it)."""

    log: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.log.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


HOST_READS = {"item", "nonzero", "__bool__", "__int__", "__float__", "tolist", "__index__"}


def test_host_level_decides_the_interval_with_static_shapes():
    z, labels = _batch()
    w, interval = 1.5, (-1.0, 1.0)
    guided_fn = classifier_free_guidance(Counting(), weight=w, null_cond={"labels": NC}, interval=interval)
    assert guided_fn.wants_host_level
    for level, size, inside in ((0.3, 12, True), (1.0, 12, True), (-1.0, 12, True), (1.5, 6, False), (-3.0, 6, False)):
        net = Counting()
        guided_fn.denoise = net
        lam = torch.full((6,), level, dtype=F64)
        out = guided_fn(z, lam, host_level=level, labels=labels)
        assert net.sizes == [size]
        assert all("host_level" not in c for c in net.conds)  # stripped: Counting does not ask for it
        guided, cond = _expected(z, lam, labels, w)
        _close(out, guided if inside else cond)


def test_host_level_path_reads_nothing_from_the_device():
    z, labels = _batch()
    guided = classifier_free_guidance(Counting(), weight=1.5, null_cond={"labels": NC}, interval=(-1.0, 1.0))
    for level in (0.25, 4.0):  # inside and outside
        Spy.log = []
        out = guided(z, torch.full((6,), level, dtype=F64).as_subclass(Spy), host_level=level, labels=labels)
        assert Spy.log and not HOST_READS & set(Spy.log), Spy.log
        assert torch.isfinite(out.x).all()
    # the spy does see the per-example path's device reads (so the check above can fail)
    Spy.log = []
    guided(z, torch.tensor([-4.0, 0.3, 2.0, -0.7, 0.0, 5.0], dtype=F64).as_subclass(Spy), labels=labels)
    assert "nonzero" in Spy.log


def test_host_level_is_forwarded_to_a_denoiser_that_asks():
    z, labels = _batch(3)
    net = Counting()
    net.wants_host_level = True
    guided = classifier_free_guidance(net, weight=1.0, null_cond={"labels": NC})
    guided(z, torch.zeros(3, dtype=F64), host_level=0.0, labels=labels)
    assert net.sizes == [6] and net.conds[0]["host_level"] == 0.0


def test_none_null_value_is_the_denoisers_own_unconditional_path_in_two_calls():
    z, labels = _batch()
    lam = torch.linspace(-2, 2, 6, dtype=F64)
    sizes = []

    def exact(z, logsnr, labels=None):  # labels=None: the exact unconditional mixture denoiser
        sizes.append((z.shape[0], labels is None))
        return GM.denoise(z, logsnr, labels=labels)

    out = classifier_free_guidance(exact, weight=2.0, null_cond={"labels": None})(z, lam, labels=labels)
    _close(out, _expected(z, lam, labels, 2.0)[0])
    assert sizes == [(6, False), (6, True)]
    sizes.clear()  # with an interval and per-example levels: B conditional + n_inside unconditional
    mixed = torch.tensor([-4.0, 0.3, 2.0, -0.7, 0.0, 5.0], dtype=F64)
    out = classifier_free_guidance(exact, weight=2.0, null_cond={"labels": None}, interval=(-1.0, 1.0))(
        z, mixed, labels=labels)
    assert sizes == [(6, False), (3, True)]
    inside = torch.tensor([False, True, False, True, True, False])
    guided, cond = _expected(z, mixed, labels, 2.0)
    torch.testing.assert_close(out.x[inside], guided.x[inside], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.x[~inside], cond.x[~inside], rtol=1e-9, atol=1e-9)


def test_rescale_rebuilds_eps_and_v_with_the_process_when_given():
    z, labels = _batch(5, seed=3)
    lam = torch.linspace(-2, 2, 5, dtype=F64)
    calls = []

    class Recording:  # the isotropic process's to_output, recorded
        def to_output(self, kind, pred, *, z, lam):
            calls.append(kind)
            return to_output(kind, pred, z=z, logsnr=lam)

    plain = classifier_free_guidance(Counting(), weight=3.0, null_cond={"labels": NC}, rescale=0.7)(
        z, lam, labels=labels)
    with_process = classifier_free_guidance(Counting(), weight=3.0, null_cond={"labels": NC}, rescale=0.7,
                                            process=Recording())(z, lam, labels=labels)
    assert calls == ["x"]
    for k in ("x", "eps", "v"):
        assert torch.equal(with_process.get(k), plain.get(k))


# --- guidance and conditioning in simdiff.generate ----------------------------------------------------------------
from simdiff.conditioners import ClassLabels  # noqa: E402
from simdiff.generate import SampleConfig, generate  # noqa: E402
from simdiff.processes import GaussianProcess, IsotropicGaussian  # noqa: E402
from simdiff.samplers import SAMPLERS, get_sampler, make_grid  # noqa: E402
from simdiff.schedules import CosineSchedule  # noqa: E402

SCHED = CosineSchedule()


def _flat(z, logsnr, labels=None, context=None, **_):
    """Exact mixture denoiser on ``[B, 4]``; label NC (or a zero context) is unconditional."""
    if context is not None:
        labels = torch.where(context.sum(1) == 0, NC, labels)
    xc = GM.posterior_mean(z, logsnr, labels=labels.clamp(max=NC - 1))
    x = torch.where((labels == NC)[:, None], GM.posterior_mean(z, logsnr), xc)
    return to_output("x", x.to(z.dtype), z=z, logsnr=logsnr)


def test_generate_null_conditioning_sources_agree():
    labels = torch.arange(10) % NC
    cfg = SampleConfig(sampler="dpmpp_2m", steps=4, grid="uniform_t", guidance=1.5, num=10, batch_size=4, seed=3)
    kw = dict(labels=labels, dtype=F64)
    old = generate(_flat, SCHED, (4,), cfg, num_classes=NC, **kw)
    assert torch.equal(old, generate(_flat, SCHED, (4,), cfg, null_cond={"labels": NC}, **kw))
    assert torch.equal(old, generate(_flat, SCHED, (4,), cfg, conditioner=ClassLabels(NC), **kw))
    unguided = generate(_flat, SCHED, (4,), SampleConfig(**{**cfg.__dict__, "guidance": 0.0}), **kw)
    assert not torch.allclose(old, unguided)
    # a null conditioning that is not about labels: a zero context
    ctx = torch.ones(10, 2, dtype=F64)
    via_ctx = generate(_flat, SCHED, (4,), cfg, cond={"context": ctx}, null_cond={"context": 0.0}, **kw)
    torch.testing.assert_close(via_ctx, old, rtol=0, atol=0)
    assert not old.is_inference()  # an ordinary tensor for the caller


def test_generate_refuses_guidance_without_null_conditioning():
    cfg = SampleConfig(sampler="ddim", steps=2, guidance=1.0, num=2)
    with pytest.raises(ValueError, match="guidance needs null conditioning"):
        generate(_flat, SCHED, (4,), cfg)
    with pytest.raises(ValueError, match=r"guidance replaces \['labels'\]"):
        generate(_flat, SCHED, (4,), cfg, num_classes=NC)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, \.\.\.\)"):
        generate(_flat, SCHED, (4,), cfg, num_classes=NC, labels=torch.zeros(3, dtype=torch.long))


def test_generate_runs_in_inference_mode_with_one_cpu_grid_and_passes_process(monkeypatch):
    seen = []

    def spy(denoise, z, logsnrs, *, generator=None, callback=None, cond=None, **options):
        seen.append(dict(z=z.clone(), grid=logsnrs, options=options, inference=torch.is_inference_mode_enabled()))
        return z

    monkeypatch.setitem(SAMPLERS, "spy", spy)
    cfg = SampleConfig(sampler="spy", steps=3, grid="uniform_logsnr", num=5, batch_size=2, seed=7)
    out = generate(_flat, SCHED, (4,), cfg)
    assert len(seen) == 3 and all(s["inference"] and s["options"] == {} for s in seen)
    assert all(s["grid"] is seen[0]["grid"] for s in seen) and seen[0]["grid"].device.type == "cpu"
    # the starting noise: consecutive draws of one CPU generator seeded with cfg.seed
    g = torch.Generator().manual_seed(7)
    expect = torch.cat([torch.randn(n, 4, generator=g) for n in (2, 2, 1)])
    assert torch.equal(torch.cat([s["z"] for s in seen]), expect) and torch.equal(out, expect.clamp(-1, 1))
    seen.clear()
    marker = IsotropicGaussian()  # passed through to the sampler as it is
    generate(_flat, SCHED, (4,), cfg, process=marker)
    assert all(s["options"] == {"process": marker} for s in seen)
    seen.clear()

    class Loud(GaussianProcess):  # non-VP: sigma = 3 sqrt(sigmoid(-lam)), so the start is not unit variance
        name = "loud_test"

        def log_alpha_sigma(self, lam):
            return 0.5 * torch.nn.functional.logsigmoid(lam), math.log(3.0) + 0.5 * torch.nn.functional.logsigmoid(-lam)

    monkeypatch.setattr("simdiff.generate.check_process", lambda name, process: None)  # the spy has no process rule
    generate(_flat, SCHED, (4,), cfg, process=Loud(SCHED), dtype=F64)
    lam0 = make_grid(SCHED, 3, kind=cfg.grid)[0]
    g = torch.Generator().manual_seed(7)
    expect = torch.cat([torch.randn(n, 4, generator=g, dtype=F64) for n in (2, 2, 1)]) * 3 * torch.sigmoid(-lam0).sqrt()
    torch.testing.assert_close(torch.cat([s["z"] for s in seen]), expect, rtol=1e-14, atol=0)


def test_generate_student_samplers_come_from_the_registry():
    labels = torch.arange(6) % NC
    cfg = SampleConfig(sampler="moment_matching", steps=3, grid="uniform_t", num=6, batch_size=6, seed=1)
    x = generate(_flat, SCHED, (4,), cfg, labels=labels, dtype=F64)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = get_sampler("moment_matching")(_flat, z, make_grid(SCHED, 3, kind="uniform_t"),
                                         generator=torch.Generator().manual_seed(1 * 1_000_003),
                                         cond={"labels": labels})
    assert torch.equal(x, ref.float().clamp(-1, 1))
    with pytest.raises(ValueError, match="not available for a one-step generator"):
        generate(lambda z, **c: z, SCHED, (4,), SampleConfig(sampler="generator", steps=1, guidance=1.0, num=2),
                 num_classes=NC, labels=torch.zeros(2, dtype=torch.long))


def test_generate_guided_sampler_calls_are_2b_inside_and_b_outside_the_interval():
    sizes, levels = [], []

    def net(z, logsnr, labels=None, host_level=None):
        sizes.append(z.shape[0])
        levels.append(host_level)
        return _flat(z, logsnr, labels=labels)

    net.wants_host_level = True  # guidance forwards the host level it receives from the sampler
    cfg = SampleConfig(sampler="dpmpp_2m", steps=6, grid="uniform_logsnr", guidance=1.0, interval=(-2.0, 3.0),
                       num=4, batch_size=4)
    generate(net, SCHED, (4,), cfg, labels=torch.arange(4) % NC, num_classes=NC, dtype=F64)
    grid = make_grid(SCHED, 6, kind="uniform_logsnr")[:-1]
    inside = [bool(-2.0 <= float(v) <= 3.0) for v in grid]
    assert sizes == [8 if i else 4 for i in inside] and 0 < sum(inside) < len(inside)
    assert levels == [float(v) for v in grid]
