"""Scenario NNs: a learner with no task ids allocates a mask for new data, reuses one for seen data,
keeps to its budget, and logs its decisions as JSON."""

from __future__ import annotations

import pytest
import torch

from supsup.architectures import build_model
from supsup.data.streams import PermutedMNIST
from supsup.nns import NNsConfig, NNsLearner, NNsResult, decide, evaluate_nns, train_nns

BATCH = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def permuted(mnist):
    return PermutedMNIST(mnist, 3, seed=1)


def hidden(stream, schedule):
    """Batches of hidden tasks, e.g. [(0, 300), (1, 300)]: task 0 for 300 batches, then task 1."""
    for task, count in schedule:
        for x, y in stream.train_batches(task, BATCH, count):
            yield x, y


def test_rule_allocates_when_no_mask_stands_out_and_reuses_a_clear_winner():
    flat = torch.tensor([0.01, -0.02, 0.0, 0.015, -0.01])
    assert decide(flat, num_masks=2, epsilon=2 ** -3)[0]
    clear = torch.tensor([0.5, -3.0, 0.4, 0.6, 0.5])
    new, best, confidence = decide(clear, num_masks=2, epsilon=2 ** -3)
    assert (new, best) == (False, 1) and confidence > 4
    # a confident pick of an untrained slot means the data is new to every trained mask
    assert decide(torch.tensor([0.5, 0.4, -3.0, 0.6, 0.5]), num_masks=2, epsilon=2 ** -3)[0]


def test_new_distribution_gets_a_new_mask_and_a_seen_one_gets_its_old_mask(permuted, tmp_path):
    model = build_model("lenet", output_size=100, seed=1)
    cfg = NNsConfig(check_every=100)
    result = train_nns(model, hidden(permuted, [(0, 300), (1, 300), (0, 200)]), cfg)
    log = [(d.batch, d.decision, d.mask) for d in result.decisions]
    assert log == [(0, "first", 0), (100, "reuse", 0), (200, "reuse", 0),
                   (300, "new", 1), (400, "reuse", 1), (500, "reuse", 1),
                   (600, "reuse", 0), (700, "reuse", 0)]
    assert result.num_masks == 2 and model.num_tasks == 2 and result.batches == 800
    # the mask of hidden task 0 kept training when its data came back; each task's test batches
    # are classified with its own mask
    evaluation = evaluate_nns(model, permuted, tasks=[0, 1])
    assert [max(t.inferred, key=t.inferred.get) for t in evaluation.tasks] == [0, 1]
    assert evaluation.average_accuracy > 0.85

    path = tmp_path / "decisions.json"
    result.save(path)
    again = NNsResult.load(path)
    assert again == result and again.decisions[3].confidence < 1 + cfg.epsilon <= again.decisions[4].confidence


def test_the_banks_hold_the_latest_masks_while_they_keep_training(permuted):
    model = build_model("lenet", output_size=100, seed=1)
    learner = NNsLearner(model, NNsConfig(check_every=50))
    assert model.num_tasks == 5  # n = max(k, 5): four untrained slots take part in the checks
    for x, y in hidden(permuted, [(0, 120)]):
        learner.step(x, y)
    learner.check(x)  # freezes mask 0 into the banks
    for layer, scores in zip(model.mask_layers(), learner.scores[0]):
        assert torch.equal(layer.bank.mask(0), scores >= 0)
    result = learner.finish()
    assert result.num_masks == 1 and model.num_tasks == 1  # untrained slots dropped


@pytest.mark.parametrize("when_full", ["reuse", "stop"])
def test_budget_caps_the_masks(permuted, when_full):
    model = build_model("lenet", output_size=100, seed=1)
    cfg = NNsConfig(check_every=100, budget=2, when_full=when_full)
    result = train_nns(model, hidden(permuted, [(0, 200), (1, 200), (2, 200)]), cfg)
    assert result.num_masks == 2 and model.num_tasks == 2
    kinds = [d.decision for d in result.decisions]
    assert kinds.count("new") == 1
    if when_full == "reuse":
        assert kinds[4] == "full" and result.batches == 600 and not result.stopped
        assert all(d.mask in (0, 1) for d in result.decisions)
    else:
        assert kinds[-1] == "stop" and result.batches == 400 and result.stopped
