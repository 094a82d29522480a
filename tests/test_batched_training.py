"""Training K tasks at once (one bmm / grouped conv over the K tasks' stacked batches) learns the same
masks as training them one after another with the same seeds.

On one thread the batched and the one-by-one step sum the same products in the same order, so the masks
are equal bit for bit. On several threads the summation order differs (bmm vs mm, grouped vs plain conv),
and RMSprop and Adam divide each gradient by its own running magnitude, so a rounding-level difference in a
near-zero gradient becomes a full-size step: measured on 2 threads, 0.09% of the bits (LeNet, RMSprop),
0.08% (Adam), 0 (SGD). Hence the test runs on one thread and asserts equality."""

import pytest
import torch
from torch import nn

from supsup.architectures import build_model
from supsup.data.streams import PermutedMNIST
from supsup.learners import TrainConfig, train_task_group
from supsup.model import SupermaskModel
from synthetic_images import synthetic_mnist


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
def test_batched_training_learns_the_same_masks_as_one_task_at_a_time(name, tasks_at_once, one_thread):
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

    assert differing_bits(learned_masks(sequential), learned_masks(batched)) == 0
    # and training did change the masks, so the comparison means something
    assert differing_bits(learned_masks(sequential), learned_masks(untrained)) > 0.01
