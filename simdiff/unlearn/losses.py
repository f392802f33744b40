"""Unlearning methods as loss objects on :class:`simdiff.train.Trainer` (per-example losses ``[B]``).

Every method fine-tunes a copy of the original model (the *student*, the trainer's model) against the frozen
original (the *teacher*). A batch (:class:`~simdiff.unlearn.sets.PairedPools`) holds ``B`` forget pairs (``f_x``,
their conditioning ``f_c_*`` and anchor conditioning ``f_a_*``) and ``B`` retain pairs (``r_x``, ``r_c_*``); the
loss of example ``i`` is its forget term plus its retain terms. Conditioning is whatever the model's conditioner
made (``labels`` for a class-conditional model, ``context`` / ``context_mask`` for a text model), so every method
works on any simdiff denoiser. All errors are measured on the x-prediction with a weighting ``w(logsnr)``
(:mod:`simdiff.weighting`); the default ``"eps"`` (``w = e^logsnr``) makes ``w ||x - x_hat||^2`` equal to the
epsilon-MSE ``||eps - eps_hat||^2`` the papers below train with, whatever the network predicts. Noise levels are
``logsnr = schedule.logsnr(t)`` at stratified ``t ~ U[0, 1)``; ``z = alpha x + sigma eps``.

Methods (``name``: loss on the forget pair; see each class for the retain terms):

* ``esd`` -- Erased Stable Diffusion (Gandikota et al. 2023, eq. 2 / Sec. 3): regress the conditional prediction on
  the negatively guided original, ``eps* = eps_o(z, null) - eta (eps_o(z, c) - eps_o(z, null))``. A target that
  is an affine combination with weights summing to one is the same combination in the x, eps and v views (they are
  affine in one another at fixed ``z``, logsnr), so it is applied to ``x_o`` directly.
* ``ascent`` -- gradient ascent: the negated diffusion loss on forget pairs.
* ``graddiff`` -- gradient difference: ascent on forget pairs plus ``retain_weight`` x the diffusion loss on
  retain pairs.
* ``salun`` -- saliency-masked unlearning in the style of SalUn (Fan et al. 2024): the weights whose gradient of the
  forget diffusion loss (at the original weights) is in the top ``mask_fraction`` by magnitude are the only ones
  updated (gradient hooks zero the rest; with AdamW's weight decay 0 they stay bit-identical); the forget loss is
  random labelling for diffusion models, ``w ||x_theta(z_f, c_f) - sg[x_theta(z_f, c')]||^2`` with ``c'`` the
  conditioning of a (random) retain example and ``z_f`` a noised forget image, plus ``retain_weight`` x the retain
  diffusion loss. The stop-gradient on the ``c'`` branch is this library's choice; SalUn's exact loss equation was
  not checked against the paper.
* ``ablation`` -- concept ablation, model-based variant (Kumari et al. 2023, Sec. 3): ``x_theta(z, c_forget)``
  regressed on ``x_o(z, c_anchor)`` with ``z`` noised from the original model's samples of the anchor (the unlearning
  run gives this method anchor images as its forget images).

``<name>_ip`` ("integrity-preserving") adds ``preserve`` x ``w ||x_theta(z_r, c_r) - x_o(z_r, c_r)||^2``:
distillation of the original model's predictions on retain pairs. This is the family Schioppa, Hoogeboom & Heek
(2024, "Model Integrity when Unlearning with T2I Diffusion Models") argue for; **their exact losses were not
retrievable here**, so these variants are documented baselines of this library, not the paper's algorithms.

ESD's original draws ``z`` by partially sampling the model being trained from the forget prompt; here ``z`` is the
original model's sample of the forget key, noised (the student starts as the original, so the two agree at step 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.configuration import ConfigError
from simdiff.process import DenoiserOutput, add_noise
from simdiff.processes.times import sample_t
from simdiff.schedules import Schedule
from simdiff.unlearn import BASE_METHODS, METHODS
from simdiff.weighting import get_weighting

__all__ = ["UnlearnLoss", "ESD", "GradientAscent", "GradientDifference", "SalUn", "ConceptAblation", "METHODS",
           "method_class", "split_pairs", "teacher_call"]


def split_pairs(batch: dict[str, Tensor], prefix: str) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(x, cond, anchor_cond)`` of the ``f_`` (forget) or ``r_`` (retain) half of a batch."""
    if f"{prefix}x" not in batch:
        raise ValueError(f"unlearning batch needs '{prefix}x'; got keys {sorted(batch)}")
    cond = {k[len(prefix) + 2:]: v for k, v in batch.items() if k.startswith(f"{prefix}c_")}
    anchor = {k[len(prefix) + 2:]: v for k, v in batch.items() if k.startswith(f"{prefix}a_")}
    return batch[f"{prefix}x"], cond, anchor


