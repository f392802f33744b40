"""Data sets (MNIST, sklearn digits, Fashion-MNIST, image folders, a synthetic Gaussian-mixture set) and transforms;
sequence data for forecasting (2-D Kolmogorov flow, Moving MNIST) as ``[N, frames, C, H, W]`` arrays,
and as trainer data sets of frame windows ``[N, W, C, H, W']`` (``kolmogorov``, ``moving_mnist``;
:mod:`simdiff.data.video_sets`).

Images are presented as float32 ``[N, C, H, W]`` in ``[-1, 1]`` (held as uint8 where that is exact); see
:mod:`simdiff.data.datasets`.
"""

from simdiff.data.datasets import DATASETS, DataConfig, ImageDataset, build_dataset, gmm_image_mixture
from simdiff.data.errors import DataError, ImageLoadError
from simdiff.data.folder import IMAGE_EXTENSIONS, decode_image, load_folder, scan_images
from simdiff.data.kolmogorov import VORTICITY_SCALE, kolmogorov_trajectories
from simdiff.data.moving_mnist import moving_mnist
from simdiff.data.sequences import sliding_windows
from simdiff.data.sources import read_idx
from simdiff.data.transforms import convert_channels, random_hflip, resize_images, uint8_to_float
from simdiff.data.video_sets import load_trajectories

__all__ = [
    "DATASETS",
    "DataConfig",
    "ImageDataset",
    "build_dataset",
    "gmm_image_mixture",
    "DataError",
    "ImageLoadError",
    "IMAGE_EXTENSIONS",
    "decode_image",
    "load_folder",
    "scan_images",
    "read_idx",
    "convert_channels",
    "random_hflip",
    "resize_images",
    "uint8_to_float",
    "kolmogorov_trajectories",
    "VORTICITY_SCALE",
    "moving_mnist",
    "sliding_windows",
    "load_trajectories",
]
