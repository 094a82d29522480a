"""Tiny learnable class-labelled images for tests: class c = a fixed random pattern + noise."""

from __future__ import annotations

import torch

from supsup.data.idx import ImageDataset
from supsup.data.vision import TensorImages


def make_images(num_classes: int, per_class: int, channels: int = 3, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, channels, size, size, generator=g) * 160
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(labels.numel(), channels, size, size, generator=g) * 25
    images = (patterns[labels] + 40 + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


def tensor_images(num_classes: int = 10, train_per_class: int = 24, test_per_class: int = 8, channels: int = 3,
                  size: int = 32) -> TensorImages:
    tr_x, tr_y = make_images(num_classes, train_per_class, channels, size, seed=0)
    te_x, te_y = make_images(num_classes, test_per_class, channels, size, seed=0)  # same patterns
    g = torch.Generator().manual_seed(1)
    te_x = (te_x.float() + torch.randn(te_x.shape, generator=g) * 5).clamp(0, 255).to(torch.uint8)
    return TensorImages("synthetic", tr_x, tr_y, te_x, te_y, (0.5,) * channels, (0.25,) * channels, "synthetic",
                        num_classes)


def synthetic_mnist(train: int = 256, test: int = 32) -> ImageDataset:
    """MNIST-shaped ``[n, 28, 28] uint8`` images of 10 classes (a fixed pattern each, plus noise)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.rand(10, 28, 28, generator=g) * 200

    def make(n):
        labels = torch.arange(n) % 10
        images = (patterns[labels] + torch.randn(n, 28, 28, generator=g) * 30).clamp(0, 255).to(torch.uint8)
        return images, labels

    (tr_x, tr_y), (te_x, te_y) = make(train), make(test)
    return ImageDataset(name="synthetic", train_images=tr_x, train_labels=tr_y, test_images=te_x,
                        test_labels=te_y, mean=0.3, std=0.3, source="synthetic")
