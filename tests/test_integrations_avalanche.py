"""The SupSup strategy inside Avalanche, on a 3-experience PermutedMNIST built from tensors of our verified
MNIST (nothing downloaded), 200 batches of 128 per experience: the same masks as our own runner, nothing
forgotten, tasks inferred without labels, Avalanche's metrics, loggers and checkpointing unchanged.

Runs in its own venv (``make test-avalanche``): avalanche-lib needs torch's CUDA build."""

import contextlib
import csv
import io
import json

import pytest
import torch

from optional import import_or_skip

import_or_skip("avalanche", "avalanche")

from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics  # noqa: E402
from avalanche.logging import CSVLogger, InteractiveLogger, TextLogger  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from supsup import Inference, build_model  # noqa: E402
from supsup.data.streams import PermutedMNIST  # noqa: E402
from supsup.evaluation import predict  # noqa: E402
from supsup.inference import infer_tasks  # noqa: E402
from supsup.integrations.avalanche import (  # noqa: E402
    SupSup,
    SupSupModel,
    stream_benchmark,
    task_inference_metrics,
)
from supsup.learners import TrainConfig, train_task_group  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS, SETTINGS = 3, TrainConfig(batches_per_task=200)  # RMSprop 1e-4, batches of 128
TEST_SAMPLES = 2000  # of each task's test split: Avalanche's loader reads sample by sample


def lenet() -> SupSupModel:
    return SupSupModel(build_model("lenet", output_size=100, seed=1))


def masks(model: SupSupModel) -> list[torch.Tensor]:
    """The packed masks ``[k, P/8]`` of every layer."""
    return [layer.bank.packed for layer in model.supermasks.mask_layers()]


def strategy(model: SupSupModel, loggers=(), eval_every: int = -1) -> SupSup:
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True),
                                 loss_metrics(experience=True), *task_inference_metrics(), loggers=list(loggers))
    return SupSup(model=model, optimizer="rmsprop", lr=SETTINGS.lr, train_mb_size=SETTINGS.batch_size,
                  eval_mb_size=1000, evaluator=evaluator, eval_every=eval_every)


def experience_value(metrics: dict, name: str, experience: int) -> float:
    (value,) = [v for k, v in metrics.items() if k.startswith(name + "/") and k.endswith(f"Exp{experience:03d}")]
    return value


@pytest.fixture(scope="module")
def stream(mnist):
    return PermutedMNIST(mnist, TASKS, seed=1)


@pytest.fixture(scope="module")
def runner(stream):
    """Our own runner, same seed, optimiser and batches: its model and, per task on the benchmark's test
    samples, its accuracy with the task given and with each sample's task inferred."""
    model = build_model("lenet", output_size=100, seed=1)
    for _ in range(TASKS):
        train_task_group(model, stream, SETTINGS)
    given, inferred = [], []
    for t in range(TASKS):
        x, y = stream.batch(t, "test", torch.arange(TEST_SAMPLES))
        given.append((predict(model, x, t) == y).float().mean().item())
        tasks = infer_tasks(model, x, Inference(granularity="sample"))
        inferred.append((predict(model, x, tasks) == y).float().mean().item())
    return model, given, inferred


@pytest.fixture(scope="module")
def labelled(stream, tmp_path_factory):
    """Task labels 0, 1, 2; the runner's batches replayed in its order (``shuffle=False``); the whole test
    stream evaluated after every experience; an Avalanche checkpoint saved after experience 1."""
    folder = tmp_path_factory.mktemp("avalanche")
    benchmark = stream_benchmark(stream, batches=SETTINGS, test_samples=TEST_SAMPLES)
    printed, text = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed):  # where InteractiveLogger prints
        learner = strategy(lenet(), loggers=[InteractiveLogger(), TextLogger(text), CSVLogger(str(folder / "csv"))])
        after_each = []
        for i, experience in enumerate(benchmark.train_stream):
            learner.train(experience, shuffle=False)
            if i == 1:
                save_checkpoint(learner, folder / "checkpoint.pkl")
            after_each.append(learner.eval(benchmark.test_stream))
    return dict(benchmark=benchmark, strategy=learner, after_each=after_each, folder=folder,
                printed=printed.getvalue(), text=text.getvalue())


def test_with_task_labels_it_learns_the_runners_masks_and_accuracy(labelled, runner):
    model, given, _ = runner
    # the same batches, initial scores and optimiser give bit-identical masks ...
    assert all(torch.equal(a, b) for a, b in zip(masks(labelled["strategy"].model), masks(SupSupModel(model))))
    # ... so the same accuracy; Avalanche's takes the argmax over all 100 outputs and ours over the 10
    # classes, so a sample whose best output is a superfluous one could count differently: 0.2 points allowed
    final = labelled["after_each"][-1]
    for t, ours in enumerate(given):
        assert experience_value(final, "Top1_Acc_Exp", t) == pytest.approx(ours, abs=0.002)
        assert ours > 0.85


def test_with_task_labels_nothing_is_forgotten(labelled):
    after_each = labelled["after_each"]
    for t in range(TASKS - 1):  # accuracy on an experience never changes once it is learned: forgetting is 0
        assert {experience_value(m, "Top1_Acc_Exp", t) for m in after_each[t:]} == \
            {experience_value(after_each[t], "Top1_Acc_Exp", t)}
        assert experience_value(after_each[-1], "ExperienceForgetting", t) == 0.0
    assert after_each[-1]["StreamForgetting/eval_phase/test_stream"] == 0.0
    assert all(experience_value(after_each[-1], "TaskInference_Exp", t) == 1.0 for t in range(TASKS))


