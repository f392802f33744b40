import pytest
import torch
import torch.nn.functional as F

from simdiff.configuration import ConfigError
from simdiff.losses import DiffusionLoss, LossConfig, diffusion_loss, drop_labels, multiscale_sq_error, sample_t
from simdiff.process import add_noise, to_output
from simdiff.processes import DCTBasis, GaussianProcess, IdentityBasis, IsotropicGaussian
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture
from simdiff.weighting import get_weighting

F64 = torch.float64
COSINE = get_schedule("cosine")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fixed_error_denoiser(err):
    """Denoiser whose x prediction is ``x_true - err`` (x_true recovered from the closure's stored x)."""

    def denoise(z, logsnr, **_):
        return to_output("x", denoise.x - err, z=z, logsnr=logsnr)

    return denoise


def test_shapes_dtype_and_bad_input():
    gm = GaussianMixture.random(4, 3)
    x = gm.sample(6, generator=_gen())[0].reshape(6, 1, 2, 2)
    loss = diffusion_loss(gm.denoise, x, schedule=COSINE, weighting=get_weighting("v"), generator=_gen(1))
    assert loss.shape == (6,) and loss.dtype == F64 and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got \(6, 4\)"):
        diffusion_loss(gm.denoise, x.reshape(6, 4), schedule=COSINE, weighting=get_weighting("v"))
    with pytest.raises(ValueError, match=r"t must have shape \[6\] for x of shape \(6, 1, 2, 2\), got \(5,\)"):
        diffusion_loss(gm.denoise, x, schedule=COSINE, weighting=get_weighting("v"), t=torch.rand(5, dtype=F64))
    with pytest.raises(ValueError, match=r"eps of shape \(6, 4\) does not match x of shape \(6, 1, 2, 2\)"):
        diffusion_loss(gm.denoise, x, schedule=COSINE, weighting=get_weighting("v"), eps=torch.zeros(6, 4, dtype=F64))


