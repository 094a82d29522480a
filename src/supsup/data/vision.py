"""Class-split image streams (GG): task t is a subset of classes with labels remapped to 0..c-1.

Images are held as ``[N, C, H, W] uint8`` tensors; ``batch`` gives normalised float ``[b, C, H, W]``;
``train_batches`` adds the augmentation (seeded per task), so test batches are never augmented.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from supsup.data.idx import ImageDataset
from supsup.data.streams import TaskStream
from supsup.seeding import generator


@dataclass
class TensorImages(ImageDataset):
    """Both splits of a class-labelled image set: images ``[N, C, H, W] uint8``, labels ``[N] int64``,
    per-channel ``mean``/``std`` tuples and the number of classes."""

    num_classes: int = 10


def class_order(num_classes: int, seed: int, name: str, shuffle: bool = True) -> torch.Tensor:
    """The class permutation that cuts a dataset into tasks: seeded by (seed, name), or the identity."""
    if not shuffle:
        return torch.arange(num_classes)
    return torch.randperm(num_classes, generator=generator(seed, "class-order", name))


def random_crop_flip(x: torch.Tensor, padding: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Per-sample random crop of ``[b, C, H, W]`` after zero-padding by ``padding``, then a random
    horizontal flip with probability ½ (RandomCrop(H, padding) + RandomHorizontalFlip on tensors)."""
    b, _, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [b, 1, h, 1]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [b, 1, 1, w]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = x[batch, chan, rows, cols]
    if flip:
        flips = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x


class SplitClassStream(TaskStream):
    """Tasks of ``classes_per_task`` classes each, taken in ``order``; labels are positions 0..c-1."""

    name = "split-classes"
    crop_padding = 0
    flip = False

    def __init__(self, data: TensorImages, num_tasks: int, classes_per_task: int, seed: int, shuffle: bool = True):
        if num_tasks * classes_per_task > data.num_classes:
            raise ValueError(f"{num_tasks} tasks × {classes_per_task} classes exceed the {data.num_classes} classes "
                             f"of {data.name}")
        super().__init__(data, num_tasks, seed)
        self.classes_per_task = self.num_classes = classes_per_task
        self.order = class_order(data.num_classes, seed, self.name, shuffle)
        self.task_classes = self.order[: num_tasks * classes_per_task].view(num_tasks, classes_per_task)
        self.indices, self.labels = {}, {}
        for split in ("train", "test"):
            labels = data.split(split)[1].cpu()
            position = torch.full((data.num_classes,), -1, dtype=torch.long)
            idx, lab = [], []
            for t in range(num_tasks):
                position[self.task_classes[t]] = torch.arange(classes_per_task)
                chosen = torch.isin(labels, self.task_classes[t]).nonzero().squeeze(1)
                idx.append(chosen.to(self.device))
                lab.append(position[labels[chosen]].to(self.device))
            self.indices[split], self.labels[split] = idx, lab
        self._mean = torch.tensor(data.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(data.std, device=self.device).view(1, -1, 1, 1)

    def size(self, task, split):
        self.check_task(task)
        return self.indices[split][task].shape[0]

    def transform(self, task: int) -> torch.Tensor:
        self.check_task(task)
        return self.task_classes[task]

    def pixels(self, task: int, split: str, idx: torch.Tensor) -> torch.Tensor:
        """Images of ``task`` at positions ``idx`` of its split as float ``[b, C, H, W]`` in [0, 1]."""
        self.check_task(task)
        return self.data.split(split)[0][self.indices[split][task][idx]].float() / 255.0

    def batch(self, task, split, idx):
        """Normalised, un-augmented ``([b, C, H, W] float32, [b] int64 in 0..c-1)``."""
        return (self.pixels(task, split, idx) - self._mean) / self._std, self.labels[split][task][idx]

    def train_batches(self, task, batch_size, num_batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches (epochs of a seeded permutation) with the stream's augmentation —
        crop after zero padding in pixel space, as torchvision pads before normalising — seeded per task."""
        augment_gen = generator(self.seed, "augment", self.name, task)
        for idx in self.batch_indices(task, batch_size, num_batches):
            x = self.pixels(task, "train", idx)
            if self.crop_padding or self.flip:
                x = random_crop_flip(x, self.crop_padding, augment_gen, self.flip)
            yield (x - self._mean) / self._std, self.labels["train"][task][idx]
