import pytest
import torch

from supsup.data.imagenet import SplitImageNet
from supsup.data.sources import DataError

PIL = pytest.importorskip("PIL.Image")


def _tree(root, classes=6, per_class=3):
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                PIL.new("RGB", (40 + 7 * i, 30 + 5 * c), (40 * c, 20 * i, 100)).save(folder / f"img_{i}.JPEG")


def test_missing_imagenet_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"imagenet/train/<wnid>/\*\.JPEG"):
        SplitImageNet(tmp_path)


def test_split_imagenet_from_an_image_folder(tmp_path):
    _tree(tmp_path)
    stream = SplitImageNet(tmp_path, num_tasks=3, classes_per_task=2, image_size=16, resize=20)
    assert sorted(stream.task_classes.flatten().tolist()) == list(range(6))
    assert torch.equal(SplitImageNet(tmp_path, 3, 2, image_size=16, resize=20).task_classes, stream.task_classes)
    x, y = stream.test_set(1)
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    xb, yb = next(stream.train_batches(2, 4, 1))
    assert xb.shape == (4, 3, 16, 16) and set(yb.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="exceed"):
        SplitImageNet(tmp_path, num_tasks=4, classes_per_task=2)
