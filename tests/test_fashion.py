import pytest
import torch

from supsup.data.fashion import SplitFashionMNIST, as_tensor_images
from supsup.data.idx import ImageDataset


def _fake():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(4)
    images = torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8)
    return ImageDataset("fashion-mnist", images, labels, images[:20], labels[:20], 0.2860, 0.3530, "test")


def test_five_tasks_of_two_consecutive_classes_with_labels_0_1():
    stream = SplitFashionMNIST(as_tensor_images(_fake()))
    assert stream.task_classes.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    x, y = stream.test_set(2)
    assert x.shape == (4, 1, 28, 28) and sorted(y.tolist()) == [0, 0, 1, 1]


@pytest.mark.slow
def test_real_fashion_mnist_split(data_root):
    from supsup.data.fashion import load_split_fashion

    stream = SplitFashionMNIST(load_split_fashion(data_root))
    assert [stream.size(t, "train") for t in range(5)] == [12000] * 5
    assert [stream.size(t, "test") for t in range(5)] == [2000] * 5
