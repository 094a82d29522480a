"""SplitFashionMNIST: the GG class-split stream on real data that is available offline (Debian package).

5 tasks of 2 consecutive classes ({T-shirt, trouser}, {pullover, dress}, ...), labels 0/1, images
``[b, 1, 28, 28]`` normalised with 0.2860 / 0.3530. No augmentation.
"""

from __future__ import annotations

import torch

from supsup.data.idx import ImageDataset, load_fashion_mnist
from supsup.data.vision import SplitClassStream, TensorImages


def as_tensor_images(data: ImageDataset, num_classes: int = 10) -> TensorImages:
    """An IDX dataset (``[N, 28, 28]``) as channel-first ``[N, 1, 28, 28]`` images."""
    return TensorImages(data.name, data.train_images.unsqueeze(1), data.train_labels, data.test_images.unsqueeze(1),
                        data.test_labels, (data.mean,), (data.std,), data.source, num_classes)


def load_split_fashion(root=None, device: torch.device | str = "cpu") -> TensorImages:
    return as_tensor_images(load_fashion_mnist(root, device))


class SplitFashionMNIST(SplitClassStream):
    """5 tasks × 2 consecutive Fashion-MNIST classes, labels remapped to 0/1."""

    name = "split-fashion-mnist"

    def __init__(self, data: TensorImages, num_tasks: int = 5, classes_per_task: int = 2, seed: int = 1):
        super().__init__(data, num_tasks, classes_per_task, seed, shuffle=False)
