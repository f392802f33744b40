"""Image-conditioned generation in the manner of Semantica (Kumar, Houlsby & Hoogeboom 2024).

A diffusion model denoises one image while attending to the frozen-encoder tokens of *another* image that belongs
with it (here: another image of the same class, :mod:`simdiff.semantica.pairs`); afterwards it generates new images
"of the same kind" from a few example images, including classes or a data set it never saw
(:func:`sample_from_condition_images`), scored by few-shot metrics (:mod:`simdiff.semantica.metrics`).

* :mod:`~simdiff.semantica.pairs` -- the ``pairs`` data set and the pairing rules (a data option);
* :mod:`~simdiff.semantica.encoders` -- frozen image encoders as conditioners (MNIST classifier, a contrastive
  encoder trained by simdiff, Inception);
* :mod:`~simdiff.semantica.contrastive` -- the contrastive encoder (SimCLR NT-Xent) and its training recipe;
* :mod:`~simdiff.semantica.train` -- training batches and a training run;
* :mod:`~simdiff.semantica.sample` -- few-shot sampling, ``simdiff semantica ...`` and ``--condition-images``;
* :mod:`~simdiff.semantica.metrics` -- few-shot FD/KID, precision/recall, nearest-neighbour copy check.

Importing this package adds the ``pairs`` data set to :data:`simdiff.data.datasets.DATASETS`.
"""

from simdiff.semantica.encoders import ENCODERS, ImageEncoder, build_image_encoder, encoder_width
from simdiff.semantica.metrics import copy_check, fewshot_report, fewshot_scores, nearest_rms
from simdiff.semantica.pairs import PairOptions, load_pairs, partner_indices, register, shift_images
from simdiff.semantica.sample import (
    add_condition_flags,
    add_semantica_parser,
    sample_conditioned,
    sample_from_condition_images,
    semantica_sample_command,
)
from simdiff.semantica.train import PairBatches, is_semantica_config, semantica_training, train_semantica

register()

__all__ = [
    "ENCODERS",
    "ImageEncoder",
    "build_image_encoder",
    "encoder_width",
    "copy_check",
    "fewshot_report",
    "fewshot_scores",
    "nearest_rms",
    "PairOptions",
    "load_pairs",
    "partner_indices",
    "shift_images",
    "register",
    "add_condition_flags",
    "add_semantica_parser",
    "sample_conditioned",
    "sample_from_condition_images",
    "semantica_sample_command",
    "PairBatches",
    "is_semantica_config",
    "semantica_training",
    "train_semantica",
]