@pytest.mark.parametrize("name", ["x", "eps", "v"])
def test_loss_equals_native_prediction_mse(name):
    """weight * x-MSE equals the MSE in the weighting's own space (eps / v / x), whatever the head."""
    g = _gen(2)
    x = torch.randn(8, 2, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(8, 2, 4, 4, generator=g, dtype=F64)
    t = torch.rand(8, generator=g, dtype=F64) * 0.9 + 0.05
    bias = torch.randn(8, 2, 4, 4, generator=g, dtype=F64)

    def denoise(z, logsnr):  # a v-head network with a deliberate error
        return to_output("v", 0.1 * z + 0.2 * bias, z=z, logsnr=logsnr)

    loss = diffusion_loss(denoise, x, schedule=COSINE, weighting=get_weighting(name), t=t, eps=eps)
    lam = COSINE.logsnr(t)
    z = add_noise(x, eps, logsnr=lam)
    true, pred = to_output("x", x, z=z, logsnr=lam), denoise(z, lam)
    native = (true.get(name) - pred.get(name)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, native, rtol=1e-9, atol=0)


def test_jacobian_factor_is_minus_dlogsnr_dt():
    gm = GaussianMixture.random(4, 3)
    x = gm.sample(16, generator=_gen())[0].reshape(16, 1, 2, 2)
    t, eps = sample_t(16, generator=_gen(1), dtype=F64), torch.randn(16, 1, 2, 2, generator=_gen(2), dtype=F64)
    sched = get_schedule("shifted_cosine", image_size=32, noise_size=64)
    kw = dict(schedule=sched, weighting=get_weighting("sigmoid"), t=t, eps=eps)
    plain = diffusion_loss(gm.denoise, x, **kw)
    jac = diffusion_loss(gm.denoise, x, jacobian=True, **kw)
    torch.testing.assert_close(jac / plain, -sched.dlogsnr_dt(t), rtol=1e-12, atol=0)
    assert (jac > 0).all()


@pytest.mark.parametrize("weighting,jacobian", [("v", False), ("sigmoid", True), ("eps", False)])
def test_exact_denoiser_beats_perturbed(weighting, jacobian):
    """E[x|z] minimises the expected loss at every t; compare on common random numbers."""
    gm = GaussianMixture.random(4, 4, std=0.2)
    n = 1024
    x = gm.sample(n, generator=_gen(3))[0].reshape(n, 1, 2, 2)
    t, eps = sample_t(n, generator=_gen(4), dtype=F64), torch.randn(n, 1, 2, 2, generator=_gen(5), dtype=F64)
    kw = dict(schedule=COSINE, weighting=get_weighting(weighting), t=t, eps=eps, jacobian=jacobian)
    exact = diffusion_loss(gm.denoise, x, **kw).mean()

    def perturbed(shift, scale):
        def denoise(z, logsnr):
            return to_output("x", scale * gm.posterior_mean(z, logsnr) + shift, z=z, logsnr=logsnr)

        return denoise

    for shift, scale in [(0.02, 1.0), (-0.02, 1.0), (0.0, 1.02), (0.0, 0.98)]:
        assert diffusion_loss(perturbed(shift, scale), x, **kw).mean() > exact


def test_sample_t_strata():
    b = 10
    for shared in (True, False):
        t = sample_t(b, generator=_gen(7), shared_offset=shared, dtype=F64)
        i = torch.arange(b, dtype=F64)
        assert t.shape == (b,) and ((t >= i / b) & (t < (i + 1) / b)).all()
        if shared:
            torch.testing.assert_close(t.diff(), torch.full((b - 1,), 1 / b, dtype=F64))
        else:
            assert not torch.allclose(t.diff(), torch.full((b - 1,), 1 / b, dtype=F64))
    u = sample_t(1000, generator=_gen(8), stratified=False)
    assert u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all() and 0.45 < float(u.mean()) < 0.55
    torch.testing.assert_close(sample_t(5, generator=_gen(9)), sample_t(5, generator=_gen(9)))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sample_t(0)


def test_drop_labels():
    labels = torch.arange(20000) % 7
    out = drop_labels(labels, prob=0.2, null_label=7, generator=_gen(10))
    dropped = out == 7
    assert abs(float(dropped.double().mean()) - 0.2) < 0.015
    assert torch.equal(out[~dropped], labels[~dropped]) and out.dtype == labels.dtype
    assert torch.equal(drop_labels(labels, prob=0.0, null_label=7), labels)
    assert (drop_labels(labels, prob=1.0, null_label=7) == 7).all()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        drop_labels(labels, prob=1.5, null_label=7)


def test_multiscale_hand_computed():
    e = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0], [4, 4, -4, -4]], dtype=F64).reshape(1, 1, 4, 4)
    # 4x4: mean of squares = (30 + 174 + 0 + 64) / 16 = 16.75
    # 2x2 pooled: [[3.5, 5.5], [2, -2]] -> mean of squares = (12.25 + 30.25 + 4 + 4) / 4 = 12.625, weight 4/2
    # 1x1 pooled: 2.25 -> 5.0625, weight 4/1
    assert multiscale_sq_error(e, base=4).item() == 16.75
    assert multiscale_sq_error(e, base=2).item() == 16.75 + 2 * 12.625  # 42.0
    assert multiscale_sq_error(e, base=1).item() == 42.0 + 4 * 5.0625  # 62.25
    # through diffusion_loss with an x weighting: identical
    x = torch.randn(1, 1, 4, 4, generator=_gen(11), dtype=F64)
    den = _fixed_error_denoiser(e)
    den.x = x
    loss = diffusion_loss(den, x, schedule=COSINE, weighting=get_weighting("x"), multiscale_base=2, generator=_gen())
    torch.testing.assert_close(loss, torch.tensor([42.0], dtype=F64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="multiscale_base=3 needs image height 4"):
        multiscale_sq_error(e, base=3)


def test_multiscale_eps_weighting_equals_pooled_eps_loss():
    """Paper form: sum_s (1/s) mean(D_s eps - D_s eps_hat)^2; ours = d * that with weighting 'eps'."""
    g = _gen(12)
    x = torch.randn(3, 2, 8, 8, generator=g, dtype=F64)
    eps = torch.randn(3, 2, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    noise = torch.randn(3, 2, 8, 8, generator=g, dtype=F64)

    def denoise(z, logsnr):
        return to_output("eps", 0.7 * z + 0.1 * noise, z=z, logsnr=logsnr)

    ours = diffusion_loss(denoise, x, schedule=COSINE, weighting=get_weighting("eps"), t=t, eps=eps, multiscale_base=2)
    lam = COSINE.logsnr(t)
    e, eh = eps, denoise(add_noise(x, eps, logsnr=lam), lam).eps
    paper = torch.zeros(3, dtype=F64)
    for s in (8, 4, 2):
        paper = paper + (1 / s) * (e - eh).pow(2).mean(dim=(1, 2, 3))
        e, eh = F.avg_pool2d(e, 2), F.avg_pool2d(eh, 2)
    torch.testing.assert_close(ours, 8 * paper, rtol=1e-10, atol=0)


class _Recorder:
    def __init__(self):
        self.calls = []
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))

    def __call__(self, z, logsnr, **cond):
        self.calls.append(cond)
        return to_output("x", self.w * z, z=z, logsnr=logsnr)