def _sq(err: Tensor) -> Tensor:
    return err.pow(2).flatten(1).mean(1)


def _frozen(teacher: Any) -> Any:
    """Freeze an ``nn.Module`` original in place (eval mode, no gradients); other callables pass through."""
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False)
    if not callable(teacher):
        raise ValueError(f"the original model must be a denoiser callable, got {type(teacher).__name__}")
    return teacher


def teacher_call(teacher: Callable[..., Any], z: Tensor, logsnr: Tensor, cond: dict[str, Tensor]) -> DenoiserOutput:
    """The frozen original's prediction without a graph, cast to ``z``'s dtype."""
    with torch.no_grad():
        out = teacher(z, logsnr, **cond)
    return DenoiserOutput(x=out.x.to(z.dtype), eps=out.eps.to(z.dtype), v=out.v.to(z.dtype))


class UnlearnLoss:
    """Base of the unlearning losses: noising, weighting, the teacher call and the integrity-preserving term.

    Args:
        student: the model being trained (a copy of the teacher; :class:`SalUn` hooks its gradients).
        teacher: the frozen original denoiser ``teacher(z, logsnr, **cond) -> DenoiserOutput``.
        schedule: the original model's log-SNR schedule.
        null_cond: the unconditional conditioning for one example (``{name: [1, ...]}``, the conditioner's
            ``null(1)``), broadcast to the batch.
        weighting: ``simdiff.weighting`` name of ``w(logsnr)`` on the x-error ("eps": the epsilon-MSE).
        preserve: weight of the integrity-preserving distillation term on retain pairs (0: off).
    """

    name = "base"

    def __init__(self, student: nn.Module | None, teacher: Callable[..., Any], schedule: Schedule, *,
                 null_cond: dict[str, Tensor], weighting: str = "eps", preserve: float = 0.0) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a simdiff Schedule, got {type(schedule).__name__}")
        if not preserve >= 0:
            raise ConfigError(f"preserve must be >= 0, got {preserve}")
        self.student, self.teacher, self.schedule = student, _frozen(teacher), schedule
        self.null_cond = {k: v[:1].detach() for k, v in null_cond.items()}
        self.weighting = get_weighting(weighting)
        self.preserve = float(preserve)

    # -- pieces -------------------------------------------------------------------------------------------------
    def noise(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, logsnr [B], w [B])`` at stratified times."""
        b = x.shape[0]
        gdev = generator.device if generator is not None else x.device
        t = sample_t(b, generator=generator, device=gdev, dtype=torch.float64).to(x.device)
        lam = self.schedule.logsnr(t).to(x.dtype)
        eps = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        return add_noise(x, eps, logsnr=lam), lam, self.weighting(lam.double()).to(x.dtype)

    def null(self, b: int, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """The unconditional conditioning for ``b`` examples, on the device / dtype of ``like``'s tensors."""
        out = {}
        for k, v in self.null_cond.items():
            ref = like.get(k)
            v = v.to(ref.device if ref is not None else v.device)
            if ref is not None and v.dtype != ref.dtype:
                v = v.to(ref.dtype)
            out[k] = v.expand(b, *v.shape[1:])
        return out

    def diffusion_term(self, model: Callable[..., Any], x: Tensor, cond: dict[str, Tensor],
                       generator: torch.Generator | None) -> Tensor:
        """``w ||x - x_theta(z, cond)||^2`` per example (the training loss)."""
        z, lam, w = self.noise(x, generator)
        return w * _sq(x - model(z, lam, **cond).x)

    def preserve_term(self, model: Callable[..., Any], batch: dict[str, Tensor],
                      generator: torch.Generator | None) -> Tensor:
        """``preserve * w ||x_theta(z_r, c_r) - x_o(z_r, c_r)||^2``: distil the original on retain pairs."""
        x, cond, _ = split_pairs(batch, "r_")
        z, lam, w = self.noise(x, generator)
        target = teacher_call(self.teacher, z, lam, cond).x
        return self.preserve * w * _sq(model(z, lam, **cond).x - target)

    # -- the loss -----------------------------------------------------------------------------------------------
    def forget_loss(self, model: Callable[..., Any], batch: dict[str, Tensor],
                    generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: Callable[..., Any], batch: dict[str, Tensor],
                 generator: torch.Generator | None = None) -> Tensor:
        loss = self.forget_loss(model, batch, generator)
        if self.preserve > 0:
            loss = loss + self.preserve_term(model, batch, generator)
        return loss

    def describe(self) -> dict[str, Any]:
        """The method's settings for the run record."""
        return {"method": self.name, "weighting": self.weighting.to_dict(), "preserve": self.preserve}


