"""SupermaskModel's state and its guarantees: everything learned is in ``state_dict()``, learned tasks
are frozen in train and eval mode, and bad task ids or inputs are refused with a clear error."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup import Inference, Superposition, SupermaskModel, build_model, infer_tasks


def conv_net_with_batchnorm() -> SupermaskModel:
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    return SupermaskModel(net, seed=3, num_classes=10)


def lenet() -> SupermaskModel:
    return build_model("lenet", output_size=20, seed=5)


def inputs_for(model: SupermaskModel, n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 8, 8) if model.norm_layers() else (n, 784)
    return torch.randn(shape, generator=g)


def learn(model: SupermaskModel, tasks: int, steps: int = 5) -> SupermaskModel:
    """Train each task a few steps on its own random targets, so masks and BN statistics differ per task."""
    for t in range(tasks):
        model.begin_tasks(1)
        opt = torch.optim.SGD(model.score_parameters(), lr=0.5)
        model.train()
        for step in range(steps):
            x = inputs_for(model, 16, seed=100 * t + step) + t
            loss = F.cross_entropy(model(x, t), torch.arange(16) % 10)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.end_tasks()
    return model.eval()


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", [lenet, conv_net_with_batchnorm], ids=["mlp", "conv-batchnorm"])
def test_state_dict_round_trip_restores_every_task_into_a_fresh_model(make):
    model = learn(make(), 3)
    fresh = make()
    assert fresh.num_tasks == 0
    fresh.load_state_dict(through_torch_save(model.state_dict()))
    fresh.eval()
    assert fresh.num_tasks == 3
    x = inputs_for(model)
    for t in range(3):
        assert torch.equal(fresh(x, t), model(x, t))
    how = Inference(granularity="sample")
    assert torch.equal(infer_tasks(fresh, x, how), infer_tasks(model, x, how))
    if model.norm_layers():  # the per-task statistics came back too, and differ between tasks
        for a, b in zip(model.norm_layers(), fresh.norm_layers()):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert not torch.equal(model.norm_layers()[0].running_mean[0], model.norm_layers()[0].running_mean[2])


def test_state_dict_holds_only_masks_statistics_and_seeds_not_the_base_weights():
    model = learn(conv_net_with_batchnorm(), 2)
    state = model.state_dict()
    assert not any(key.endswith(".weight") for key in state)  # regenerated from the seed
    packed = {k: v for k, v in state.items() if k.endswith("bank.packed")}
    assert [tuple(v.shape) for v in packed.values()] == [(2, 9), (2, 256), (2, 20)]  # ⌈P/8⌉ bytes per task
    assert all(v.dtype == torch.uint8 for v in packed.values())
    assert tuple(state["net.1.running_mean"].shape) == (2, 8)


def test_scores_of_tasks_in_training_round_trip_and_train_on():
    model = learn(lenet(), 1)
    model.begin_tasks(2)
    with torch.no_grad():
        for p in model.score_parameters():
            p.add_(torch.randn_like(p))
    fresh = lenet()
    fresh.load_state_dict(through_torch_save(model.state_dict()))
    assert fresh.training_tasks == [1, 2] and fresh.num_tasks == 1
    for a, b in zip(model.score_parameters(), fresh.score_parameters()):
        assert torch.equal(a, b) and b.requires_grad
    x = inputs_for(model)
    assert torch.equal(fresh(x, 2), model(x, 2))
    model.end_tasks(), fresh.end_tasks()
    for a, b in zip(model.mask_layers(), fresh.mask_layers()):
        assert torch.equal(a.bank.packed, b.bank.packed)


def test_loading_state_of_another_seed_or_an_inconsistent_state_is_refused():
    state = learn(lenet(), 2).state_dict()
    with pytest.raises(RuntimeError, match="base-weight seed"):
        build_model("lenet", output_size=20, seed=6).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"net\.1\.bank\.packed: expected packed masks \[k, 29400\] uint8"):
        lenet().load_state_dict({**state, "net.1.bank.packed": torch.zeros(2, 7, dtype=torch.uint8)})
    with pytest.raises(RuntimeError, match="inconsistent state"):
        lenet().load_state_dict({**state, "net.3.bank.packed": state["net.3.bank.packed"][:1]})
    with pytest.raises(RuntimeError, match="Missing key"):
        lenet().load_state_dict({k: v for k, v in state.items() if "net.5" not in k})


def test_a_train_mode_forward_leaves_learned_tasks_unchanged():
    model = learn(conv_net_with_batchnorm(), 2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs_for(model, 16)
    eval_out = model(x, 1)
    model.train()
    for _ in range(3):
        assert torch.equal(model(x, 1), eval_out)  # frozen: stored statistics, not the batch's
        model(x, [0, 1])
    model.begin_tasks(1)  # a task in training does update its own statistics, and only its own
    model(x, 2)
    after = model.state_dict()
    for key, value in saved.items():
        if "running" in key:
            assert torch.equal(after[key][:2], value), key
            assert not torch.equal(after[key][2], torch.zeros_like(after[key][2]) if "mean" in key else
                                   torch.ones_like(after[key][2])), key
        elif "training_ids" not in key:  # masks and seeds
            assert torch.equal(after[key], value), key


def test_superposed_inference_with_batchnorm_works_on_one_image_and_per_sample():
    model = learn(conv_net_with_batchnorm(), 3)
    x = inputs_for(model, 6)
    for method in ("oneshot", "binary", "gradient"):
        assert infer_tasks(model, x, Inference(method=method)).dim() == 0  # first image alone
    how = Inference(granularity="sample")
    together = infer_tasks(model, x, how)
    alone = torch.cat([infer_tasks(model, x[i : i + 1], how) for i in range(6)])
    assert torch.equal(together, alone)  # α-mixed stored statistics: no sample affects another
    # with α one-hot on task t the superposed model is task t's model, statistics included
    alpha = torch.zeros(3)
    alpha[1] = 1
    assert torch.allclose(model(x, Superposition(alpha)), model(x, 1), atol=1e-5)


def test_model_moved_to_bfloat16_after_a_float32_forward():
    model = learn(lenet(), 2)
    x = inputs_for(model)
    before = model(x, 1)
    model.to(torch.bfloat16)
    after = model(x.bfloat16(), 1)
    assert after.dtype == torch.bfloat16
    assert torch.allclose(after.float(), before, atol=0.1, rtol=0.05)
    assert model(x.bfloat16(), Superposition(torch.full((2,), 0.5))).dtype == torch.bfloat16
    masks = [layer.bank.packed.clone() for layer in model.mask_layers()]
    model.float()  # the base weights were rounded to bfloat16 on the way; the masks are untouched
    assert all(torch.equal(m, layer.bank.packed) for m, layer in zip(masks, model.mask_layers()))
    assert torch.allclose(model(x, 1), before, atol=0.01, rtol=0.01)


def test_task_ids_must_be_integers():
    model = learn(lenet(), 2)
    x = inputs_for(model, 4)
    for bad in (torch.tensor(1.9), torch.tensor(True), torch.tensor([0.0, 1.0, 1.0, 0.0]),
                torch.tensor([True, False, True, False]), 1.0, True):
        with pytest.raises(TypeError, match="must be"):
            model(x, bad)
    assert torch.equal(model(x, np.int64(1)), model(x, 1))
    assert torch.equal(model(x, torch.tensor(1)), model(x, 1))
    with pytest.raises(IndexError, match="task 2 is not known"):
        model(x, torch.tensor([0, 2, 1, 0]))


def test_empty_batches_and_non_finite_inputs_are_handled_explicitly():
    model = learn(lenet(), 2)
    empty = torch.zeros(0, 784)
    assert model(empty, torch.zeros(0, dtype=torch.long)).shape == (0, 20)
    assert infer_tasks(model, empty, Inference(granularity="sample")).shape == (0,)
    with pytest.raises(ValueError, match="empty batch"):
        infer_tasks(model, empty)
    x = inputs_for(model, 4)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(samples \[2\]\)"):
        infer_tasks(model, x, Inference(granularity="sample"))


@pytest.mark.parametrize("budget", [None, 0])
def test_per_sample_task_ids_reuse_each_tasks_weights_within_the_cache_budget(budget, monkeypatch):
    import supsup.layers

    if budget is not None:  # 0: one task's W ⊙ M kept per layer, the others rebuilt on every use
        monkeypatch.setattr(supsup.layers, "TASK_WEIGHT_CACHE_BYTES", budget)
    model = lenet()
    for _ in range(3):
        model.begin_tasks(1)
        with torch.no_grad():
            for layer in model.mask_layers():
                layer.scores.normal_()
        model.end_tasks()
    model.eval()
    x, tasks = inputs_for(model, 12), torch.tensor([2, 0, 1] * 4)
    with torch.no_grad():
        expected = torch.empty(12, 20)
        for t in range(3):  # each task's samples as one batch, as the per-sample route groups them
            expected[tasks == t] = model(x[tasks == t], t)
        for _ in range(2):  # again from the cache
            assert torch.equal(model(x, tasks), expected)
    first = model.mask_layers()[0]
    assert len(first._cached) == (3 if budget is None else 1)
    model.begin_tasks(1)
    with torch.no_grad():
        first.scores.normal_()
    model.end_tasks()  # the bank changed: nothing cached before may be used
    assert len(first._cached) == 0
    with torch.no_grad():
        assert torch.equal(model(x, tasks), expected)
