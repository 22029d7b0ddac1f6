"""Datasets that need no network.

`load_digits_tensors` is the embedded default: scikit-learn's bundled 1,797 real 8x8 handwritten digits, split
into train/test by a seeded stratified shuffle and optionally upscaled (bilinear) to a CIFAR-like size with
3 channels, so every program runs on a fresh offline machine. CIFAR-10 is read from a user's folder elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TensorSplit:
    """Inputs (N, C, H, W) float32, normalized to zero mean and unit variance on the training set; labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def load_digits_tensors(size: int = 8, channels: int = 1, test_fraction: float = 0.2, seed: int = 0) -> TensorSplit:
    """scikit-learn digits as tensors; `size` > 8 upscales, `channels` = 3 repeats the gray channel."""
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(range(len(digits.target)), test_size=test_fraction, random_state=seed,
                                           stratify=digits.target)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.repeat(1, channels, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return TensorSplit((train_x - mean) / std, labels[train_idx], (test_x - mean) / std, labels[test_idx], 10)


def iterate_minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                        drop_last: bool = True):
    """Shuffled (x, y) minibatches driven by `generator`, so a run is reproducible from its seed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(y), generator=generator)
    stop = len(y) - (len(y) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]