def test_avalanches_loggers_report_the_metrics(labelled):
    for name in ("Top1_Acc_Exp", "Top1_Acc_Stream", "ExperienceForgetting", "StreamForgetting", "Loss_Exp",
                 "TaskInference_Exp", "TaskInference_Stream"):
        assert name in labelled["printed"] and name in labelled["text"], name
    with open(labelled["folder"] / "csv" / "eval_results.csv") as f:
        rows = list(csv.DictReader(f))
    final = labelled["after_each"][-1]
    last = [r for r in rows if r["training_exp"] == str(TASKS - 1)]
    assert [float(r["eval_accuracy"]) for r in last] == \
        pytest.approx([experience_value(final, "Top1_Acc_Exp", t) for t in range(TASKS)], abs=1e-4)


def test_without_task_labels_each_samples_task_is_inferred(stream, runner):
    """Every experience has task label 0 and Avalanche's loader shuffles: masks are inferred per sample."""
    _, _, inferred = runner
    torch.manual_seed(0)  # the loader's order
    benchmark = stream_benchmark(stream, task_labels=False, batches=SETTINGS, test_samples=TEST_SAMPLES)
    learner = strategy(lenet())
    for experience in benchmark.train_stream:
        learner.train(experience)
    final = learner.eval(benchmark.test_stream)
    assert learner.model.routes_by_labels is False
    for t, ours in enumerate(inferred):
        # measured: 1.0 on every experience, as our runner's per-sample inference
        assert experience_value(final, "TaskInference_Exp", t) >= 0.99
        # another order of the same 25,600 samples per experience: over 3 loader seeds the accuracy on the
        # full test sets stayed within 0.4 points of the runner's; 1 point allowed
        assert experience_value(final, "Top1_Acc_Exp", t) == pytest.approx(ours, abs=0.01)


def test_avalanche_checkpoint_round_trips_every_mask(labelled):
    """Avalanche's save_checkpoint after experience 1, maybe_load_checkpoint into a fresh strategy, then
    experience 2: the masks of an uninterrupted run, and the same accuracy."""
    benchmark, finished = labelled["benchmark"], labelled["strategy"]
    resumed, start = maybe_load_checkpoint(strategy(lenet()), labelled["folder"] / "checkpoint.pkl")
    assert start == 2 and resumed.model.supermasks.num_tasks == 2
    for experience in benchmark.train_stream[start:]:
        resumed.train(experience, shuffle=False)
    assert all(torch.equal(a, b) for a, b in zip(masks(resumed.model), masks(finished.model)))
    assert resumed.eval(benchmark.test_stream)["Top1_Acc_Stream/eval_phase/test_stream/Task002"] == \
        labelled["after_each"][-1]["Top1_Acc_Stream/eval_phase/test_stream/Task002"]


def test_state_dict_round_trips_every_mask_and_its_label(labelled, stream, tmp_path):
    trained = labelled["strategy"].model.eval()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    fresh = lenet()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    assert torch.equal(fresh.mask_origins, torch.tensor([[0, 0], [1, 1], [2, 2]]))
    for t in range(TASKS):
        x, _ = stream.batch(t, "test", torch.arange(200))
        assert torch.equal(fresh(x, torch.full((200,), t)), trained(x, torch.full((200,), t)))  # by label
        assert torch.equal(fresh(x), trained(x))  # inferred
        assert torch.equal(fresh.last_tasks, torch.full((200,), t))


def test_a_state_whose_masks_and_origins_differ_is_refused(labelled):
    state = labelled["strategy"].model.state_dict()
    with pytest.raises(RuntimeError, match="mask_origins describes 2 masks, the model holds 3"):
        lenet().load_state_dict({**state, "mask_origins": state["mask_origins"][:2]})


def test_before_any_experience_the_evaluation_is_chance_not_a_crash(stream):
    """Avalanche evaluates before training when ``eval_every >= 0``: no mask yet, so every class ties."""
    benchmark = stream_benchmark(stream, batches=TrainConfig(batches_per_task=2), test_samples=100)
    learner = strategy(lenet(), eval_every=0)  # evaluates before, and at the end of, the experience
    learner.train(benchmark.train_stream[0], eval_streams=[benchmark.test_stream[0]])
    model = learner.model.eval()
    x, _ = stream.batch(0, "test", torch.arange(8))
    assert model(x).shape == (8, 100)
    fresh = lenet().eval()
    assert torch.equal(fresh(x), torch.zeros(8, 100)) and fresh.last_tasks is None


def test_routing_by_labels_refuses_an_experience_with_a_known_label(stream):
    benchmark = stream_benchmark(stream, task_labels=False, batches=TrainConfig(batches_per_task=2), test_samples=100)
    learner = strategy(SupSupModel(build_model("lenet", output_size=100, seed=1), route_by_labels=True))
    learner.train(benchmark.train_stream[0])
    with pytest.raises(ValueError, match=r"experience 1 has task labels \[0\]: routing by label needs one new"):
        learner.train(benchmark.train_stream[1])


def test_the_strategy_needs_a_supsup_model():
    with pytest.raises(TypeError, match="SupSup needs a SupSupModel, got SupermaskModel"):
        SupSup(model=build_model("lenet", output_size=100, seed=1))


def test_the_example_runs(tmp_path, data_root, capsys):
    from supsup.examples.avalanche_permuted_mnist import main

    assert main(["--tasks", "2", "--batches", "20", "--test-samples", "500", "--data-root", str(data_root),
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "task inference" in out and len(out.splitlines()) == 8  # 3 header lines, 2 x 2 rows, files
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"given", "inferred"} and "Top1_Acc_Exp" in (tmp_path / "log.txt").read_text()
