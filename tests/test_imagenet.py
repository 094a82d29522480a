import shutil

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
    again = SplitImageNet(tmp_path, 3, 2, image_size=16, resize=20)
    assert torch.equal(again.task_classes, stream.task_classes) and again.fingerprint() == stream.fingerprint()
    x, y = stream.test_set(1)
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    xb, yb = next(stream.train_batches(2, 4, 1))
    assert xb.shape == (4, 3, 16, 16) and set(yb.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="exceed"):
        SplitImageNet(tmp_path, num_tasks=4, classes_per_task=2)


@pytest.mark.parametrize("where", ["imagenet", "imagenet/val"])
def test_a_file_where_an_imagenet_folder_should_be_is_an_error_naming_it(tmp_path, where):
    _tree(tmp_path, classes=2, per_class=1)
    shutil.rmtree(tmp_path / where)
    (tmp_path / where).write_bytes(b"not a folder")
    with pytest.raises(DataError, match=f"{tmp_path / where} should be a folder but is a file"):
        SplitImageNet(tmp_path, num_tasks=1, classes_per_task=2)


def test_a_folder_named_like_an_image_is_an_error_naming_it(tmp_path):
    _tree(tmp_path, classes=2, per_class=1)
    (tmp_path / "imagenet/train/n00000001/odd.JPEG").mkdir()
    with pytest.raises(DataError, match="n00000001/odd.JPEG should be an image file but is not a regular file"):
        SplitImageNet(tmp_path, num_tasks=1, classes_per_task=2)


def test_an_image_that_cannot_be_decoded_is_an_error_naming_it(tmp_path):
    _tree(tmp_path, classes=2, per_class=1)
    (tmp_path / "imagenet/val/n00000000/img_0.JPEG").write_bytes(b"not a JPEG")
    stream = SplitImageNet(tmp_path, num_tasks=1, classes_per_task=2, image_size=16, resize=20)
    with pytest.raises(DataError, match="n00000000/img_0.JPEG cannot be read as an image .*: replace or remove it"):
        stream.test_set(0)
