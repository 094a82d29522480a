"""Learning on real MNIST, scaled down: accuracy floors and task inference on trained masks."""

import copy

import pytest

from supsup import Inference, build_model
from supsup.data.streams import PermutedMNIST
from supsup.evaluation import evaluate
from supsup.learners import TrainConfig, make_optimizer, train_task_group


@pytest.fixture(scope="module")
def trained(mnist):
    stream = PermutedMNIST(mnist, 3, seed=1)
    model = build_model("lenet", output_size=50, seed=1)
    cfg = TrainConfig(batches_per_task=150)
    for _ in range(3):
        train_task_group(model, stream, cfg)
    return model, stream


def test_each_task_learns_far_above_chance_and_is_not_forgotten(trained):
    model, stream = trained
    results = evaluate(model, stream, "GG").tasks
    assert all(r.accuracy > 0.85 for r in results)
    # masks are frozen: a fourth task leaves the first three exactly as they were
    extended = copy.deepcopy(model)
    stream4 = PermutedMNIST(stream.data, 4, seed=1)
    train_task_group(extended, stream4, TrainConfig(batches_per_task=5))
    assert extended.num_tasks == 4
    assert [r.accuracy for r in evaluate(extended, stream4, "GG", tasks=[0, 1, 2]).tasks] == [r.accuracy for r in results]


@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_one_shot_infers_the_task_from_one_image(trained, objective):
    model, stream = trained
    hits = total = 0
    for t in range(3):
        x, _ = stream.test_set(t)
        for i in range(0, 400, 4):
            hits += int(infer_one(model, x[i : i + 1], objective)) == t
            total += 1
    assert hits / total >= 0.97


def infer_one(model, x, objective):
    from supsup.inference import infer_tasks

    return infer_tasks(model, x, Inference(objective=objective))


def test_only_the_current_tasks_scores_are_optimised(trained):
    model = copy.deepcopy(trained[0])
    model.begin_tasks(1)
    opt = make_optimizer(model.score_parameters(), TrainConfig())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_weights()
    model.end_tasks()


def test_mixed_stream_per_sample_inference_routes_each_sample(trained):
    from supsup.evaluation import evaluate_mixed

    model, stream = trained
    mixed = evaluate_mixed(model, stream, Inference(granularity="sample"), per_task=200, seed=3)
    assert mixed.samples == 600
    assert mixed.task_inference_accuracy >= 0.95
    assert mixed.accuracy_given - 0.03 <= mixed.accuracy_inferred <= mixed.accuracy_given
    with pytest.raises(ValueError, match="per-sample"):
        evaluate_mixed(model, stream, Inference(granularity="image"))
