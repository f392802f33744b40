"""Masked (absorbing-state) discrete diffusion and its autoregressive baseline.

* :mod:`~simdiff.discrete.schedules`: masking schedules ``alpha(t)`` (linear, cosine, log-linear).
* :mod:`~simdiff.discrete.masked`: :class:`MaskedDiffusion`, the process ``"masked"`` (MD4 / MDLM continuous-time
  ELBO, tokens from data, sampling steps).
* :mod:`~simdiff.discrete.sampling`: tau-leaping, the first-hitting sampler (Zheng et al. 2024) and float64
  categorical sampling (vs truncated float32 Gumbel-max).
* :mod:`~simdiff.discrete.transformer`: the token transformer backbone ``"token_transformer"`` (bidirectional, or
  causal for :class:`~simdiff.discrete.autoregressive.AutoregressiveLM`).
* :mod:`~simdiff.discrete.toy`: an exact denoiser of a small joint distribution over token sequences (tests).
"""

from simdiff.discrete.autoregressive import AutoregressiveLM
from simdiff.discrete.masked import MaskedDiffusion, data_from_tokens, decode_text, tokens_from_data
from simdiff.discrete.sampling import (
    categorical,
    first_hitting_step,
    sample_first_hitting,
    sample_tau_leaping,
    tau_leaping_step,
)
from simdiff.discrete.schedules import MASK_SCHEDULES, get_mask_schedule
from simdiff.discrete.transformer import TokenTransformer, TokenTransformerConfig

__all__ = [
    "AutoregressiveLM",
    "MaskedDiffusion",
    "MASK_SCHEDULES",
    "TokenTransformer",
    "TokenTransformerConfig",
    "categorical",
    "data_from_tokens",
    "decode_text",
    "first_hitting_step",
    "get_mask_schedule",
    "sample_first_hitting",
    "sample_tau_leaping",
    "tau_leaping_step",
    "tokens_from_data",
]
