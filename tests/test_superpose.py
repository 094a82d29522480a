"""The uniform-superposition fast path of SupermaskLinear (``_UniformSuperposeLinear``) against the general
path (``SupermaskLayer._masked_forward``): same outputs and gradients, taken only where it applies."""

import pytest
import torch
from synthetic_images import synthetic_mnist

from supsup import Inference, Superposition, build_model, infer_tasks
from supsup.data.streams import PermutedMNIST
from supsup.layers import SupermaskLayer, SupermaskLinear
from supsup.learners import TrainConfig, train_task_group

RTOL, ATOL = 1e-5, 1e-6


def _layer(d_in, d_out, k, kept, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) if kept else None
    layer = SupermaskLinear(d_in, d_out, seed=seed, weight=weight)
    layer.bank.add(torch.rand(k, d_out, d_in, generator=gen) < 0.5)
    if bias:
        layer.set_bias(torch.randn(d_out, generator=gen))
    return layer


def _run(layer, x, alpha, general):
    """Output, ∂(Σ y·c)/∂α and ∂/∂x through the fast (``general=False``) or the general path."""
    alpha = alpha.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    layer.route = Superposition(alpha, uniform=True)
    layer._uniform_cached = None
    if general:
        y = SupermaskLayer._masked_forward(layer, x)
        y = y + layer.bias if layer.bias is not None else y
    else:
        y = layer(x)
        assert layer._uniform_cached is not None, "the fast path was not taken"
    c = torch.linspace(-1, 1, y.numel()).view_as(y)
    grad_alpha, grad_x = torch.autograd.grad((y * c).sum(), [alpha, x])
    return y.detach(), grad_alpha, grad_x


@pytest.mark.parametrize("d_in,d_out", [(13, 7), (100, 33)])
@pytest.mark.parametrize("k", [1, 37])
@pytest.mark.parametrize("inputs", ["normal", "zeros", "no_zero"])
@pytest.mark.parametrize("kept,bias", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("batch", [None, 1, 5])  # None: shared α over one image, else per-sample α [B, k]
def test_fast_path_matches_general_path(d_in, d_out, k, inputs, kept, bias, batch):
    layer = _layer(d_in, d_out, k, kept, bias)
    gen = torch.Generator().manual_seed(1)
    rows = batch or 1
    x = {"normal": torch.randn(rows, d_in, generator=gen), "zeros": torch.zeros(rows, d_in),
         "no_zero": torch.rand(rows, d_in, generator=gen) + 0.1}[inputs]
    alpha = torch.full((k,) if batch is None else (batch, k), 1.0 / k)
    fast = _run(layer, x, alpha, general=False)
    general = _run(layer, x, alpha, general=True)
    assert fast[1].shape == alpha.shape
    for got, want in zip(fast, general):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    if inputs == "zeros":
        assert not fast[1].any()
    else:
        assert fast[1].abs().max() > 0


def test_fast_path_is_not_taken_where_it_does_not_apply():
    layer = _layer(13, 7, 5, kept=False, bias=False)
    shared, per_sample = torch.full((5,), 0.2), torch.full((4, 5), 0.2)
    for x, alpha, uniform in [(torch.randn(2, 13), shared, True),  # shared α over a batch of two
                              (torch.randn(4, 3, 13), per_sample, True),  # 3-D input
                              (torch.randn(4, 13), per_sample, False)]:  # not promised uniform
        layer.route = Superposition(alpha, uniform=uniform)
        layer(x)
        assert layer._uniform_cached is None
    layer.double()  # float64 weights
    layer.route = Superposition(per_sample.double(), uniform=True)
    layer(torch.randn(4, 13).double())
    assert layer._uniform_cached is None


def test_cached_mix_follows_the_bank():
    layer = _layer(13, 7, 3, kept=True, bias=False)
    x = torch.randn(1, 13)
    layer.route = Superposition(torch.full((3,), 1 / 3), uniform=True)
    before = layer(x)
    layer.bank.add(torch.ones(1, 7, 13, dtype=torch.bool))
    layer.route = Superposition(torch.full((4,), 1 / 4), uniform=True)
    after = layer(x)
    want = SupermaskLayer._masked_forward(layer, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=RTOL, atol=ATOL)


def test_infer_tasks_picks_the_same_tasks_on_trained_masks(monkeypatch):
    stream = PermutedMNIST(synthetic_mnist(), 4, seed=1)
    model = build_model("lenet", output_size=10, seed=0)
    for _ in range(4):
        train_task_group(model, stream, TrainConfig(batches_per_task=20, batch_size=32, lr=1e-3))
    model.eval()
    x = torch.cat([stream.batch(t, "test", torch.arange(8))[0] for t in range(4)])
    truth = torch.arange(4).repeat_interleave(8)

    def picks():
        return (torch.stack([infer_tasks(model, x[i : i + 1]) for i in range(x.shape[0])]),
                infer_tasks(model, x, Inference(granularity="sample")))

    fast = picks()
    assert all(layer._uniform_cached is not None for layer in model.mask_layers())
    monkeypatch.setattr(SupermaskLinear, "_masked_forward", SupermaskLayer._masked_forward)
    general = picks()
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    assert (fast[0] == truth).float().mean() > 0.5  # the masks are trained: the picks mean something
