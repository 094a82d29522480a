"""Evaluation protocols over a task stream: GG (task given), GNs / GNu (task inferred).

- GG: accuracy of each task's test set with its own mask.
- GNu, paper rule (granularity ``image``/``batch``): the test set is cut into shuffled batches of
  128; one inference per batch; a wrong task makes the whole batch wrong, a right one classifies it
  with that task's mask. GNu per-sample rule (``sample``): each sample's task is inferred; a sample
  is right only if its task and its class are both right.
- GNs: labels are shared, so only the class counts: the batch (or sample) is classified with the
  inferred mask, whatever task it is.
Predictions are the argmax over the real classes (the superfluous outputs only serve inference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from supsup.data.streams import TaskStream
from supsup.inference import Inference, infer_tasks
from supsup.layers import SupermaskLinear
from supsup.model import SupermaskModel
from supsup.seeding import generator

SCENARIOS = ("GG", "GNs", "GNu")

#: Samples inferred together at per-sample granularity when every masked layer is linear and the inputs are
#: flat (``[N, features]``): each sample is inferred on its own, so only the speed depends on it, and those
#: layers form no per-sample weights (``layers._UniformSuperposeLinear``). Measured on a 50-task LeNet, 2
#: threads: 10,000 samples of a mixed stream in 2.9 s against 6.0 s in batches of 128 (BENCHMARKS.md).
SAMPLE_BATCH = 1024


@dataclass
class TaskResult:
    """Per-task figures; ``None`` where the scenario does not infer tasks. ``inferred``: test samples of this
    task classified with each inferred task (a row of the task-inference confusion matrix)."""

    task: int
    accuracy: float
    task_inference_accuracy: float | None = None
    accuracy_inferred: float | None = None
    inferred: dict[int, int] | None = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.inferred is not None:
            out["inferred"] = {str(t): n for t, n in sorted(self.inferred.items())}
        return out


@dataclass
class Evaluation:
    scenario: str
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float:
        return sum(t.accuracy for t in self.tasks) / len(self.tasks)

    @property
    def average_accuracy_inferred(self) -> float | None:
        values = [t.accuracy_inferred for t in self.tasks if t.accuracy_inferred is not None]
        return sum(values) / len(values) if values else None

    @property
    def average_task_inference_accuracy(self) -> float | None:
        values = [t.task_inference_accuracy for t in self.tasks if t.task_inference_accuracy is not None]
        return sum(values) / len(values) if values else None


@torch.no_grad()
def predict(model: SupermaskModel, x: torch.Tensor, task, batch_size: int = 2000) -> torch.Tensor:
    """Class predictions ``[N]`` over the real classes with the given task(s)."""
    classes = model.num_classes or model.output_size
    out = []
    for start in range(0, x.shape[0], batch_size):
        t = task[start : start + batch_size] if isinstance(task, torch.Tensor) else task
        out.append(model(x[start : start + batch_size], t)[:, :classes].argmax(-1))
    return torch.cat(out)


@torch.no_grad()
def evaluate_task(model: SupermaskModel, stream: TaskStream, task: int, scenario: str = "GG",
                  how: Inference = Inference(), batch_size: int = 128, seed: int = 0) -> TaskResult:
    """Figures of one learned task on its test set under ``scenario``."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    model.eval()
    x, y = stream.test_set(task)
    correct_given = predict(model, x, task) == y
    result = TaskResult(task, int(correct_given.sum()) / correct_given.numel())
    if scenario == "GG":
        return result
    order = torch.randperm(x.shape[0], generator=generator(seed, "test-order", task)).to(x.device)
    if how.granularity == "image":
        return _evaluate_by_first_images(model, x, y, task, scenario, how, order, batch_size, correct_given, result)
    right_task = right = 0
    counts = torch.zeros(model.num_tasks, dtype=torch.long, device=x.device)
    step = _sample_batch(model, x, batch_size) if how.granularity == "sample" else batch_size
    for start in range(0, x.shape[0], step):
        idx = order[start : start + step]
        inferred = infer_tasks(model, x[idx], how)
        ids = inferred.expand(idx.numel())
        counts.scatter_add_(0, ids, torch.ones_like(ids))
        if inferred.dim() == 0:  # one task for the whole batch
            task_ok = int(inferred) == task
            right_task += task_ok * idx.numel()
            if task_ok:
                right += int(correct_given[idx].sum())
            elif scenario == "GNs":
                right += int((predict(model, x[idx], int(inferred)) == y[idx]).sum())
        else:
            task_ok = inferred == task
            right_task += int(task_ok.sum())
            class_ok = _classified_with(model, x[idx], y[idx], inferred, correct_given[idx], ~task_ok)
            right += int((class_ok if scenario == "GNs" else class_ok & task_ok).sum())
    n = x.shape[0]
    result.task_inference_accuracy, result.accuracy_inferred = right_task / n, right / n
    result.inferred = {t: c for t, c in enumerate(counts.tolist()) if c}
    return result


