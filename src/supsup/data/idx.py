"""MNIST-format (IDX) image datasets held as tensors: small enough to live on the run's device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from supsup.data.sources import FASHION_MNIST, MNIST, DataError, IdxDataset, data_root, ensure_dataset


@dataclass
class ImageDataset:
    """Images ``[N, 28, 28] uint8`` and labels ``[N] int64`` for both splits, the normalisation
    constants (floats, or per-channel tuples for colour data), and where the files came from."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    source: str

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.train_images, self.train_labels
        if split == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def to(self, device: torch.device | str) -> "ImageDataset":
        for field in ("train_images", "train_labels", "test_images", "test_labels"):
            setattr(self, field, getattr(self, field).to(device))
        return self


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (magic: 0, 0, type 0x08 = ubyte, ndim) into a uint8 array."""
    raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims}, but holds {body.size} bytes")
    return body.reshape(dims)


def _load(dataset: IdxDataset, mean: float, std: float, root, device) -> ImageDataset:
    folder, source = ensure_dataset(dataset, data_root(root))
    arrays = {f: torch.from_numpy(read_idx(folder / f).copy()) for f in dataset.md5}
    return ImageDataset(
        name=dataset.name,
        train_images=arrays["train-images-idx3-ubyte"], train_labels=arrays["train-labels-idx1-ubyte"].long(),
        test_images=arrays["t10k-images-idx3-ubyte"], test_labels=arrays["t10k-labels-idx1-ubyte"].long(),
        mean=mean, std=std, source=source,
    ).to(device)


def load_mnist(root=None, device: torch.device | str = "cpu") -> ImageDataset:
    """MNIST (60,000 / 10,000), verified; normalisation constants 0.1307 / 0.3081."""
    return _load(MNIST, 0.1307, 0.3081, root, device)


def load_fashion_mnist(root=None, device: torch.device | str = "cpu") -> ImageDataset:
    """Fashion-MNIST (60,000 / 10,000), verified; normalisation constants 0.2860 / 0.3530."""
    return _load(FASHION_MNIST, 0.2860, 0.3530, root, device)
