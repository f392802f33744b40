"""Optional layer-wise output reconstruction of the weight rounding (AdaRound, Nagel et al. 2020).

For each quantised layer, rounding up or down is learned per weight instead of rounding to nearest: with the
layer's scales fixed, ``W_soft = s * clamp(floor(W / s) + h(V), -qmax, qmax)``, ``h(V) = clamp(1.2 sigmoid(V) - 0.1,
0, 1)`` initialised so that ``W_soft = W``, and ``V`` minimises the layer's relative output error on calibration
inputs plus ``lambda * mean(1 - |2 h - 1|^beta)`` (beta annealed from 20 to 2 after the first 20 % of the steps),
which pushes every ``h`` to 0 or 1; the final codes are ``floor(W / s) + [V > 0]``.

What this is and is not: layer by layer (not BRECQ's block-wise reconstruction, which Q-Diffusion uses), on the
float model's own inputs to that layer (fake-quantised by the layer's calibrated activation quantiser), with the
float layer's output as the target. ``lambda = 0.01`` on a relative (variance-normalised) output error and Adam with
learning rate 1e-2 are our choices, not verified against the AdaRound or Q-Diffusion papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import QuantLayer
from .quantizers import pack_int4

__all__ = ["adaround_model", "adaround_layer"]


def _rect_sigmoid(v: Tensor) -> Tensor:
    return (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1)


def _capture(model: nn.Module, module: nn.Module, batches) -> Tensor:
    got: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach().clone()))
    try:
        with torch.inference_mode():
            for z, logsnr, cond in batches:
                model(z, logsnr, **cond)
    finally:
        handle.remove()
    return torch.cat(got)


def _apply(q: QuantLayer, x: Tensor, w: Tensor) -> Tensor:
    b = q.bias
    if q.kind == "linear":
        return F.linear(x, w, b)
    if q.transposed:
        return F.conv_transpose2d(x, w, b, **q.conv_args)
    return F.conv2d(x, w, b, **q.conv_args)


def adaround_layer(q: QuantLayer, float_layer: nn.Module, inputs: Tensor, *, iters: int = 300, batch: int = 32,
                   lam: float = 0.01, lr: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """Learn ``q``'s rounding on ``inputs`` (the float layer's inputs); returns the relative output error
    ``(round to nearest, learned)`` on ``inputs``. Rounding that ends up worse than round-to-nearest on ``inputs``
    (possible when ``h`` has not converged to 0/1) is discarded."""
    w = float_layer.weight.detach().float()
    w_oi = w.transpose(0, 1) if q.transposed else w
    qmax = 2 ** (q.weight_bits - 1) - 1
    floors, scales, vs, shapes = [], [], [], []
    start = 0
    for i, c in enumerate(q.split):
        part = w_oi[:, start:start + c].reshape(w_oi.shape[0], -1)
        start += c
        s = getattr(q, f"wscale_{i}")
        if q.weight_bits == 8:
            ratio = part / s[:, None]
            s_full = s[:, None].expand_as(part)
        else:
            s_full = s.repeat_interleave(q.group_size, dim=1)[:, : part.shape[1]]
            ratio = part / s_full
        fl = torch.floor(ratio)
        rest = (ratio - fl).clamp(1e-4, 1 - 1e-4)
        v = torch.log((rest + 0.1) / (1.1 - rest)).requires_grad_(True)  # h(v) = rest: W_soft = W (unclamped)
        floors.append(fl)
        scales.append(s_full)
        vs.append(v)
        shapes.append(q._part_shape(i))

    def weight(hard: bool) -> Tensor:
        parts = []
        for fl, s_full, v, shape in zip(floors, scales, vs, shapes):
            h = (v > 0).float() if hard else _rect_sigmoid(v)
            parts.append((s_full * (fl + h).clamp(-qmax, qmax)).reshape(shape))
        w_q = torch.cat(parts, dim=1)
        return w_q.transpose(0, 1) if q.transposed else w_q

    with torch.no_grad():
        xq = q._quant_input(inputs)
        target = float_layer(inputs)
        var = target.var().clamp_min(1e-12)
        before = float((_apply(q, xq, q._weight) - target).norm() / target.norm())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vs, lr=lr)
    warm = int(0.2 * iters)
    for step in range(iters):
        idx = torch.randint(inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
        rec = F.mse_loss(_apply(q, xq[idx], weight(False)), target[idx]) / var
        beta = 20 - 18 * max(0.0, (step - warm) / max(1, iters - warm))
        reg = sum((1 - (2 * _rect_sigmoid(v) - 1).abs().pow(beta)).mean() for v in vs) / len(vs)
        loss = rec + (lam * reg if step >= warm else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        nearest = [getattr(q, f"qweight_{i}").clone() for i in range(len(q.split))]
        for i, (fl, v) in enumerate(zip(floors, vs)):
            codes = (fl + (v > 0).float()).clamp(-qmax, qmax).to(torch.int8)
            if q.weight_bits == 4:
                full = torch.zeros(codes.shape[0], getattr(q, f"wscale_{i}").shape[1] * q.group_size,
                                   dtype=torch.int8)
                full[:, : codes.shape[1]] = codes
                codes = pack_int4(full if full.shape[1] % 2 == 0 else F.pad(full, (0, 1)))
            elif q.weight_bits != 8:
                raise ValueError(f"adaround supports 8- and 4-bit weights, got {q.weight_bits}")
            getattr(q, f"qweight_{i}").copy_(codes.reshape(getattr(q, f"qweight_{i}").shape))
        q.refresh()
        after = float((_apply(q, xq, q._weight) - target).norm() / target.norm())
        if after >= before:  # the hardened rounding lost to round-to-nearest: keep round-to-nearest
            for i, codes in enumerate(nearest):
                getattr(q, f"qweight_{i}").copy_(codes)
            q.refresh()
            after = before
    return before, after


def adaround_model(qmodel: nn.Module, float_model: nn.Module, calib, *, iters: int = 300, max_examples: int = 128,
                   batch_size: int = 64, seed: int = 0) -> dict[str, tuple[float, float]]:
    """:func:`adaround_layer` for every :class:`QuantLayer` of ``qmodel`` (inputs captured from ``float_model`` on
    the first ``max_examples`` rows of ``calib``); returns ``{name: (error before, error after)}``."""
    subset = calib.subset(torch.arange(min(max_examples, len(calib))))
    floats = dict(float_model.named_modules())
    report = {}
    for name, q in qmodel.named_modules():
        if isinstance(q, QuantLayer):
            x = _capture(float_model, floats[name], subset.batches(batch_size))
            report[name] = adaround_layer(q, floats[name], x, iters=iters, seed=seed)
    return report
