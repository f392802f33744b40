"""Test-wide settings: one intra-op thread per worker (pytest-xdist runs one worker per core; more threads only
oversubscribe the CPU and make small tensor ops slower)."""

import torch

torch.set_num_threads(1)
