"""Moment matching distillation (Salimans, Mensink, Heek & Hoogeboom, NeurIPS 2024, arXiv 2406.04103).

A ``k``-step *stochastic* student ``x_tilde = g(z_t, t)`` is trained so that the conditional moments of its samples
match the teacher's, ``E_g[x_tilde | z_s] = x_hat_teacher(z_s, s)``, along its own sampling path.

Sampler: ``z_1 ~ N(0, I)``; for ``t = 1, ..., 1/k``: ``x_tilde = g(z_t, t)``, ``z_s ~ q(z_s | z_t, x_tilde)``
(``process.ddpm_step``, "small" posterior variance); return the last ``x_tilde``.

Training data flow: ``x ~ data``, ``t ~ U{1/k, ..., 1}``, ``z_t = alpha_t x + sigma_t eps``,
``x_tilde = g(z_t, t)``, ``s`` in ``[t - 1/k, t)`` and ``z_s ~ q(z_s | z_t, x_tilde)``. The exact ``s`` distribution
is not verified against the paper: ``s_sampling="uniform"`` (default, our reading: ``s ~ U[t - 1/k, t)``) or
``"grid"`` (``s = t - 1/k``, the next sampler state).

Variant A, ``variant="alternating"``: an auxiliary denoiser ``x_hat_phi`` (attribute ``aux``; default a
trainable deep copy of the student at construction, i.e. "initialised from the teacher" when the student was) is
fitted to the student's *detached* samples with ``w(s) ||x_tilde - x_hat_phi(z_s, s)||^2`` (+ optional
``aux_teacher_reg * w(s) ||x_hat_phi - x_hat_teacher||^2``, the unofficial port's regulariser). The student loss is
``w(s) * <x_tilde, sg(x_hat_phi(z_s, s) - x_hat_teacher(z_s, s))> / d`` whose gradient is
``w(s) J^T (x_hat_phi - x_hat_teacher) / d``. The aux update happens **inside** ``__call__`` (its own Adam,
``aux_updates`` steps per call) *before* the student loss is built; the trainer only steps the student's optimizer.

Variant B, ``variant="parameter"``: ``L = g_A^T Lambda g_B`` with ``g_{A,B}`` the gradient of the teacher's
denoising loss ``w(s) ||x_tilde - x_hat_theta(z_s, s)||^2 / d`` w.r.t. the teacher's parameters ``theta`` on two
independent halves of the batch (double backprop through ``x_tilde``). This needs a *parametric* teacher
(``param_teacher``, an ``nn.Module`` denoiser); for the exact mixture use :class:`MixtureMeansTeacher`, whose
parameters are the component means: at the true means ``x_hat_theta = E[x | z_s]`` is the MSE optimum over all
functions, so ``E[g] = 0`` exactly when the student's samples follow the data (tested). ``Lambda`` is diagonal:
``"identity"`` (default) or ``"adam"`` (``1 / (sqrt(v) + 1e-8)`` with ``v`` an EMA, ``beta2 = 0.999``, of the squared
mean gradient, updated each call without gradient). The batch loss is a scalar; it is returned repeated over the
batch (its mean is ``L``).

Guidance: ``guidance_weight = w > 0`` wraps the teacher in ``simdiff.guidance.classifier_free_guidance`` with
``null_cond`` (e.g. ``{"labels": num_classes}``); the student and aux see the batch's labels.
:class:`NullLabelMixture` makes a class-conditional :class:`~simdiff.toy.GaussianMixture` treat
``labels == num_classes`` as unconditional. Guidance applies to the denoiser teacher (variant A's target); variant B
differentiates ``param_teacher`` as given (wrap it yourself if it should be guided).

The weighting ``w`` names a ``simdiff.weighting`` x-space weight; default ``"x"`` (``w = 1``): with ``s`` reaching
``t = 0`` on the last student step the SNR-type weights explode, and the paper's choice is not verified against it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from simdiff.distill.base import (
    Denoise,
    DistillationLoss,
    check_steps,
    rand,
    randint,
    randn,
    split_batch,
    teacher_call,
    uniform_t_grid,
)
from simdiff.guidance import classifier_free_guidance
from simdiff.process import DenoiserOutput, add_noise, ddpm_step, to_output
from simdiff.samplers.students import sample_moment_matching, sample_moment_matching_large
from simdiff.schedules import Schedule
from simdiff.toy import GaussianMixture

__all__ = ["MomentMatching", "MixtureMeansTeacher", "NullLabelMixture", "AuxModel", "VARIANTS", "S_SAMPLINGS"]

VARIANTS = ("alternating", "parameter")
S_SAMPLINGS = ("uniform", "grid")
PRECONDITIONERS = ("identity", "adam")


def _choice(value: str, valid: tuple[str, ...], name: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


class AuxModel:
    """An auxiliary network owned by a loss object, with its own Adam optimizer (checkpointable, flat tensors).

    ``state_dict()`` is a flat ``{str: Tensor}`` (``net.*`` weights and ``opt.<i>.<key>`` Adam moments) so it can go
    to safetensors; ``load_state_dict`` restores both.
    """

    def __init__(self, net: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        if not isinstance(net, nn.Module):
            raise ValueError(f"auxiliary network must be an nn.Module, got {type(net).__name__}")
        if not lr >= 0:
            raise ValueError(f"auxiliary lr must be >= 0, got {lr}")
        self.net = net.train().requires_grad_(True)
        self.params = [p for p in net.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=betas)

    def step(self, loss: Tensor) -> None:
        """One Adam step on ``loss``. Under ``torch.distributed`` the gradients are first averaged over ranks, so
        every rank's auxiliary network and Adam state stay identical (the step of the global batch)."""
        from simdiff.train.distributed import all_reduce_grads_mean  # lazy: keeps simdiff.train out of imports

        self.opt.zero_grad(set_to_none=True)
        loss.backward(inputs=self.params)
        all_reduce_grads_mean(self.params)
        self.opt.step()

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        for i, p in enumerate(self.params):
            for k, v in self.opt.state.get(p, {}).items():
                out[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().clone()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        for key, v in state.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                self.opt.state[self.params[int(i)]][k] = v.clone()


class NullLabelMixture:
    """A class-conditional mixture denoiser where ``labels == num_classes`` (or ``labels=None``) is unconditional."""

    def __init__(self, mixture: GaussianMixture) -> None:
        self.mixture = mixture
        self.num_classes = mixture.num_classes

    def __call__(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, **_: object) -> DenoiserOutput:
        if labels is None:
            return self.mixture.denoise(z, logsnr)
        labels = labels.reshape(-1)
        null = labels == self.num_classes
        x_c = self.mixture.posterior_mean(z, logsnr, labels.clamp(max=self.num_classes - 1))
        x = torch.where(null.reshape(-1, *([1] * (z.dim() - 1))), self.mixture.posterior_mean(z, logsnr), x_c)
        return to_output("x", x, z=z, logsnr=logsnr)


class MixtureMeansTeacher(nn.Module):
    """The exact mixture denoiser as a parametric teacher whose parameters ``theta`` are the component means.

    Stand-in for "the teacher network's parameters" in variant B: gradients of the denoising loss w.r.t. the means
    are exact (autograd through the closed-form posterior mean).
    """

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.means = nn.Parameter(mixture.means.detach().clone())
        self.register_buffer("variances", mixture.variances.detach().clone())
        self.register_buffer("weights", mixture.log_weights.detach().exp())
        self.register_buffer("classes", mixture.classes.detach().clone())

    def forward(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, **_: object) -> DenoiserOutput:
        gm = GaussianMixture(self.means, self.variances, self.weights, self.classes)
        x = gm.posterior_mean(z, logsnr, labels).to(z.dtype)
        return to_output("x", x, z=z, logsnr=logsnr)


class MomentMatching(DistillationLoss):
    """Moment matching distillation loss object (see the module docstring for the algorithm and options).

    Args:
        student: the student denoiser module ``g(z_t, logsnr_t, **cond) -> DenoiserOutput`` (its ``.x`` is x_tilde).
        teacher: frozen denoiser callable (e.g. ``GaussianMixture.denoise``).
        schedule: log-SNR schedule of the uniform-t student grid.
        steps: student sampling steps ``k`` (1, 2, 4, 8, ...).
        variant: "alternating" (A, auxiliary denoiser) or "parameter" (B, teacher-gradient moments).
        s_sampling: "uniform" (``s ~ U[t - 1/k, t)``) or "grid" (``s = t - 1/k``).
        weighting: ``simdiff.weighting`` name for ``w(s)`` (default "x").
        aux: variant A's auxiliary denoiser (default: deep copy of ``student``); aux_lr, aux_updates, aux_teacher_reg:
            its Adam lr, updates per call, and the pull-to-teacher regulariser weight.
        param_teacher: variant B's parametric teacher (``nn.Module`` denoiser, e.g. :class:`MixtureMeansTeacher`).
        preconditioner: variant B's ``Lambda``: "identity" or "adam".
        guidance_weight, null_cond: classifier-free guidance of the teacher (``w = 0``: none).
        posterior_variance: "small" or "large" for ``q(z_s | z_t, x_tilde)`` in training and sampling.
    """

    def __init__(
        self,
        student: nn.Module | None,
        teacher: Denoise,
        schedule: Schedule,
        *,
        steps: int = 4,
        variant: str = "alternating",
        s_sampling: str = "uniform",
        weighting: str = "x",
        aux: nn.Module | None = None,
        aux_lr: float = 1e-3,
        aux_updates: int = 1,
        aux_teacher_reg: float = 0.0,
        param_teacher: nn.Module | None = None,
        preconditioner: str = "identity",
        guidance_weight: float = 0.0,
        null_cond: dict[str, Any] | None = None,
        posterior_variance: str = "small",
    ) -> None:
        if guidance_weight != 0.0:
            if not null_cond:
                raise ValueError("MomentMatching: guidance_weight != 0 needs null_cond, e.g. {'labels': num_classes}")
            teacher = classifier_free_guidance(teacher, weight=guidance_weight, null_cond=null_cond)
        super().__init__(student, teacher, schedule, weighting=weighting)
        self.steps = check_steps(steps, "steps")
        self.variant = _choice(variant, VARIANTS, "moment-matching variant")
        self.s_sampling = _choice(s_sampling, S_SAMPLINGS, "s_sampling")
        self.posterior_variance = _choice(posterior_variance, ("small", "large"), "posterior_variance")
        self.preconditioner = _choice(preconditioner, PRECONDITIONERS, "preconditioner")
        self.guidance_weight = float(guidance_weight)
        if isinstance(aux_updates, bool) or not isinstance(aux_updates, int) or aux_updates < 0:
            raise ValueError(f"aux_updates must be an integer >= 0, got {aux_updates!r}")
        if not aux_teacher_reg >= 0:
            raise ValueError(f"aux_teacher_reg must be >= 0, got {aux_teacher_reg}")
        self.aux_updates, self.aux_teacher_reg = aux_updates, float(aux_teacher_reg)
        self.aux: AuxModel | None = None
        self.param_teacher: nn.Module | None = None
        self._sq_avg: list[Tensor] | None = None
        self._sq_count = 0
        if self.variant == "alternating":
            if aux is None:
                if not isinstance(student, nn.Module):
                    raise ValueError("MomentMatching(variant='alternating') needs aux= or a student nn.Module to copy")
                aux = copy.deepcopy(student)
            self.aux = AuxModel(aux, lr=aux_lr)
        else:
            if not isinstance(param_teacher, nn.Module):
                raise ValueError(
                    "MomentMatching(variant='parameter') needs param_teacher=, an nn.Module denoiser "
                    f"(e.g. MixtureMeansTeacher), got {type(param_teacher).__name__}"
                )
            self.param_teacher = param_teacher.eval().requires_grad_(False)

    # -- contract -------------------------------------------------------------------------------------------------
    @property
    def sample_steps(self) -> int:
        return self.steps

    def sampler_spec(self) -> dict[str, Any]:
        return {"sampler": "moment_matching", "steps": self.steps, "grid": "uniform_t", "stochastic": True,
                "posterior_variance": self.posterior_variance}

    def aux_state_dict(self) -> dict[str, Tensor]:
        """Flat tensors of the loss-owned state: aux net + Adam (variant A) or the Adam preconditioner (B)."""
        if self.aux is not None:
            return self.aux.state_dict()
        out = {f"sq_avg.{i}": v.clone() for i, v in enumerate(self._sq_avg or [])}
        out["sq_count"] = torch.tensor(self._sq_count)
        return out

    def load_aux_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.aux is not None:
            self.aux.load_state_dict(state)
            return
        n = len([k for k in state if k.startswith("sq_avg.")])
        self._sq_avg = [state[f"sq_avg.{i}"].clone() for i in range(n)] or None
        self._sq_count = int(state.get("sq_count", torch.tensor(0)))

    def sample(
        self, student: Denoise, z: Tensor, *, generator: torch.Generator | None = None, cond: dict | None = None
    ) -> Tensor:
        """The stochastic ``k``-step student sampler: ancestral steps through ``q(z_s | z_t, x_tilde)`` on the
        uniform-t grid (the registered ``moment_matching`` / ``moment_matching_large`` sampler)."""
        sampler = sample_moment_matching_large if self.posterior_variance == "large" else sample_moment_matching
        return sampler(student, z, uniform_t_grid(self.schedule, self.steps), generator=generator, cond=cond)

    # -- training -------------------------------------------------------------------------------------------------
    def student_samples(
        self, model: Denoise, x: Tensor, cond: dict, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """3.2: ``(x_tilde [B, ...] with grad, z_s [B, ...] detached, logsnr_s [B])``."""
        b, k = x.shape[0], self.steps
        i = randint(k, (b,), like=x, generator=generator)
        t = (i + 1) / k
        if self.s_sampling == "uniform":
            s = t - rand((b,), like=x, generator=generator) / k
        else:
            s = t - 1.0 / k
        lam_t, lam_s = self.times_to_logsnr(t), self.times_to_logsnr(s.clamp_min(0.0))
        z_t = add_noise(x, randn(tuple(x.shape), like=x, generator=generator), logsnr=lam_t)
        x_tilde = model(z_t, lam_t, **cond).x
        noise = randn(tuple(x.shape), like=x, generator=generator)
        z_s = ddpm_step(z_t=z_t, x=x_tilde.detach(), logsnr_s=lam_s, logsnr_t=lam_t, noise=noise,
                        variance=self.posterior_variance)
        return x_tilde, z_s, lam_s

    def loss(self, model: Denoise, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        x, cond = split_batch(batch)
        if self.variant == "parameter":
            if x.shape[0] < 2 or x.shape[0] % 2:
                raise ValueError(f"MomentMatching(variant='parameter') needs an even batch >= 2, got {x.shape[0]}")
            x_tilde, z_s, lam_s = self.student_samples(model, x, cond, generator)
            return self.parameter_space_loss(x_tilde, z_s, lam_s, cond, update_preconditioner=True)
        x_tilde, z_s, lam_s = self.student_samples(model, x, cond, generator)
        w = self.weighting(lam_s)
        x_teacher = teacher_call(self.teacher, z_s, lam_s, cond).x
        for _ in range(self.aux_updates):
            self.aux.step(self.aux_loss(x_tilde.detach(), z_s, lam_s, cond, x_teacher).mean())
        with torch.no_grad():
            direction = self.aux.net(z_s, lam_s, **cond).x - x_teacher
        d = x_tilde[0].numel()
        return w * (x_tilde * direction).reshape(x.shape[0], -1).sum(1) / d

    def aux_loss(self, x_tilde: Tensor, z_s: Tensor, lam_s: Tensor, cond: dict, x_teacher: Tensor) -> Tensor:
        """Variant A's auxiliary denoising loss ``[B]`` on detached student samples (+ teacher regulariser)."""
        b = x_tilde.shape[0]
        x_aux = self.aux.net(z_s, lam_s, **cond).x
        err = (x_tilde - x_aux).pow(2).reshape(b, -1).mean(1)
        if self.aux_teacher_reg > 0:
            err = err + self.aux_teacher_reg * (x_aux - x_teacher).pow(2).reshape(b, -1).mean(1)
        return self.weighting(lam_s) * err

    def parameter_space_loss(
        self, x_tilde: Tensor, z_s: Tensor, lam_s: Tensor, cond: dict, *, update_preconditioner: bool = False
    ) -> Tensor:
        """Variant B: ``L = g_A^T Lambda g_B``, returned repeated over the batch ``[B]``.

        ``x_tilde`` may carry the student's graph (then ``L`` is differentiable in the student's parameters).
        Minibatch A is the first half of the batch, B the second.
        """
        theta = {n: p.detach().requires_grad_(True) for n, p in self.param_teacher.named_parameters()}
        b, d = x_tilde.shape[0], x_tilde[0].numel()
        h = b // 2
        out = functional_call(self.param_teacher, theta, (z_s, lam_s), cond).x.to(x_tilde.dtype)
        per = self.weighting(lam_s) * (x_tilde - out).pow(2).reshape(b, -1).sum(1) / d
        graph = x_tilde.requires_grad
        g_a = torch.autograd.grad(per[:h].mean(), list(theta.values()), create_graph=graph, retain_graph=True)
        g_b = torch.autograd.grad(per[h:].mean(), list(theta.values()), create_graph=graph)
        lam = self._lambda([(a.detach() + c.detach()) / 2 for a, c in zip(g_a, g_b)], update_preconditioner)
        total = sum((a * m * c).sum() for a, m, c in zip(g_a, lam, g_b))
        return torch.as_tensor(total).expand(b)

    def _lambda(self, g_mean: list[Tensor], update: bool) -> list[Tensor]:
        if self.preconditioner == "identity":
            return [torch.ones_like(g) for g in g_mean]
        if update:
            from simdiff.train.distributed import all_reduce_mean_  # lazy: keeps simdiff.train out of imports

            all_reduce_mean_(g_mean)  # under torch.distributed every rank keeps the same preconditioner
            beta = 0.999
            if self._sq_avg is None:
                self._sq_avg = [torch.zeros_like(g) for g in g_mean]
            self._sq_avg = [beta * v + (1 - beta) * g.pow(2) for v, g in zip(self._sq_avg, g_mean)]
            self._sq_count += 1
        if self._sq_avg is None:
            return [torch.ones_like(g) for g in g_mean]
        corr = 1 - 0.999 ** max(self._sq_count, 1)
        return [1.0 / ((v / corr).sqrt() + 1e-8) for v in self._sq_avg]

    def __repr__(self) -> str:
        return (f"MomentMatching(steps={self.steps}, variant={self.variant!r}, s_sampling={self.s_sampling!r}, "
                f"weighting={self.weighting.name!r}, guidance_weight={self.guidance_weight})")

