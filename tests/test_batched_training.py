"""Training K tasks at once (one bmm / grouped conv over the K tasks' stacked batches) learns the same
masks as training them one after another with the same seeds.

Tolerance: the batched step sums the same products in a different order (bmm vs mm, grouped vs plain
conv), so scores may differ by float rounding; a mask bit can only flip where a score sits within that
rounding of its threshold. We allow at most 0.01% of the bits to differ (in practice: none)."""

import pytest
import torch
from torch import nn

from supsup.architectures import build_model
from supsup.data.idx import ImageDataset
from supsup.data.streams import PermutedMNIST
from supsup.learners import TrainConfig, train_task_group
from supsup.model import SupermaskModel

MAX_DIFFERENT_BITS = 1e-4


def synthetic_mnist(train: int = 256, test: int = 32) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    patterns = torch.rand(10, 28, 28, generator=g) * 200

    def make(n):
        labels = torch.arange(n) % 10
        images = (patterns[labels] + torch.randn(n, 28, 28, generator=g) * 30).clamp(0, 255).to(torch.uint8)
        return images, labels

    (tr_x, tr_y), (te_x, te_y) = make(train), make(test)
    return ImageDataset(name="synthetic", train_images=tr_x, train_labels=tr_y, test_images=te_x,
                        test_labels=te_y, mean=0.3, std=0.3, source="synthetic")


def conv_model() -> SupermaskModel:
    net = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 20))
    return SupermaskModel(net, seed=5, rule="topk", density=0.5, num_classes=10)


MODELS = {
    "lenet-threshold": lambda: build_model("lenet", output_size=20, seed=3),
    "conv-topk": conv_model,
}


def learned_masks(model: SupermaskModel) -> list[torch.Tensor]:
    return [layer.bank.packed.clone() for layer in model.mask_layers()]



def _bit_differences(a: torch.Tensor, b: torch.Tensor) -> int:
    x = (a ^ b).to(torch.int64)
    return int(sum(((x >> i) & 1).sum() for i in range(8)))


def differing_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(_bit_differences(x, y) for x, y in zip(a, b)) / sum(8 * x.numel() for x in a)


@pytest.mark.parametrize("name, tasks_at_once", [("lenet-threshold", 3), ("lenet-threshold", 2), ("conv-topk", 3)])
def test_batched_training_learns_the_same_masks_as_one_task_at_a_time(name, tasks_at_once):
    stream = PermutedMNIST(synthetic_mnist(), 3, seed=1)
    common = dict(optimizer="rmsprop", lr=1e-3, batch_size=16, batches_per_task=8)

    sequential = MODELS[name]()
    while sequential.num_tasks < 3:
        train_task_group(sequential, stream, TrainConfig(**common, tasks_at_once=1))
    batched = MODELS[name]()
    while batched.num_tasks < 3:
        train_task_group(batched, stream, TrainConfig(**common, tasks_at_once=tasks_at_once))

    untrained = MODELS[name]()
    untrained.begin_tasks(3)
    untrained.end_tasks()

    assert differing_bits(learned_masks(sequential), learned_masks(batched)) <= MAX_DIFFERENT_BITS
    # and training did change the masks, so the comparison means something
    assert differing_bits(learned_masks(sequential), learned_masks(untrained)) > 0.01