class ESD(UnlearnLoss):
    """Erased Stable Diffusion (Gandikota et al. 2023): negative-guidance target on the forget key, strength ``eta``."""

    name = "esd"

    def __init__(self, student, teacher, schedule, *, eta: float = 1.0, **kw) -> None:
        super().__init__(student, teacher, schedule, **kw)
        self.eta = float(eta)

    def forget_loss(self, model, batch, generator):
        x, cond, _ = split_pairs(batch, "f_")
        z, lam, w = self.noise(x, generator)
        x_c = teacher_call(self.teacher, z, lam, cond).x
        x_n = teacher_call(self.teacher, z, lam, self.null(x.shape[0], cond)).x
        target = x_n - self.eta * (x_c - x_n)
        return w * _sq(model(z, lam, **cond).x - target)

    def describe(self):
        return {**super().describe(), "eta": self.eta}


class GradientAscent(UnlearnLoss):
    """Gradient ascent: ``-w ||x_f - x_theta(z_f, c_f)||^2`` (the negated diffusion loss on forget pairs)."""

    name = "ascent"

    def forget_loss(self, model, batch, generator):
        x, cond, _ = split_pairs(batch, "f_")
        return -self.diffusion_term(model, x, cond, generator)


class GradientDifference(UnlearnLoss):
    """Gradient difference: ascent on forget pairs plus ``retain_weight`` x the diffusion loss on retain pairs."""

    name = "graddiff"

    def __init__(self, student, teacher, schedule, *, retain_weight: float = 1.0, **kw) -> None:
        super().__init__(student, teacher, schedule, **kw)
        self.retain_weight = float(retain_weight)

    def forget_loss(self, model, batch, generator):
        xf, cf, _ = split_pairs(batch, "f_")
        xr, cr, _ = split_pairs(batch, "r_")
        return (-self.diffusion_term(model, xf, cf, generator)
                + self.retain_weight * self.diffusion_term(model, xr, cr, generator))

    def describe(self):
        return {**super().describe(), "retain_weight": self.retain_weight}