def test_diffusion_loss_object_condition_dropout_and_grad():
    b = 400
    x = torch.randn(b, 1, 2, 2, dtype=F64, generator=_gen(13))
    labels = torch.arange(b) % 3
    ctx = torch.ones(b, 2, 5, dtype=F64)
    loss_fn = DiffusionLoss(COSINE, "v", cond_drop_prob=0.3, null_label=3)
    rec = _Recorder()
    loss = loss_fn(rec, {"x": x, "labels": labels, "context": ctx}, generator=_gen(14))
    assert loss.shape == (b,)
    seen = rec.calls[0]
    dropped = seen["labels"] == 3
    assert 0.2 < float(dropped.double().mean()) < 0.4
    assert torch.equal(seen["labels"][~dropped], labels[~dropped])
    assert (seen["context"][dropped] == 0).all() and (seen["context"][~dropped] == 1).all()
    loss.mean().backward()
    assert rec.w.grad is not None and torch.isfinite(rec.w.grad)
    # same generator seed -> same loss
    again = loss_fn(_Recorder(), {"x": x, "labels": labels, "context": ctx}, generator=_gen(14))
    torch.testing.assert_close(again, loss.detach())
    with pytest.raises(ConfigError, match="needs null_label"):
        DiffusionLoss(COSINE, "v", cond_drop_prob=0.3)(rec, {"x": x, "labels": labels})
    with pytest.raises(ValueError, match="needs an 'x' entry"):
        loss_fn(rec, {"labels": labels})


def test_from_config_round_trip_and_validation():
    cfg = {
        "schedule": {"name": "shifted_cosine", "image_size": 8, "noise_size": 32},
        "weighting": "min_snr",
        "weighting_params": {"gamma": 4.0},
        "jacobian": False,
        "multiscale_base": 4,
    }
    loss_fn = DiffusionLoss.from_config(cfg)
    assert loss_fn.weighting.to_dict() == {"name": "min_snr", "gamma": 4.0} and loss_fn.multiscale_base == 4
    assert DiffusionLoss.from_config(loss_fn.config()).to_dict() == loss_fn.to_dict()
    default = DiffusionLoss.from_config({})
    assert default.jacobian and default.weighting.to_dict() == {"name": "sigmoid"}
    assert default.config().schedule == {"name": "cosine", "logsnr_min": -15.0, "logsnr_max": 15.0}
    assert LossConfig().weighting == "sigmoid" and LossConfig().cond_drop_prob == 0.0
    gm = GaussianMixture.random(64, 2)
    x = gm.sample(4, generator=_gen())[0].reshape(4, 1, 8, 8)
    out = loss_fn(gm.denoise, {"x": x}, generator=_gen(1))
    assert out.shape == (4,) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="unknown config key 'loss.weight'; valid keys of loss: cond_drop_prob"):
        DiffusionLoss.from_config({"weight": "v"})
    with pytest.raises(ConfigError, match="unknown weighting 'foo'; valid:"):
        DiffusionLoss.from_config({"weighting": "foo"})
    with pytest.raises(ConfigError, match="unknown schedule"):
        DiffusionLoss.from_config({"schedule": {"name": "nope"}})


