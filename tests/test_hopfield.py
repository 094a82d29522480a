"""HopSupSup: a constant-size Hopfield store recalls neuron masks, and test-time recovery finds the
right task's mask from unlabelled data."""

from __future__ import annotations

import pytest
import torch

from supsup.data.streams import SplitMNIST
from supsup.hopfield import (HopfieldStore, HopSupSup, HopTrainConfig, accuracy, hamming, recover, split_train,
                             steps_to_recover, train_task)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_patterns(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.5


def corrupt(mask: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    flip = torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(seed))[: int(fraction * mask.numel())]
    out = mask.clone()
    out[flip] = ~out[flip]
    return out


@pytest.mark.parametrize("rule", ["storkey", "hebbian"])
def test_store_recalls_stored_patterns_from_corrupted_starts(rule):
    store = HopfieldStore(256, rule)
    patterns = random_patterns(10, 256)
    for p in patterns:
        store.store(p)
    for i, p in enumerate(patterns):
        start = corrupt(p, 0.15, seed=i)
        assert hamming([start], [p]) == 38
        assert torch.equal(store.recall(start, seed=i), p)
        # the stored pattern is a low-energy state, the corrupted start is not
        z, z0 = p.float() * 2 - 1, start.float() * 2 - 1
        assert store.energy(z) < store.energy(z0)


def test_storkey_keeps_patterns_stable_past_the_hebbian_capacity():
    d, n = 128, 26  # Hebbian capacity ≈ 0.14 d ≈ 18 patterns; Storkey's ≈ d / sqrt(2 ln d) ≈ 41
    patterns = random_patterns(n, d, seed=3)
    stable = {}
    for rule in ("storkey", "hebbian"):
        store = HopfieldStore(d, rule)
        for p in patterns:
            store.store(p)
        stable[rule] = sum(torch.equal(store.recall(p), p) for p in patterns)
    assert stable["storkey"] == n > stable["hebbian"]


def test_store_size_does_not_grow_with_tasks_and_remembers_the_majority():
    store = HopfieldStore(64)
    size = store.nbytes
    assert size == 64 * 64 * 4 + 64 * 4 + 8
    patterns = random_patterns(7, 64, seed=1)
    for p in patterns:
        store.store(p)
        assert store.nbytes == size
    majority = patterns.float().sum(0) * 2 >= patterns.shape[0]
    assert torch.equal(store.majority_scores() >= 0, majority)


@pytest.fixture(scope="module")
def trained(mnist):
    """A narrower BNNet (width 1024) that learned 3 SplitMNIST tasks (30 batches each), with the true
    masks kept aside for checking."""
    stream = SplitMNIST(mnist, 3)
    model = HopSupSup(seed=1, width=1024)
    cfg = HopTrainConfig(holdout=2048, max_batches=30)
    true = []
    for task in range(3):
        size = model.nbytes
        true.append(train_task(model, stream, task, cfg))
        assert model.nbytes == size  # storing a task's masks adds no bytes
    return model, stream, cfg, true


def test_training_starts_from_all_ones_and_learns_different_masks(trained):
    model, _, _, true = trained
    assert all(layer.scores is None for layer in model.net.mask_layers())  # masks discarded after storing
    for a in range(3):
        for b in range(a + 1, 3):
            assert hamming(true[a], true[b]) > 0.3 * model.mask_bits_per_task
    assert all(0 < int(m.sum()) < 1024 for masks in true for m in masks)


@pytest.mark.parametrize("joint", [False, True])
def test_recovery_finds_each_tasks_mask_from_held_out_images(trained, joint):
    model, stream, cfg, true = trained
    if joint:  # the same masks in one store over both layers (same frozen weights, by seed)
        model = HopSupSup(seed=1, width=1024, joint=True)
        for masks in true:
            model.store(masks)
        assert model.nbytes == 2048 * 2048 * 4 + 2048 * 4 + 8
    for task in range(3):
        _, held_out = split_train(stream, task, cfg.holdout, cfg.seed)
        batches = [stream.batch(task, "train", held_out[i : i + 64])[0] for i in range(0, cfg.holdout, 64)]
        result = recover(model, batches)
        steps = steps_to_recover(result.history, true, task)
        assert steps is not None and steps < 30
        assert hamming(result.masks, true[task]) < 0.01 * model.mask_bits_per_task
        x, y = stream.test_set(task)
        test = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
        assert accuracy(model, result.masks, test) > 0.9
