import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import supsup.inference as inference
from supsup import Inference, Superposition, SupermaskModel, alpha_gradient, infer_tasks
from supsup.inference import entropy, g_objective


def _random_tasks(model: SupermaskModel, k: int, seed: int = 0) -> SupermaskModel:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(k):
        model.begin_tasks(1)
        with torch.no_grad():
            for p in model.score_parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        model.end_tasks()
    return model


def _tiny(k=4, out=7, seed=0):
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, out, bias=False))
    return _random_tasks(SupermaskModel(net, seed=seed, num_classes=3), k, seed)


@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_alpha_gradient_matches_finite_differences(objective):
    model = _tiny().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64) + 0.1

    def value(a):
        logits = model(x, Superposition(a))
        return inference.objective_values(logits.detach(), objective, 3).mean()

    grad = alpha_gradient(model, x, alpha, objective)
    # G's real logits are gradient-stopped, so its α-gradient is not the derivative of G's value:
    # compare instead with the derivative of logsumexp over the superfluous path only.
    for i in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[i] = 1e-3
        if objective == "entropy":
            numeric = (value(alpha + e) - value(alpha - e)) / 2e-3
        else:
            base = model(x, Superposition(alpha)).detach()

            def g_part(a):
                logits = model(x, Superposition(a))
                return torch.logsumexp(torch.cat([base[:, :3], logits[:, 3:]], 1), 1).mean()

            numeric = (g_part(alpha + e) - g_part(alpha - e)) / 2e-3
        assert grad[i].item() == pytest.approx(numeric.item(), rel=2e-3, abs=1e-6)  # the bank mixes in float32


def test_per_sample_alpha_gradient_is_each_samples_own_gradient():
    model = _tiny().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    alpha = torch.rand(5, 4, dtype=torch.float64) + 0.1
    grads = alpha_gradient(model, x, alpha, "entropy")
    for b in range(5):
        assert torch.allclose(grads[b], alpha_gradient(model, x[b : b + 1], alpha[b], "entropy"), atol=1e-10)
    uniform = torch.full((5, 4), 0.25, dtype=torch.float64)
    assert torch.allclose(alpha_gradient(model, x, uniform, "entropy", uniform=True),
                          alpha_gradient(model, x, uniform, "entropy"), atol=1e-10)


def test_g_gradient_flows_only_through_the_superfluous_outputs():
    logits = torch.randn(4, 12, requires_grad=True)
    g_objective(logits, 10).sum().backward()
    assert torch.all(logits.grad[:, :10] == 0)
    assert torch.all(logits.grad[:, 10:] > 0)
    # on the superfluous outputs it is the softmax over all outputs (Lemma 1's mirror of the CE gradient)
    assert torch.allclose(logits.grad[:, 10:], torch.softmax(logits.detach(), 1)[:, 10:])
    with pytest.raises(ValueError, match="superfluous"):
        g_objective(torch.randn(2, 10), 10)


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.zeros(1, 8)).item() == pytest.approx(math.log(8))
    assert entropy(torch.tensor([[100.0, 0, 0]])).item() == pytest.approx(0, abs=1e-6)


def _constructed(k: int, block: int = 16, outputs: int = 20, seed: int = 0):
    """k tasks on one masked layer. Task t's inputs live on its own block of ``block`` input
    coordinates; its mask keeps, on that block only, the weights that agree in sign with x_t for
    output 0 and those that disagree for the other outputs: only the right mask makes x_t confident."""
    d = k * block
    model = SupermaskModel(nn.Sequential(nn.Linear(d, outputs, bias=False)), seed=seed, num_classes=10)
    layer = model.mask_layers()[0]
    xs = torch.zeros(k, d)
    masks = torch.zeros(k, outputs, d, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for t in range(k):
        cols = slice(t * block, (t + 1) * block)
        xs[t, cols] = torch.randn(block, generator=gen)
        agree = torch.sign(layer.weight[:, cols]) == torch.sign(xs[t, cols])
        masks[t, 0, cols] = agree[0]
        masks[t, 1:, cols] = ~agree[1:]
    layer.bank.add(masks)
    return model, xs


@pytest.mark.parametrize("method", ["oneshot", "binary", "gradient"])
@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_inference_picks_the_right_mask_among_many(method, objective):
    k = 250 if method == "oneshot" else 50
    model, xs = _constructed(k)
    how = Inference(method=method, objective=objective)
    hits = sum(int(infer_tasks(model, xs[t : t + 1], how)) == t for t in range(k))
    assert hits == k
    per_sample = infer_tasks(model, xs, Inference(method=method, objective=objective, granularity="sample"))
    assert torch.equal(per_sample, torch.arange(k))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 40), per_sample=st.booleans())
def test_binary_ends_with_one_learned_task_in_ceil_log2_k_rounds(k, per_sample):
    model = _tiny(k=k, seed=k)
    calls = []
    original = inference.alpha_gradient

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    inference.alpha_gradient = counting
    try:
        how = Inference(method="binary", granularity="sample" if per_sample else "batch")
        tasks = infer_tasks(model, torch.randn(3, 6), how)
    finally:
        inference.alpha_gradient = original
    assert tasks.shape == ((3,) if per_sample else ())
    assert tasks.min() >= 0 and tasks.max() < k
    assert len(calls) == (math.ceil(math.log2(k)) if k > 1 else 0)


def test_only_learned_tasks_compete():
    model = _tiny(k=3)
    model.begin_tasks(2)  # two slots in training: never candidates
    for how in (Inference(), Inference(method="binary"), Inference(granularity="sample")):
        tasks = infer_tasks(model, torch.randn(8, 6), how)
        assert tasks.max() < 3
    model.end_tasks()
    with pytest.raises(RuntimeError, match="no task is learned"):
        infer_tasks(_tiny(k=0), torch.randn(1, 6))
