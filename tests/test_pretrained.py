"""The shipped MNIST model loads, samples, and its class-conditional samples are recognised by the classifier."""

import torch

from simdiff.eval import MNISTFeatures
from simdiff.experiment import load_model
from simdiff.generate import SampleConfig, generate
from simdiff.shipped import PRETRAINED

#: 16 samples per class. Measured class accuracy of the shipped model with these settings (UniPC, 10 steps, w = 2):
#: 0.701 on 1000 samples (seed 1; standard error 0.015), 0.681 (109 / 160) on these 160 seeded samples.
#: The threshold 0.55 (88 / 160) is 21 samples below the measured count and about 4 standard errors
#: (sqrt(0.7 * 0.3 / 160) = 0.036) below the 1000-sample rate; a broken checkpoint, wrong label wiring or a
#: wrong schedule gives chance, ~0.1 (16 / 160).
NUM = 160
MIN_ACCURACY = 0.55


def test_pretrained_model_samples_its_classes():
    loaded = load_model(PRETRAINED)
    assert loaded.num_classes == 10 and loaded.image_shape == (1, 28, 28)
    labels = torch.arange(NUM) % 10
    with torch.no_grad():
        x = generate(loaded.model, loaded.schedule, loaded.image_shape,
                     SampleConfig(sampler="unipc", steps=10, grid="uniform_t", seed=0, guidance=2.0),
                     num=NUM, labels=labels, num_classes=10)
    assert x.shape == (NUM, 1, 28, 28) and bool(torch.isfinite(x).all())
    acc = MNISTFeatures().accuracy(x, labels)
    assert acc >= MIN_ACCURACY, acc
