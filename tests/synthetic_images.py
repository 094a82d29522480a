"""Tiny learnable class-labelled images for tests: class c = a fixed random pattern + noise."""

from __future__ import annotations

import torch

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
