"""Training-time sampling shared by every process (re-exported by :mod:`simdiff.losses`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_t", "rand_on"]


def rand_on(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype: torch.dtype) -> Tensor:
    """``torch.rand`` drawn on the generator's device (so a CPU generator can feed a CUDA batch)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def sample_t(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    stratified: bool = True,
    shared_offset: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training times ``t`` in ``[0, 1)``, shape ``[batch_size]``.

    ``stratified=False``: i.i.d. uniform. ``stratified=True``: ``t_i = (i + u_i) / B``, exactly one point in each
    stratum ``[i/B, (i+1)/B)``. With ``shared_offset=True`` (default) a single ``u ~ U(0, 1)`` is shared by the batch:
    the low-discrepancy sampler of VDM (Kingma et al. 2021, App. "variance reduction"; ``mod(u + i/B, 1)`` up to
    order): an evenly spaced grid with a random phase. ``shared_offset=False`` draws one ``u_i`` per example (classic
    jittered stratification). Either way ``t_i`` is uniform on its stratum, so the batch mean of any ``f(t_i)`` is an
    unbiased, lower-variance estimate of ``E_t f(t)``; ``t_i`` is ordered with the batch index (batches are assumed
    shuffled by the data loader).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not stratified:
        return rand_on((batch_size,), generator, device, dtype)
    u = rand_on((1,) if shared_offset else (batch_size,), generator, device, dtype)
    i = torch.arange(batch_size, device=device, dtype=dtype)
    return ((i + u) / batch_size).clamp(max=1.0)
