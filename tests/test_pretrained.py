"""The shipped models load, sample, and their samples are recognised by the MNIST (Fashion-MNIST) classifier.

Measured with exactly these settings (UniPC, 10 steps, uniform-t grid, seed 0; 16 samples per digit):

* class-conditional MNIST (``pretrained``): 150 / 160 (0.9375) without guidance, 160 / 160 at w = 2; on 1000
  samples with the default 20-step sampler 0.954 and 1.000 (``BENCHMARKS.md`` §3).
* the 4-step student (``pretrained-student``, DDIM on its uniform-t grid, no guidance): 157 / 160 (0.981); on
  1000 samples 0.977 (``BENCHMARKS.md`` §3).
* class-conditional Fashion-MNIST (``pretrained-fashion``, scored by the Fashion-MNIST classifier, whose accuracy
  on real test images is 0.912): 136 / 160 (0.85) without guidance, 160 / 160 at w = 1 (the 0.72 threshold is 5
  standard errors below 0.85: sqrt(0.85 * 0.15 / 160) = 0.028).
* text-to-image (``pretrained-text``, prompts "a 0" ... "a 9"): 146 / 160 (0.9125) without guidance, 160 / 160 at
  w = 2 with rescale 0.5 (its config's default).

The thresholds sit about 5 standard errors below the measured rates (unguided: sqrt(0.95 * 0.05 / 160) = 0.017);
a broken checkpoint, wrong label or prompt wiring or a wrong schedule gives about 0.1 (chance).
"""

import dataclasses

import torch

from simdiff.eval import MNISTFeatures
from simdiff.experiment import load_model
from simdiff.generate import SampleConfig, generate
from simdiff.shipped import PRETRAINED, SHIPPED

NUM = 160
#: guidance weight -> minimum class accuracy of the class-conditional model
MIN_ACCURACY = {0.0: 0.85, 2.0: 0.95}
MIN_TEXT_ACCURACY = 0.95  # at w = 2
MIN_STUDENT_ACCURACY = 0.9  # the 4-step student, its own sampler (DDIM, uniform-t), no guidance
#: guidance weight -> minimum agreement of the Fashion-MNIST classifier with the requested class
MIN_FASHION_ACCURACY = {0.0: 0.72, 1.0: 0.95}


def _check_class_agreement(loaded, features, min_accuracy: dict[float, float]) -> None:
    """UniPC 10 steps on the uniform-t grid, seed 0, labels cycling 0-9: ``features`` agree with the label at least
    ``min_accuracy[w]`` of the time at each guidance weight ``w``."""
    assert loaded.num_classes == 10 and loaded.image_shape == (1, 28, 28)
    assert loaded.config.sample.grid == "calibrated"  # the default policy is recorded in the shipped file
    labels = torch.arange(NUM) % 10
    for guidance, floor in min_accuracy.items():
        with torch.inference_mode():
            x = generate(loaded.model, loaded.schedule, loaded.image_shape,
                         SampleConfig(sampler="unipc", steps=10, grid="uniform_t", seed=0, guidance=guidance),
                         num=NUM, labels=labels, num_classes=10)
        assert x.shape == (NUM, 1, 28, 28) and bool(torch.isfinite(x).all())
        acc = features.accuracy(x, labels)
        assert acc >= floor, (guidance, acc)


def test_pretrained_model_samples_its_classes():
    _check_class_agreement(load_model(PRETRAINED), MNISTFeatures(), MIN_ACCURACY)


def test_shipped_student_samples_its_classes_in_four_calls():
    from simdiff.runs import student_sample_config

    student = load_model(SHIPPED["pretrained-student"])
    assert student.meta["kind"] == "consistency" and student.meta["sampler_spec"]["steps"] == 4
    cfg = student_sample_config(student.meta["sampler_spec"], SampleConfig(seed=0))
    labels = torch.arange(NUM) % 10
    with torch.inference_mode():
        x = generate(student.model, student.schedule, student.image_shape, cfg, num=NUM, labels=labels,
                     num_classes=10)
    acc = MNISTFeatures().accuracy(x, labels)
    assert acc >= MIN_STUDENT_ACCURACY, acc


def test_shipped_fashion_model_samples_its_classes():
    from simdiff.eval.fashion import FashionFeatures

    loaded = load_model(SHIPPED["pretrained-fashion"])
    assert loaded.config.data.name == "fashion_mnist"
    _check_class_agreement(loaded, FashionFeatures(), MIN_FASHION_ACCURACY)


def test_pretrained_text_model_draws_the_digit_it_is_asked_for():
    from simdiff.data.captions import caption_thresholds
    from simdiff.eval.prompts import prompt_adherence
    from simdiff.text_prompts import sample_prompts

    loaded = load_model(SHIPPED["pretrained-text"])
    assert loaded.config.model.arch == "text_uvit" and loaded.image_shape == (1, 28, 28)
    prompts = [f"a {d}" for d in range(10)]
    cfg = dataclasses.replace(loaded.config.sample, steps=10, grid="uniform_t", guidance=2.0, seed=0)
    x = sample_prompts(loaded, prompts, cfg, per_prompt=NUM // 10)
    scores = prompt_adherence(x, [p for p in prompts for _ in range(NUM // 10)], caption_thresholds(loaded.config.data))
    assert scores["class_n"] == NUM and scores["class_accuracy"] >= MIN_TEXT_ACCURACY, scores
