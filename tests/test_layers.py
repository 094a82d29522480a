import math

import pytest
import torch
from torch import nn

from supsup import Superposition, SupermaskModel, build_model
from supsup.layers import SupermaskConv2d, SupermaskLinear


def test_weight_is_frozen_signed_kaiming_constant_from_the_seed():
    layer = SupermaskLinear(50, 20, seed=7)
    c = math.sqrt(2 / 50)
    assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, c))
    assert 0.4 < (layer.weight > 0).float().mean() < 0.6  # fair coin
    assert not layer.weight.requires_grad
    assert torch.equal(layer.weight, SupermaskLinear(50, 20, seed=7).weight)
    assert not torch.equal(layer.weight, SupermaskLinear(50, 20, seed=8).weight)
    assert "weight" not in layer.state_dict()  # only the seed is stored


def test_scores_are_kaiming_uniform_and_only_the_current_task_trains():
    model = build_model("lenet", output_size=10, seed=0)
    model.begin_tasks(1)
    params = model.score_parameters()
    assert [tuple(p.shape) for p in params] == [(1, 300, 784), (1, 100, 300), (1, 10, 100)]
    first = params[0]
    assert first.abs().max() <= 1 / math.sqrt(784) and first.std() > 0.5 / math.sqrt(784) / math.sqrt(3)
    x = torch.randn(4, 784)
    model(x, 0).sum().backward()
    assert all(p.grad is not None for p in params)
    assert not any(b.requires_grad for b in model.buffers())


def test_end_tasks_freezes_masks_and_drops_scores():
    model = build_model("lenet", output_size=10, seed=0)
    model.begin_tasks(1)
    expected = [(layer.scores[0] >= 0) for layer in model.mask_layers()]
    x = torch.randn(3, 784)
    before = model(x, 0).detach()
    model.end_tasks()
    assert all(layer.scores is None for layer in model.mask_layers())
    assert model.num_tasks == 1
    for layer, mask in zip(model.mask_layers(), expected):
        assert torch.equal(layer.bank.mask(0), mask)
    assert torch.equal(model(x, 0), before)


def test_bad_task_id_and_wrong_input_shape_are_clear_errors():
    model = build_model("lenet", output_size=10, seed=0)
    model.begin_tasks(1)
    model.end_tasks()
    with pytest.raises(IndexError, match="task 3 is not known: learned tasks are 0..0"):
        model(torch.randn(2, 784), 3)
    with pytest.raises(IndexError, match="task -1"):
        model(torch.randn(2, 784), -1)
    with pytest.raises(TypeError, match="task must be"):
        model(torch.randn(2, 784), "0")
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 784\], got \(2, 785\)"):
        model(torch.randn(2, 785), 0)
    with pytest.raises(ValueError, match="alpha has 2 entries, but 1 tasks are learned"):
        model(torch.randn(2, 784), Superposition(torch.ones(2)))


def test_one_hot_superposition_equals_the_tasks_own_forward():
    model = build_model("lenet", output_size=20, seed=3)
    for _ in range(3):
        model.begin_tasks(1)
        model.end_tasks()
    x = torch.randn(5, 784)
    for t in range(3):
        alpha = torch.nn.functional.one_hot(torch.tensor(t), 3).float()
        assert torch.allclose(model(x, Superposition(alpha)), model(x, t), atol=1e-5)
        per_sample = alpha.expand(5, 3).contiguous()
        assert torch.allclose(model(x, Superposition(per_sample)), model(x, t), atol=1e-5)


def test_conversion_of_an_ordinary_module_keeps_shapes_and_drops_biases():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 10))
    model = SupermaskModel(net, seed=0)
    convs = [m for m in model.modules() if isinstance(m, SupermaskConv2d)]
    assert len(convs) == 1 and convs[0].weight.shape == (4, 1, 3, 3)
    assert len(model.mask_layers()) == 2 and len(model.norm_layers()) == 1
    model.begin_tasks(2)
    model.train()  # tasks in training: BN uses batch statistics, per chunk when stacked
    x = torch.randn(6, 1, 8, 8)
    stacked = model(x, [0, 1])  # batched: first 3 samples task 0, last 3 task 1
    assert torch.allclose(stacked[:3], model(x[:3], 0), atol=1e-5)
    assert torch.allclose(stacked[3:], model(x[3:], 1), atol=1e-5)
    with pytest.raises(ValueError, match="no Linear, Conv"):
        SupermaskModel(nn.Sequential(nn.ReLU()), seed=0)


def test_per_sample_task_ids_route_each_sample_to_its_mask():
    model = build_model("lenet", output_size=10, seed=0)
    model.begin_tasks(3)
    model.end_tasks()
    x = torch.randn(6, 784)
    tasks = torch.tensor([2, 0, 1, 1, 0, 2])
    out = model(x, tasks)
    for i, t in enumerate(tasks.tolist()):
        assert torch.allclose(out[i], model(x[i : i + 1], t)[0], atol=1e-5)


def test_replacing_a_mask_in_the_bank_is_seen_by_the_next_forward():
    model = build_model("lenet", output_size=10, seed=0)
    model.begin_tasks(1)
    model.end_tasks()
    x = torch.randn(3, 784)
    before = model(x, 0)
    layer = model.mask_layers()[0]
    layer.bank.replace(0, ~layer.bank.mask(0))
    after = model(x, 0)
    assert not torch.allclose(before, after)
    h = x
    for i, l in enumerate(model.mask_layers()):  # the forward by hand, with the masks now in the banks
        h = torch.nn.functional.linear(h, l.weight * l.bank.mask(0, torch.float32))
        h = torch.relu(h) if i < 2 else h
    assert torch.allclose(after, h, atol=1e-5)


def test_model_selects_all_top_k_masks_at_once_with_the_same_result_and_gradients():
    """SupermaskModel.forward picks every layer's training top-k mask in one batched selection; the output
    and the scores' gradients equal those of each layer selecting its own mask."""
    from supsup.density import er_density

    model = build_model("gem_resnet18", output_size=5, num_classes=5, seed=0, rule="topk", density=er_density(8))
    model.begin_tasks(2)
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(batched: bool):
        for p in model.score_parameters():
            p.grad = None
        if batched:
            y = model(x, [0, 1])
        else:
            parts = model.mask_layers() + model.norm_layers()
            for part in parts:
                part.route = [0, 1]
            assert all(layer.training_keep is None for layer in model.mask_layers())
            y = model.net(x)
            for part in parts:
                part.route = None
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.score_parameters()]

    (y_batched, g_batched), (y_own, g_own) = run(True), run(False)
    assert torch.equal(y_batched, y_own)
    assert all(torch.equal(a, b) for a, b in zip(g_batched, g_own))
    assert all(layer.training_keep is None for layer in model.mask_layers())  # cleared after the forward
