"""The fused training step (supsup.fused): RMSprop's update bit for bit but for the square root, the layers'
hand-over of W ⊙ [s >= 0] and of the raw gradient, where make_optimizer chooses it, and what it does to
learning on real MNIST against torch's RMSprop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup import build_model
from supsup.data.streams import PermutedMNIST
from supsup.evaluation import evaluate_task
from supsup.fused import ThresholdRMSprop
from supsup.kernels import native
from supsup.learners import TrainConfig, make_optimizer, train_task_group
from supsup.model import SupermaskModel

pytestmark = pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels (a C compiler)")


def reference_step(scores, square_avg, grad, weight, lr, alpha, eps):
    """RMSprop's float32 operations (torch.optim.RMSprop, plain) with a correctly rounded square root, in
    numpy: the straight-through gradient g = grad ⊙ W, then addcmul_ (one fused multiply-add, exact in
    float64 here), sqrt, add_ eps, addcdiv_."""
    f32 = np.float32
    g = grad.numpy() * weight.numpy()
    scaled = (f32(1 - alpha) * g).astype(np.float64) * g.astype(np.float64)  # exact product of two floats
    q = (scaled + (square_avg.numpy() * f32(alpha)).astype(np.float64)).astype(f32)
    s = scores.numpy() + (f32(-lr) * g) / (np.sqrt(q) + f32(eps))
    return torch.from_numpy(s), torch.from_numpy(q)


@pytest.mark.parametrize("shape", [(3, 1000003), (1, 32, 17), (2, 5)])  # odd sizes, below one vector
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_is_rmsprops_update_with_a_correctly_rounded_square_root(shape, threads):
    torch.manual_seed(0)
    weight = torch.randn(shape[1:])
    scores, square_avg = torch.randn(shape) * 0.01, torch.rand(shape) * 1e-6
    grad = torch.randn(shape) * 1e-3
    grad.view(-1)[:7] = 0.0  # a zero gradient leaves the score where it is
    out = torch.empty(shape)
    want_s, want_q = reference_step(scores, square_avg, grad, weight, 1e-4, 0.99, 1e-8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.rmsprop_threshold(scores, square_avg, grad, weight, 1e-4, 0.99, 1e-8, out)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(square_avg, want_q) and torch.equal(scores, want_s)
    assert torch.equal(out, torch.where(scores >= 0, weight, 0.0))


def test_the_kernel_refuses_tensors_it_cannot_read():
    s = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        native.rmsprop_threshold(s, torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(4), 1e-4, 0.99, 1e-8,
                                 torch.zeros(2, 8))
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        native.rmsprop_threshold(s, torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 8), torch.zeros(8),
                                 1e-4, 0.99, 1e-8, torch.zeros(2, 8))


def mlp(seed=0, **kwargs) -> SupermaskModel:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    return SupermaskModel(net, seed=seed, num_classes=4, **kwargs)


def test_a_step_matches_torchs_rmsprop_but_for_the_square_roots_rounding():
    torch.manual_seed(1)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    models, optimizers = [], []
    for fused_step in (True, False):
        model = mlp()
        model.begin_tasks(2)
        models.append(model)
        optimizers.append(make_optimizer(model, TrainConfig(lr=1e-2, fused_step=fused_step)))
    assert isinstance(optimizers[0], ThresholdRMSprop) and type(optimizers[1]) is torch.optim.RMSprop
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.repeat(2, 1), [0, 1]), y.repeat(2)).backward()
            optimizer.step()
    for fused, plain in zip(models[0].mask_layers(), models[1].mask_layers()):
        torch.testing.assert_close(fused.scores, plain.scores, rtol=1e-6, atol=1e-9)
        assert torch.equal(fused.final_masks(), plain.final_masks())
    fused_state, plain_state = optimizers[0].state_dict(), optimizers[1].state_dict()
    assert fused_state["state"].keys() == plain_state["state"].keys()
    for key, state in fused_state["state"].items():
        assert state.keys() == {"step", "square_avg"} and state["step"] == plain_state["state"][key]["step"]
        torch.testing.assert_close(state["square_avg"], plain_state["state"][key]["square_avg"], rtol=1e-6, atol=0)


def test_the_scores_gradient_is_the_weights_while_fused_and_the_step_leaves_the_next_weight():
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    fused, plain = mlp(), mlp()
    for model in (fused, plain):
        model.begin_tasks(1)
    optimizer = make_optimizer(fused, TrainConfig(lr=1e-2))
    for model in (fused, plain):
        F.cross_entropy(model(x, 0), y).backward()
    for a, b in zip(fused.mask_layers(), plain.mask_layers()):
        assert a.fused_step and not b.fused_step
        assert torch.equal(a.scores.grad * a.weight, b.scores.grad)  # dL/d(W ⊙ M) ⊙ W = dL/ds
    optimizer.step()
    for layer in fused.mask_layers():
        assert torch.equal(layer.training_weights(), torch.where(layer.scores >= 0, layer.weight, 0.0))
    first = fused.mask_layers()[0]
    with torch.no_grad():
        first.scores.neg_()  # changed by someone else: the left weight is stale and not used
    assert torch.equal(first.training_weights(), torch.where(first.scores >= 0, first.weight, 0.0))
    fused.end_tasks()
    assert not any(layer.fused_step for layer in fused.mask_layers())


def test_a_graph_that_saved_the_old_weight_cannot_be_replayed_after_a_step():
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    model = mlp()
    model.begin_tasks(1)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    F.cross_entropy(model(x, 0), y).backward()
    optimizer.step()
    loss = F.cross_entropy(model(x, 0), y)  # uses the weight the step left
    loss.backward(retain_graph=True)
    optimizer.step()  # rewrites that weight in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("change", [dict(fused_step=False), dict(optimizer="adam"), dict(weight_decay=1e-4)])
def test_other_settings_get_torchs_optimiser(change):
    model = mlp()
    model.begin_tasks(1)
    assert not isinstance(make_optimizer(model, TrainConfig(**change)), ThresholdRMSprop)
    assert not any(layer.fused_step for layer in model.mask_layers())


@pytest.mark.parametrize("kwargs", [dict(rule="topk", density=0.5), dict(bias="per-task")])
def test_top_k_masks_and_per_task_vectors_get_torchs_optimiser(kwargs):
    model = mlp(**kwargs)
    model.begin_tasks(1)
    assert not isinstance(make_optimizer(model, TrainConfig()), ThresholdRMSprop)


def test_on_real_mnist_it_learns_what_torchs_rmsprop_learns(mnist, one_thread):
    """Two PermutedMNIST tasks of 250 batches on LeNet, fused and unfused. Measured (one thread): the same
    masks bit for bit and the same accuracies (0.9104, 0.9113); the bounds leave room for another build's
    square roots."""
    stream = PermutedMNIST(mnist, 2, seed=4)
    results = {}
    for fused_step in (True, False):
        model = build_model("lenet", output_size=10, seed=2)
        cfg = TrainConfig(batches_per_task=250, fused_step=fused_step)
        while model.num_tasks < 2:
            train_task_group(model, stream, cfg)
        masks = torch.cat([layer.bank.mask(t, torch.float32).flatten() for layer in model.mask_layers()
                           for t in range(2)])
        accuracy = [evaluate_task(model, stream, t).accuracy for t in range(2)]
        results[fused_step] = masks, accuracy
    (fused_masks, fused_accuracy), (plain_masks, plain_accuracy) = results[True], results[False]
    differing = (fused_masks != plain_masks).float().mean().item()
    assert differing < 1e-3
    assert all(a > 0.9 for a in fused_accuracy)
    assert np.allclose(fused_accuracy, plain_accuracy, atol=0.005)