def _sample_batch(model: SupermaskModel, x: torch.Tensor, batch_size: int) -> int:
    """Samples per pass of per-sample inference: ``SAMPLE_BATCH`` for linear layers on flat inputs (see
    there), else ``batch_size``."""
    linear = all(isinstance(layer, SupermaskLinear) for layer in model.mask_layers())
    return max(batch_size, SAMPLE_BATCH) if linear and x.dim() == 2 else batch_size


def _classified_with(model: SupermaskModel, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor,
                     correct_given: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: sample b classified right with task ``tasks[b]``, where ``correct_given`` already says so
    for the samples whose task is the given one; only the ``other`` rows run the model."""
    correct = correct_given.clone()
    if other.any():
        correct[other] = predict(model, x[other], tasks[other]) == y[other]
    return correct


def _evaluate_by_first_images(model, x, y, task, scenario, how, order, batch_size, correct_given, result):
    """The paper's rule (one inference from each batch's first image) for all batches at once:
    inferring the first images as one per-sample batch gives the same tasks as one inference per
    batch, because per-sample inference treats every sample independently."""
    batches = order.split(batch_size)
    firsts = torch.stack([b[0] for b in batches])
    inferred = infer_tasks(model, x[firsts], dataclasses.replace(how, granularity="sample"))
    right_task = right = 0
    result.inferred = {}
    for idx, t in zip(batches, inferred.tolist()):
        result.inferred[t] = result.inferred.get(t, 0) + idx.numel()
        if t == task:
            right_task += idx.numel()
            right += int(correct_given[idx].sum())
        elif scenario == "GNs":
            right += int((predict(model, x[idx], t) == y[idx]).sum())
    n = x.shape[0]
    result.task_inference_accuracy, result.accuracy_inferred = right_task / n, right / n
    return result


def evaluate(model: SupermaskModel, stream: TaskStream, scenario: str = "GG", how: Inference = Inference(),
             tasks: list[int] | None = None, seed: int = 0,
             on_task: Callable[[TaskResult], None] | None = None) -> Evaluation:
    """Evaluate every learned task (or ``tasks``) under ``scenario``."""
    evaluation = Evaluation(scenario)
    for t in tasks if tasks is not None else range(model.num_tasks):
        result = evaluate_task(model, stream, t, scenario, how, seed=seed)
        evaluation.tasks.append(result)
        if on_task is not None:
            on_task(result)
    return evaluation


@dataclass
class MixedResult:
    """Per-sample inference on a stream whose test samples of all tasks are shuffled together."""

    samples: int
    accuracy_given: float
    task_inference_accuracy: float
    accuracy_inferred: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def evaluate_mixed(model: SupermaskModel, stream: TaskStream, how: Inference, scenario: str = "GNu",
                   batch_size: int = 128, per_task: int | None = None, seed: int = 0,
                   on_batch: Callable[[int], None] | None = None) -> MixedResult:
    """Shuffle the test samples of every learned task together (``per_task`` of each, all if None),
    cut them into batches of ``batch_size`` (``SAMPLE_BATCH`` where it applies), infer each sample's task in
    one pass per batch (``how.granularity`` must be ``sample``) and score under GNu (task and class right)
    or GNs."""
    if how.granularity != "sample":
        raise ValueError("a mixed stream needs per-sample inference (granularity 'sample')")
    model.eval()
    gen = generator(seed, "mixed-stream")
    pairs = []
    for t in range(model.num_tasks):
        n = stream.size(t, "test")
        idx = torch.randperm(n, generator=gen)[: per_task or n]
        pairs.append(torch.stack([torch.full_like(idx, t), idx], 1))
    pairs = torch.cat(pairs)
    pairs = pairs[torch.randperm(pairs.shape[0], generator=gen)]
    given = task_ok_total = right = 0
    first = stream.batch(int(pairs[0, 0]), "test", pairs[:1, 1].to(stream.device))[0]
    step = _sample_batch(model, first, batch_size)
    for start in range(0, pairs.shape[0], step):
        chunk = pairs[start : start + step]
        xs, ys = [], []
        for t in chunk[:, 0].unique().tolist():
            rows = chunk[:, 0] == t
            x, y = stream.batch(t, "test", chunk[rows, 1].to(stream.device))
            xs.append(x), ys.append(y)
        tasks = torch.cat([chunk[chunk[:, 0] == t, 0] for t in chunk[:, 0].unique().tolist()]).to(stream.device)
        x, y = torch.cat(xs), torch.cat(ys)
        inferred = infer_tasks(model, x, how)
        task_ok = inferred == tasks
        correct_given = predict(model, x, tasks) == y
        class_ok = _classified_with(model, x, y, inferred, correct_given, ~task_ok)
        given += int(correct_given.sum())
        task_ok_total += int(task_ok.sum())
        right += int((class_ok if scenario == "GNs" else class_ok & task_ok).sum())
        if on_batch is not None:
            on_batch(chunk.shape[0])
    n = pairs.shape[0]
    return MixedResult(n, given / n, task_ok_total / n, right / n)
