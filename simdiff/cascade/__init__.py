"""Cascaded diffusion: a base model at low resolution followed by super-resolution stages.

* :mod:`simdiff.cascade.sr` — the super-resolution denoiser (low-res input upsampled and concatenated), its
  conditioner, training pairs and the noise-conditioning-augmentation loss (Ho et al. 2022; Saharia et al. 2022).
* :mod:`simdiff.cascade.train` — super-resolution runs: config, training with the shared trainer, loading, sampling.
* :mod:`simdiff.cascade.cascade` — a cascade config (stages), :func:`sample_cascade`, and the one-file cascade
  artefact (:func:`save_cascade` / :func:`load_cascade`).
"""

from .cascade import Cascade, CascadeStage, load_cascade, sample_cascade, save_cascade
from .sr import LOW_RES_NULL, LowResolution, SRConfig, SRLoss, SuperResolution, augment, downsample, upsample
from .train import LoadedSR, build_sr_network, load_sr, load_sr_config, sample_sr, train_sr

__all__ = [
    "Cascade",
    "CascadeStage",
    "load_cascade",
    "sample_cascade",
    "save_cascade",
    "LOW_RES_NULL",
    "LowResolution",
    "SRConfig",
    "SRLoss",
    "SuperResolution",
    "augment",
    "downsample",
    "upsample",
    "LoadedSR",
    "build_sr_network",
    "load_sr",
    "load_sr_config",
    "sample_sr",
    "train_sr",
]
