"""Task streams: a sequence of tasks, each a (train, test) pair of tensors made on demand.

Every task transform (permutation, rotation angle, class subset) is fixed by (seed, task id) alone,
so a stream is identical across runs, processes and devices. Transforms are made when a task is first
used (a stream of 10^9 tasks costs nothing up front); ``fingerprint()`` identifies a stream.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from supsup.data.idx import ImageDataset
from supsup.seeding import generator


class TaskStream:
    """Base: ``batch(task, split, idx)`` gives ``(x [b, ...] float, y [b] int64)`` on the data's device."""

    name = "stream"
    num_classes = 10

    def __init__(self, data: ImageDataset, num_tasks: int, seed: int = 1):
        if num_tasks < 1:
            raise ValueError(f"a stream needs at least one task, got {num_tasks}")
        self.data, self.num_tasks, self.seed = data, num_tasks, seed

    def check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"{self.name} has tasks 0..{self.num_tasks - 1}, not {task}")

    def transform(self, task: int) -> torch.Tensor:
        """What makes task ``task`` (a permutation, an angle, class ids) as a tensor; for ``fingerprint``."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the stream's name, seed, task count, data and the transforms of its
        first and last task (and the sizes of the first): equal fingerprints mean the same tasks, and a
        changed random generator shows."""
        digest = hashlib.sha256(repr((self.name, self.seed, self.num_tasks, self.size(0, "train"),
                                      self.size(0, "test"))).encode())
        for task in sorted({0, self.num_tasks - 1}):
            digest.update(self.transform(task).detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return self.data.train_images.device

    def size(self, task: int, split: str) -> int:
        self.check_task(task)
        return self.data.split(split)[1].shape[0]

    def batch(self, task: int, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 28, 28] uint8`` -> ``[b, 784]`` float, MNIST-normalised."""
        return ((images.float() / 255.0 - self.data.mean) / self.data.std).flatten(1)

    def test_set(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.size(task, "test")
        return self.batch(task, "test", torch.arange(n, device=self.device))

    def batch_indices(self, task: int, batch_size: int, num_batches: int,
                      device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        """``num_batches`` index batches ``[batch_size]`` into the task's training split: epochs of a
        permutation seeded by (seed, stream, task), the last partial batch of an epoch dropped."""
        n = self.size(task, "train")
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training samples of task {task}")
        gen, order, pos = generator(self.seed, "batches", self.name, task), None, n
        for _ in range(num_batches):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen).to(device or self.device), 0
            yield order[pos : pos + batch_size]
            pos += batch_size

    def train_batches(self, task: int, batch_size: int, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` shuffled training batches ``(x, y)`` (see ``batch_indices``)."""
        for idx in self.batch_indices(task, batch_size, num_batches):
            yield self.batch(task, "train", idx)


class PermutedMNIST(TaskStream):
    """Task t: a fixed pixel permutation (every task permuted, task 0 included), normalise-then-permute."""

    name = "permuted-mnist"

    #: permutations kept on the data's device (the most recently made first out past this)
    CACHED_PERMUTATIONS = 4096

    def __init__(self, data: ImageDataset, num_tasks: int, seed: int = 1):
        super().__init__(data, num_tasks, seed)
        self._permutations: dict[int, torch.Tensor] = {}

    def permutation(self, task: int) -> torch.Tensor:
        """``[784]`` pixel order of ``task``, from (seed, task) alone."""
        self.check_task(task)
        if task not in self._permutations:
            if len(self._permutations) >= self.CACHED_PERMUTATIONS:
                self._permutations.pop(next(iter(self._permutations)))
            perm = torch.randperm(784, generator=generator(self.seed, "permutation", task))
            self._permutations[task] = perm.to(self.device)
        return self._permutations[task]

    transform = permutation

    def batch(self, task, split, idx):
        images, labels = self.data.split(split)
        return self.normalised(images[idx])[:, self.permutation(task)], labels[idx]


class RotatedMNIST(TaskStream):
    """Task t: every image rotated by t·360°/T (nearest-neighbour, zero fill), then normalised."""

    name = "rotated-mnist"

    def angle(self, task: int) -> float:
        """Degrees counter-clockwise of ``task``: t · 360 / T."""
        self.check_task(task)
        return task * (360.0 / self.num_tasks)

    def transform(self, task: int) -> torch.Tensor:
        return torch.tensor(self.angle(task), dtype=torch.float64)

    def rotate(self, images: torch.Tensor, degrees: float) -> torch.Tensor:
        """Rotate ``[b, 28, 28]`` images counter-clockwise by ``degrees`` about the centre."""
        if degrees % 360 == 0:
            return images.float()
        theta = math.radians(degrees)
        c, s = math.cos(theta), math.sin(theta)
        matrix = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], device=images.device).expand(images.shape[0], 2, 3)
        grid = F.affine_grid(matrix, (images.shape[0], 1, 28, 28), align_corners=False)
        return F.grid_sample(images.float().unsqueeze(1), grid, mode="nearest", padding_mode="zeros",
                             align_corners=False).squeeze(1)

    def batch(self, task, split, idx):
        images, labels = self.data.split(split)
        return self.normalised(self.rotate(images[idx], self.angle(task))), labels[idx]


class SplitMNIST(TaskStream):
    """5 tasks of 2 consecutive digits ({0,1}, {2,3}, ...); labels stay the raw digits."""

    name = "split-mnist"

    def __init__(self, data: ImageDataset, num_tasks: int = 5, seed: int = 1):
        if num_tasks > 5:
            raise ValueError(f"SplitMNIST has at most 5 tasks, got {num_tasks}")
        super().__init__(data, num_tasks, seed)
        self.indices = {
            split: [torch.nonzero((self.data.split(split)[1] // 2) == t).squeeze(1) for t in range(num_tasks)]
            for split in ("train", "test")
        }

    def size(self, task, split):
        self.check_task(task)
        return self.indices[split][task].shape[0]

    def transform(self, task: int) -> torch.Tensor:
        self.check_task(task)
        return torch.tensor([2 * task, 2 * task + 1])

    def batch(self, task, split, idx):
        self.check_task(task)
        images, labels = self.data.split(split)
        chosen = self.indices[split][task][idx]
        return self.normalised(images[chosen]), labels[chosen]


STREAMS = {cls.name: cls for cls in (PermutedMNIST, RotatedMNIST, SplitMNIST)}