class SalUn(UnlearnLoss):
    """SalUn-style saliency-masked unlearning (Fan et al. 2024; see the module docstring).

    Args:
        mask_fraction: fraction of the weights (by forget-gradient magnitude, one global threshold) that are updated.
        mask_batch: forget pairs (``{"f_x", "f_c_*"}``) whose loss gradient at the original weights defines the
            saliency; required unless the mask is restored from a checkpoint (:meth:`load_aux_state_dict`).
        retain_weight: weight of the retain diffusion loss.
        mask_seed: seeds the noise of the saliency gradient.
    """

    name = "salun"

    def __init__(self, student, teacher, schedule, *, mask_fraction: float = 0.5, retain_weight: float = 1.0,
                 mask_batch: dict[str, Tensor] | None = None, mask_seed: int = 0, **kw) -> None:
        super().__init__(student, teacher, schedule, **kw)
        if not 0.0 < mask_fraction <= 1.0:
            raise ConfigError(f"salun mask_fraction must be in (0, 1], got {mask_fraction}")
        if student is None:
            raise ValueError("salun needs the student module (its gradients are masked)")
        self.mask_fraction, self.retain_weight = float(mask_fraction), float(retain_weight)
        self.params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        self.masks: dict[str, Tensor] = {}
        if mask_batch is not None:
            self.masks = self.saliency(mask_batch, seed=mask_seed)
        for n, p in self.params.items():
            p.register_hook(lambda g, n=n: self._masked(n, g))

    def _masked(self, name: str, grad: Tensor) -> Tensor:
        mask = self.masks.get(name)
        return grad if mask is None else grad * mask.to(device=grad.device, dtype=grad.dtype)

    def saliency(self, batch: dict[str, Tensor], *, seed: int = 0) -> dict[str, Tensor]:
        """Masks ``{name: bool tensor}``: True where ``|d forget loss / d w|`` at the teacher's weights is in the top
        ``mask_fraction`` (ties at the threshold included)."""
        x, cond, _ = split_pairs(batch, "f_")
        net = _copy_trainable(self.teacher)
        g = torch.Generator(x.device).manual_seed(seed)
        with torch.enable_grad():
            loss = self.diffusion_term(net, x, cond, g).mean()
            grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()], allow_unused=True)
        mags = {n: (gr.abs() if gr is not None else torch.zeros_like(p))
                for (n, p), gr in zip(net.named_parameters(), grads)}
        mags = {n: m for n, m in mags.items() if n in self.params}
        flat = torch.cat([m.flatten().double() for m in mags.values()])
        k = max(1, round(self.mask_fraction * flat.numel()))
        thresh = torch.topk(flat, k).values[-1]
        return {n: (m.double() >= thresh) for n, m in mags.items()}

    def mask_density(self) -> float:
        """The fraction of weights that are updated."""
        tot = sum(m.numel() for m in self.masks.values())
        return float(sum(int(m.sum()) for m in self.masks.values()) / max(tot, 1))

    def forget_loss(self, model, batch, generator):
        if not self.masks:
            raise RuntimeError("salun has no saliency mask (give mask_batch or restore it from a checkpoint)")
        xf, cf, _ = split_pairs(batch, "f_")
        xr, cr, _ = split_pairs(batch, "r_")
        z, lam, w = self.noise(xf, generator)
        with torch.no_grad():  # the prediction under another (retain) example's conditioning, held fixed
            target = model(z, lam, **cr).x.detach()
        relabelled = w * _sq(model(z, lam, **cf).x - target)
        return relabelled + self.retain_weight * self.diffusion_term(model, xr, cr, generator)

    def aux_state_dict(self) -> dict[str, Tensor]:
        return {f"mask.{n}": m.to(torch.uint8) for n, m in self.masks.items()}

    def load_aux_state_dict(self, d: dict[str, Tensor]) -> None:
        self.masks = {k[len("mask."):]: v.bool() for k, v in d.items() if k.startswith("mask.")}

    def describe(self):
        return {**super().describe(), "mask_fraction": self.mask_fraction, "retain_weight": self.retain_weight}


def _copy_trainable(module: Any) -> Any:
    import copy

    if not isinstance(module, nn.Module):
        raise ValueError("salun needs a network teacher (its weight gradients define the saliency)")
    net = copy.deepcopy(module)
    net.requires_grad_(True)
    return net


class ConceptAblation(UnlearnLoss):
    """Concept ablation, model-based (Kumari et al. 2023): ``w ||x_theta(z, c_f) - x_o(z, c_anchor)||^2``, ``z`` from
    the anchor's images (the batch's forget images are the original model's samples of the anchor)."""

    name = "ablation"

    def forget_loss(self, model, batch, generator):
        x, cond, anchor = split_pairs(batch, "f_")
        if not anchor:
            raise ValueError("ablation needs the anchor conditioning (f_a_*) in the batch")
        z, lam, w = self.noise(x, generator)
        target = teacher_call(self.teacher, z, lam, anchor).x
        return w * _sq(model(z, lam, **cond).x - target)


_BASE: dict[str, type[UnlearnLoss]] = {"esd": ESD, "ascent": GradientAscent, "graddiff": GradientDifference,
                                       "salun": SalUn, "ablation": ConceptAblation}
assert tuple(_BASE) == BASE_METHODS


def method_class(name: str) -> tuple[type[UnlearnLoss], bool]:
    """``(loss class, integrity-preserving?)`` of a method name; a one-line ConfigError names the valid ones."""
    base, ip = (name[:-3], True) if isinstance(name, str) and name.endswith("_ip") else (name, False)
    if base not in _BASE:
        raise ConfigError(f"unknown unlearning method {name!r}; valid: {', '.join(METHODS)}")
    return _BASE[base], ip
