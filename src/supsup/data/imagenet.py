"""SplitImageNet (GG): 100 tasks × 10 classes of ImageNet from a seeded class permutation, labels 0..9.

Reads an ImageFolder tree: ``<root>/imagenet/train/<wnid>/*.JPEG`` and ``<root>/imagenet/val/<wnid>/*.JPEG``
(validation images sorted into one folder per class). Images are decoded lazily per batch with Pillow
(``pip install supsup[imagenet]``). Training: RandomResizedCrop(224) + horizontal flip; test: Resize(256) +
CenterCrop(224); both normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from supsup.data.sources import DataError, data_root
from supsup.data.streams import TaskStream
from supsup.data.vision import class_order
from supsup.seeding import generator

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")


def _pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("SplitImageNet decodes JPEGs with Pillow, which is not installed: "
                          "pip install 'supsup[imagenet]' (or pip install Pillow)") from err
    return Image


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and ``(path, class index)`` of every image below ``folder``."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    samples = [(path, i) for i, c in enumerate(classes) for path in sorted((folder / c).iterdir())
               if path.suffix.lower() in EXTENSIONS]
    for path, _ in samples:
        if not path.is_file():
            raise DataError(f"{path} should be an image file but is not a regular file: move it away and run again.")
    return classes, samples


class SplitImageNet(TaskStream):
    """``num_tasks`` × ``classes_per_task`` ImageNet classes; ``batch`` decodes and crops on the fly."""

    name = "split-imagenet"

    def __init__(self, root=None, num_tasks: int = 100, classes_per_task: int = 10, seed: int = 1,
                 image_size: int = 224, resize: int = 256, device: torch.device | str = "cpu"):
        folder = data_root(root) / "imagenet"
        for path in (folder, folder / "train", folder / "val"):
            if path.exists() and not path.is_dir():
                raise DataError(f"{path} should be a folder but is a file: move it away and run again.")
        if not all((folder / s).is_dir() for s in ("train", "val")):
            raise DataError(f"ImageNet not found. Put the ILSVRC-2012 images at {folder}/train/<wnid>/*.JPEG and "
                            f"{folder}/val/<wnid>/*.JPEG (validation images sorted into one folder per class, "
                            f"as for torchvision's ImageFolder); set --data-root or $SUPSUP_DATA to its parent.")
        if num_tasks < 1:
            raise ValueError(f"a stream needs at least one task, got {num_tasks}")
        self.data, self.num_tasks, self.seed, self._device = None, num_tasks, seed, torch.device(device)
        self.num_classes = self.classes_per_task = classes_per_task
        self.image_size, self.resize = image_size, resize
        self.classes, train = scan_image_folder(folder / "train")
        val_classes, val = scan_image_folder(folder / "val")
        if val_classes != self.classes:
            raise DataError(f"{folder}/val has classes {len(val_classes)} that differ from the "
                            f"{len(self.classes)} of {folder}/train")
        if num_tasks * classes_per_task > len(self.classes):
            raise ValueError(f"{num_tasks} tasks × {classes_per_task} classes exceed the {len(self.classes)} "
                             f"classes found in {folder}/train")
        order = class_order(len(self.classes), seed, self.name)
        self.task_classes = order[: num_tasks * classes_per_task].view(num_tasks, classes_per_task)
        self.samples = {}
        for split, samples in (("train", train), ("test", val)):
            per_task = []
            for t in range(num_tasks):
                position = {int(c): j for j, c in enumerate(self.task_classes[t])}
                per_task.append([(p, position[c]) for p, c in samples if c in position])
            self.samples[split] = per_task
        self._mean = torch.tensor(MEAN).view(3, 1, 1)
        self._std = torch.tensor(STD).view(3, 1, 1)

    @property
    def device(self) -> torch.device:
        return self._device

    def size(self, task, split):
        self.check_task(task)
        return len(self.samples[split][task])

    def transform(self, task: int) -> torch.Tensor:
        self.check_task(task)
        return self.task_classes[task]

    # ------------------------------------------------------------ transforms
    def _to_tensor(self, image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x.float() / 255.0 - self._mean) / self._std

    def eval_transform(self, image) -> torch.Tensor:
        """Resize the shorter side to ``resize`` (bilinear), centre-crop ``image_size``²."""
        w, h = image.size
        scale = self.resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), _pil().BILINEAR)
        w, h = image.size
        left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
        return self._to_tensor(image.crop((left, top, left + self.image_size, top + self.image_size)))

    def train_transform(self, image, gen: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop(``image_size``, scale 0.08–1, ratio 3/4–4/3; 10 tries, else centre) + flip."""
        w, h = image.size
        box = None
        for _ in range(10):
            area = w * h * (0.08 + 0.92 * torch.rand(1, generator=gen).item())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=gen).item()
            cw, ch = round(math.sqrt(area * math.exp(log_ratio))), round(math.sqrt(area / math.exp(log_ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        image = image.crop(box).resize((self.image_size, self.image_size), _pil().BILINEAR)
        x = self._to_tensor(image)
        return x.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else x

    # --------------------------------------------------------------- batches
    def _load(self, task, split, idx, transform) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_task(task)
        image_cls = _pil()
        xs, ys = [], []
        for i in idx.tolist():
            path, label = self.samples[split][task][i]
            try:
                with image_cls.open(path) as image:
                    xs.append(transform(image))
            except (OSError, image_cls.DecompressionBombError) as err:
                raise DataError(f"{path} cannot be read as an image ({err}): replace or remove it.") from err
            ys.append(label)
        return torch.stack(xs).to(self.device), torch.tensor(ys, device=self.device)

    def batch(self, task, split, idx):
        """Un-augmented ``([b, 3, S, S] float32, [b] int64 in 0..c-1)`` (Resize + CenterCrop)."""
        return self._load(task, split, idx, self.eval_transform)

    def train_batches(self, task, batch_size, num_batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        augment_gen = generator(self.seed, "augment", self.name, task)
        for idx in self.batch_indices(task, batch_size, num_batches, device="cpu"):
            yield self._load(task, "train", idx, lambda im: self.train_transform(im, augment_gen))

    def test_set(self, task):
        return self.batch(task, "test", torch.arange(self.size(task, "test")))
