"""Scenario NNs: a learner with no task ids allocates a mask for new data, reuses one for seen data,
keeps to its budget, and logs its decisions as JSON."""

from __future__ import annotations

import pytest
import torch

from supsup.architectures import build_model
from supsup.data.streams import PermutedMNIST
from supsup.nns import (
    NNsConfig,
    NNsLearner,
    NNsResult,
    coarse_to_fine,
    decide,
    evaluate_nns,
    evaluate_nns_within,
    hidden_task_batches,
    spaced,
    train_nns,
)

BATCH = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def permuted(mnist):
    return PermutedMNIST(mnist, 3, seed=1)


def hidden(stream, schedule):
    """Batches of hidden tasks, e.g. [(0, 300), (1, 300)]: task 0 for 300 batches, then task 1."""
    for task, count in schedule:
        yield from stream.train_batches(task, BATCH, count)


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


def test_keep_going_ends_the_stream_at_a_task_boundary(permuted):
    calls = []

    def one_task(done):
        calls.append(done)
        return False

    model = build_model("lenet", output_size=100, seed=1)
    result = train_nns(model, hidden_task_batches(permuted, 30, BATCH, keep_going=one_task), NNsConfig(check_every=10))
    assert calls == [1] and result.batches == 30  # exactly one complete task
    streamed = list(hidden_task_batches(permuted, 4, BATCH, keep_going=lambda done: done < 2))
    expected = list(hidden(permuted, [(0, 4), (1, 4)]))
    assert len(streamed) == 8 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                      for a, b in zip(streamed, expected))
    assert len(list(hidden_task_batches(permuted, 4, BATCH, keep_going=lambda done: True))) == 12  # all 3 tasks


def test_spaced_subsets_include_both_ends_and_prefixes_of_the_coarse_to_fine_order_span_them():
    assert spaced(10, 4) == [0, 3, 6, 9] and spaced(10, 1) == [0] and spaced(3, 10) == [0, 1, 2]
    assert spaced(2500, 7) == [0, 416, 833, 1249, 1666, 2082, 2499]
    assert coarse_to_fine([0, 3, 6, 9, 12]) == [0, 12, 6, 3, 9]
    assert sorted(coarse_to_fine(list(range(11)))) == list(range(11))


def test_evaluation_within_a_time_budget_takes_an_evenly_spaced_subset(mnist):
    stream = PermutedMNIST(mnist, 10, seed=1)
    model = build_model("lenet", output_size=10, seed=1)
    learner = NNsLearner(model, NNsConfig())
    for x, y in stream.train_batches(0, BATCH, 1):
        learner.step(x, y)
    learner.finish()  # one mask: inference is trivial, so the test times only the classification

    def run(later_s):
        """A clock that advances only when a task ends: 3 s for the first (warm-up), 1 s for the second,
        ``later_s`` for each later one."""
        now, done = [0.0], []

        def tick(result):
            now[0] += (3.0, 1.0)[len(done)] if len(done) < 2 else later_s
            done.append(result.task)

        evaluation = evaluate_nns_within(model, stream, 10, 10.0, on_task=tick, clock=lambda: now[0])
        return evaluation, done

    # after tasks 0 and 9, 6 s are left at 1 s per task: 2 + ⌊0.9 · 6⌋ = 7 tasks planned, all fit
    evaluation, order = run(1.0)
    assert evaluation.planned == [0, 1, 3, 4, 6, 7, 9] == evaluation.evaluated_tasks
    assert order == [0, 9, 4, 1, 6, 3, 7]  # coarse to fine
    assert evaluation.as_dict()["evaluated_tasks"] == [0, 1, 3, 4, 6, 7, 9]
    # later tasks take 2 s, not the estimated 1 s: no task starts after 10 s, the evaluated ones still spread
    evaluation, order = run(2.0)
    assert evaluation.planned == [0, 1, 3, 4, 6, 7, 9] and evaluation.evaluated_tasks == [0, 1, 4, 6, 9]
    assert evaluate_nns_within(model, stream, 3, None).evaluated_tasks == [0, 1, 2]
