"""Quantised drop-in layers: Linear / Conv2d / ConvTranspose2d with int weights, and attention with quantised matmuls.

Which layer runs what (``activations="int8"``):

=====================================  ======================  =====================================================
layer                                  weights                 kernel
=====================================  ======================  =====================================================
``nn.Linear``, int8 weights            int8 per out-channel    real int8 GEMM: ``torch._int_mm`` (int8 x int8 ->
                                                               int32) on the uint8 activation codes shifted by -128,
                                                               with the zero-point correction and both scales
                                                               applied to the int32 accumulator
``nn.Linear``, int4 weights            int4 group-wise         fake quantisation (dequantised weight, float GEMM)
``nn.Conv2d`` / ``ConvTranspose2d``    int8 or int4            fake quantisation (dequantised weight, float conv)
attention ``q k^T`` and ``p v``        (no weights)            fake-quantised int8 q, k, v (calibrated, per tensor)
                                                               and probabilities p (fixed range [0, 1]); float32
                                                               matmuls and softmax (SDPA is bypassed)
norms, SiLU/GELU, residual adds,       float32                 float32 (not quantised)
embeddings, first / last conv
=====================================  ======================  =====================================================

With ``activations="float16"`` (W8A16) every quantised layer's input is rounded to float16 and the weights are the
dequantised int codes (weight-only quantisation, float kernels); with ``"none"`` inputs stay float32.

Split quantisation (Q-Diffusion, Li et al. 2023, "shortcut splitting"): a layer whose input channels are a concatenation
``[h, skip]`` gets one activation quantiser per branch and its weight quantised separately per branch (its own
per-output-channel scales for ``W[:, :c_h]`` and ``W[:, c_h:]``), i.e. ``y = Q(W_1) Q(x_1) + Q(W_2) Q(x_2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import (
    RangeObserver,
    act_qparams,
    dequantize_groupwise,
    dequantize_per_channel,
    fake_quant_act,
    pack_int4,
    quantize_groupwise,
    quantize_per_channel,
    unpack_int4,
)

__all__ = ["ActQuant", "QuantLayer", "QuantAttention", "ACT_MODES"]

#: what a quantised layer does to its input: int8 (fake) quantisation, float16 rounding, nothing.
ACT_MODES = ("int8", "float16", "none")


class ActQuant(nn.Module):
    """Per-tensor activation quantiser with buffers ``scale`` / ``zero_point`` ``[1]``.

    ``state``: "observe" (record the range, pass through), "quant" (fake-quantise), "float16" (round to float16),
    "off" (pass through; also an int8 quantiser that calibration never reached, saved with ``scale = 0``).
    ``fixed=(lo, hi)`` sets a range that is never calibrated (attention probabilities).
    """

    def __init__(self, mode: str = "int8", *, bits: int = 8, fixed: tuple[float, float] | None = None):
        super().__init__()
        self.mode, self.bits, self.fixed = mode, bits, fixed
        scale, zp = act_qparams(*fixed, bits) if fixed is not None else (1.0, 0.0)
        self.register_buffer("scale", torch.tensor([scale]))
        self.register_buffer("zero_point", torch.tensor([zp]))
        self.state = "off" if mode == "none" else ("float16" if mode == "float16" else "quant")
        self.observer: RangeObserver | None = None
        self.register_load_state_dict_post_hook(lambda mod, _incompatible: mod._after_load())

    def start_observing(self, method: str, percentile: float) -> None:
        if self.mode == "int8" and self.fixed is None:
            self.observer = RangeObserver(method, percentile=percentile, bits=self.bits)
            self.state = "observe"

    def freeze(self) -> None:
        """Set ``scale`` / ``zero_point`` from the observed range. A quantiser the calibration never reached (e.g.
        cross-attention without context in the calibration set) stays float; it is saved with ``scale = 0``."""
        if self.state == "observe":
            if self.observer.count == 0:
                self.scale.zero_()
                self.zero_point.zero_()
                self.observer, self.state = None, "off"
                return
            scale, zp = act_qparams(*self.observer.range(), self.bits)
            self.scale.fill_(scale)
            self.zero_point.fill_(zp)
            self.observer, self.state = None, "quant"

    def _after_load(self) -> None:
        if self.mode == "int8" and self.fixed is None:
            self.state = "off" if float(self.scale) == 0.0 else "quant"

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "quant":
            return fake_quant_act(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.bits)
        if self.state == "float16":
            return x.to(torch.float16).to(x.dtype)
        if self.state == "observe":
            self.observer.update(x)
        return x

    def extra_repr(self) -> str:
        return f"mode={self.mode}, state={self.state}"


class QuantLayer(nn.Module):
    """A quantised ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` (built by :meth:`from_float`).

    State dict: per input branch ``i``: ``qweight_i`` (int8 codes, or uint8 with two int4 codes per byte),
    ``wscale_i`` (``[out]`` or ``[out, groups]``), ``act_i.scale``, ``act_i.zero_point``; and ``bias``.
    The dequantised float weight is a cache rebuilt by :meth:`refresh` (not saved).
    """

    def __init__(self, module: nn.Module, *, weight_bits: int, group_size: int, act: str, split: list[int] | None,
                 int8_kernel: bool):
        super().__init__()
        if isinstance(module, nn.Linear):
            self.kind = "linear"
        elif isinstance(module, nn.ConvTranspose2d):
            self.kind = "conv_transpose2d"
        elif isinstance(module, nn.Conv2d):
            self.kind = "conv2d"
        else:
            raise ValueError(f"cannot quantise a {type(module).__name__}")
        w = module.weight.detach().float()
        self.transposed = self.kind == "conv_transpose2d"
        w_oi = w.transpose(0, 1) if self.transposed else w  # [out, in, ...]
        self.weight_shape = tuple(w.shape)
        self.in_dim = w_oi.shape[1]
        self.split = list(split) if split else [self.in_dim]
        if sum(self.split) != self.in_dim:
            raise ValueError(f"split {self.split} does not add up to the layer's {self.in_dim} input channels")
        self.weight_bits, self.group_size, self.act = weight_bits, group_size, act
        self.int8_kernel = bool(int8_kernel and self.kind == "linear" and weight_bits == 8 and act == "int8")
        if self.kind != "linear":
            self.conv_args = {k: getattr(module, k) for k in ("stride", "padding", "dilation", "groups")}
            if self.transposed:
                self.conv_args["output_padding"] = module.output_padding
            if self.conv_args["groups"] != 1:
                raise ValueError("grouped convolutions are not supported by the quantiser")
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float().clone(),
                                                                   requires_grad=False)
        self.acts = nn.ModuleList(ActQuant(act) for _ in self.split)
        start = 0
        for i, c in enumerate(self.split):
            part = w_oi[:, start:start + c]
            start += c
            if weight_bits == 8:
                q, s = quantize_per_channel(part, 8)
            else:
                q, s = quantize_groupwise(part, weight_bits, group_size)
                if weight_bits == 4:
                    q = pack_int4(q if q.shape[1] % 2 == 0 else F.pad(q, (0, 1)))
            self.register_buffer(f"qweight_{i}", q)
            self.register_buffer(f"wscale_{i}", s)
        self.register_load_state_dict_post_hook(lambda mod, _incompatible: mod.refresh())
        self.refresh()

    def _part_shape(self, i: int) -> tuple[int, ...]:
        shape = list(self.weight_shape)
        if self.transposed:
            shape[0], shape[1] = shape[1], shape[0]
        shape[1] = self.split[i]
        return tuple(shape)

    def _dequant(self, i: int) -> Tensor:
        q, s = getattr(self, f"qweight_{i}"), getattr(self, f"wscale_{i}")
        shape = self._part_shape(i)
        if self.weight_bits == 8:
            return dequantize_per_channel(q, s)
        codes = unpack_int4(q) if self.weight_bits == 4 else q
        return dequantize_groupwise(codes[:, : s.shape[1] * self.group_size], s, shape)

    def refresh(self) -> None:
        """Rebuild the cached dequantised float weight (and the int8 kernel's operands) from the saved codes."""
        w_oi = torch.cat([self._dequant(i) for i in range(len(self.split))], dim=1)
        w = w_oi.transpose(0, 1) if self.transposed else w_oi
        self.register_buffer("_weight", w.contiguous(), persistent=False)
        if self.int8_kernel:
            for i in range(len(self.split)):
                q = getattr(self, f"qweight_{i}")
                self.register_buffer(f"_qt_{i}", q.t().contiguous(), persistent=False)  # [in_i, out] int8
                self.register_buffer(f"_colsum_{i}", q.float().sum(dim=1), persistent=False)  # [out], exact

    def _quant_input(self, x: Tensor) -> Tensor:
        if len(self.split) == 1:
            return self.acts[0](x)
        dim = -1 if self.kind == "linear" else 1
        return torch.cat([a(p) for a, p in zip(self.acts, x.split(self.split, dim=dim))], dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        if (self.int8_kernel and x.dtype == torch.float32 and x.device.type == "cpu"
                and all(a.state == "quant" for a in self.acts)):  # elsewhere: the same math, fake-quantised
            return self._int8_linear(x)
        x = self._quant_input(x)
        w = self._weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.transposed:
            return F.conv_transpose2d(x, w, b, **self.conv_args)
        return F.conv2d(x, w, b, **self.conv_args)

    def _int8_linear(self, x: Tensor) -> Tensor:
        """``sum_i s_a,i s_w,i int_mm(q_i - 128, W_i^T) + bias_eff`` with the zero points folded into
        ``bias_eff = bias - sum_i s_a,i s_w,i (zp_i - 128) colsum(W_i)`` (exact int32 sums)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        parts = x2.split(self.split, dim=-1) if len(self.split) > 1 else (x2,)
        out, bias = None, (x.new_zeros(()) if self.bias is None else self.bias)
        for i, (act, part) in enumerate(zip(self.acts, parts)):
            q = torch.div(part, act.scale).round_().add_(act.zero_point - 128).clamp_(-128, 127).to(torch.int8)
            acc = torch._int_mm(q, getattr(self, f"_qt_{i}"))
            out_scale = act.scale * getattr(self, f"wscale_{i}")
            bias = bias - out_scale * (act.zero_point - 128) * getattr(self, f"_colsum_{i}")
            y = acc.float().mul_(out_scale)
            out = y if out is None else out.add_(y)
        return out.add_(bias).reshape(*lead, out.shape[-1])

    def weight_bytes(self) -> int:
        return sum(getattr(self, f"qweight_{i}").numel() * getattr(self, f"qweight_{i}").element_size()
                   + getattr(self, f"wscale_{i}").numel() * 4 for i in range(len(self.split)))

    def describe(self) -> dict:
        kernel = "int8 GEMM (torch._int_mm)" if self.int8_kernel else "fake quant (float kernel)"
        weights = "int8 per channel" if self.weight_bits == 8 else f"int{self.weight_bits} groups of {self.group_size}"
        return {"type": self.kind, "weights": weights, "activations": self.act, "split": self.split,
                "kernel": kernel}

    def extra_repr(self) -> str:
        return f"{self.kind}, w{self.weight_bits}, act={self.act}, split={self.split}, int8_kernel={self.int8_kernel}"


class QuantAttention(nn.Module):
    """:class:`simdiff.nets.layers.Attention` with explicit ``softmax(q k^T / sqrt(d)) v`` on quantised operands.

    q and k are quantised after the QK-norm (what enters the matmul), v after the projection; the softmax output
    is quantised on the fixed range [0, 1] (8 bits unsigned: step 1/255). Matmuls and softmax run in float32.
    The projections (``qkv`` / ``q``, ``kv``, ``proj``) are the original module's, quantised separately.
    """

    def __init__(self, attn: nn.Module, act: str):
        super().__init__()
        self.num_heads, self.cross = attn.num_heads, attn.cross
        if self.cross:
            self.q, self.kv = attn.q, attn.kv
        else:
            self.qkv = attn.qkv
        self.q_norm, self.k_norm, self.proj = attn.q_norm, attn.k_norm, attn.proj
        self.act = act
        self.act_q, self.act_k, self.act_v = ActQuant(act), ActQuant(act), ActQuant(act)
        self.act_p = ActQuant(act, fixed=(0.0, 1.0))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        b, n, c = q.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.act_q(self.q_norm(q.view(b, n, h, d).transpose(1, 2)))
        k = self.act_k(self.k_norm(k.view(b, k.shape[1], h, d).transpose(1, 2)))
        v = self.act_v(v.view(b, v.shape[1], h, d).transpose(1, 2))
        if self.act == "none":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            out = self.act_p(logits.softmax(dim=-1)) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