class _PerPixel(GaussianProcess):
    """Per-pixel levels ``lam + b`` with non-VP scales (a test process)."""

    name = "per_pixel"

    def __init__(self, basis=None):
        super().__init__(COSINE, basis=basis)
        self.b = torch.tensor([[[-1.0, 0.5, 2.0], [0.0, -2.0, 1.0]]], dtype=F64)  # [1, 2, 3]
        self.scale = torch.tensor([[[1.0, 0.5, 2.0], [1.5, 0.8, 1.0]]], dtype=F64)
        self.coef_shape = (1, 2, 3)

    def log_alpha_sigma(self, lam):
        lev = lam.reshape(lam.shape + (1, 1, 1)) + self.b
        return self.scale.log() + 0.5 * F.logsigmoid(lev), 0.5 * F.logsigmoid(-lev)


@pytest.mark.parametrize("basis", [IdentityBasis, DCTBasis])
def test_per_element_process_loss(basis):
    """Per-coordinate weights: the eps-weighting equals the eps-MSE in basis coordinates, the x-weighting the plain
    x-MSE (orthonormal basis), the Jacobian is -dlogsnr/dt, and the exact denoiser beats perturbed ones."""
    proc = _PerPixel(basis())
    g = _gen(20)
    means = torch.randn(4, 6, generator=g, dtype=F64) * 0.5
    gm = GaussianMixture(means, 0.05 * (1 + torch.rand(4, generator=g, dtype=F64)))
    n = 512
    x = gm.sample(n, generator=g)[0].reshape(n, 1, 2, 3)
    t, eps = sample_t(n, generator=_gen(21), dtype=F64), torch.randn(n, 1, 2, 3, generator=_gen(22), dtype=F64)
    den = gm.denoise_for(proc)
    bias = 0.1 * torch.randn(n, 1, 2, 3, generator=g, dtype=F64)

    def off(z, lam):  # an imperfect denoiser
        return proc.to_output("x", den(z, lam).x + bias, z=z, lam=lam)

    kw = dict(t=t, eps=eps, process=proc)
    lam = COSINE.logsnr(t)
    z = proc.add_noise(x, eps, lam=lam)
    out = off(z, lam)
    loss_eps = diffusion_loss(off, x, weighting=get_weighting("eps"), **kw)
    native = (proc.encode(eps) - proc.encode(out.eps)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss_eps, native, rtol=1e-9, atol=0)
    loss_x = diffusion_loss(off, x, weighting=get_weighting("x"), **kw)
    torch.testing.assert_close(loss_x, (x - out.x).pow(2).mean(dim=(1, 2, 3)), rtol=1e-9, atol=0)
    jac = diffusion_loss(off, x, weighting=get_weighting("x"), jacobian=True, **kw)
    torch.testing.assert_close(jac / loss_x, -COSINE.dlogsnr_dt(t), rtol=1e-12, atol=0)
    loss_fn = DiffusionLoss(COSINE, "sigmoid", jacobian=True, process=proc)
    exact = loss_fn(den, {"x": x}, generator=_gen(23)).mean()
    assert loss_fn(off, {"x": x}, generator=_gen(23)).mean() > exact
    with pytest.raises(ValueError, match="multiscale_base needs one weight per example; process 'per_pixel'"):
        diffusion_loss(off, x, weighting=get_weighting("x"), multiscale_base=1, **kw)


def test_loss_config_process_key():
    assert LossConfig().process == {"name": "isotropic"}
    loss_fn = DiffusionLoss.from_config({"weighting": "v"})  # an old config without the key
    assert isinstance(loss_fn.process, IsotropicGaussian) and loss_fn.process.schedule is loss_fn.schedule
    assert loss_fn.to_dict()["process"] == {"name": "isotropic"}
    assert DiffusionLoss.from_config(loss_fn.to_dict()).to_dict() == loss_fn.to_dict()
    with pytest.raises(ConfigError, match="unknown process 'blur'; valid: blurring, isotropic, masked, rolling"):
        DiffusionLoss.from_config({"process": {"name": "blur"}})
