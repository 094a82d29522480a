"""Scenario GG (task given in training and inference) on convolutional supermask networks.

``run_gg`` learns a stream task by task and records each task's test accuracy right after it was learned
and again at the end of the run. With per-task BatchNorm statistics and frozen masks these are equal:
nothing a later task does touches an earlier task's mask or statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from supsup.data.streams import TaskStream
from supsup.evaluation import evaluate_task
from supsup.learners import TrainConfig, train_task_group
from supsup.model import SupermaskModel
from supsup.transfer import RunningMeanScores


def paper_gg_config(batches_per_task: int, batch_size: int = 128, tasks_at_once: int = 1,
                    cuda_graph: bool = True) -> TrainConfig:
    """The paper's GG optimiser: Adam lr 1e-3, coupled L2 1e-4 on the scores, cosine annealing per task.

    ``cuda_graph``: on CUDA, replay each task's training step as a CUDA graph (same steps, no launch
    overhead: 3.3 vs 16.3 ms per batch for the reduced ResNet-18 on an H200; BENCHMARKS.md)."""
    return TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4, cosine=True, batch_size=batch_size,
                       batches_per_task=batches_per_task, tasks_at_once=tasks_at_once, cuda_graph=cuda_graph)


@dataclass
class GGResult:
    """Accuracy per task right after learning it and at the end of the run; bytes stored (for SupSup: the
    bit-packed masks plus the per-task BN running statistics, fp32)."""

    method: str
    after_task: list[float] = field(default_factory=list)
    at_end: list[float] = field(default_factory=list)
    bytes_stored: int = 0
    seconds: float = 0.0

    @property
    def average_at_end(self) -> float:
        return sum(self.at_end) / len(self.at_end)

    @property
    def average_after_task(self) -> float:
        return sum(self.after_task) / len(self.after_task)

    def as_dict(self) -> dict:
        return {"method": self.method, "after_task": self.after_task, "at_end": self.at_end,
                "average_after_task": self.average_after_task, "average_at_end": self.average_at_end,
                "bytes_stored": self.bytes_stored, "seconds": round(self.seconds, 1)}


def run_gg(model: SupermaskModel, stream: TaskStream, cfg: TrainConfig, *, transfer: bool = False,
           num_tasks: int | None = None, method: str | None = None,
           on_task: Callable[[int, float], None] | None = None) -> GGResult:
    """Learn tasks 0..num_tasks-1 of ``stream`` (all by default); GG accuracy after each and at the end.

    ``transfer=True`` starts each new task from the running mean of the earlier tasks' scores."""
    num_tasks = stream.num_tasks if num_tasks is None else num_tasks
    result = GGResult(method or ("SupSup Transfer" if transfer else "SupSup"))
    running = RunningMeanScores() if transfer else None
    hooks = {"init_scores": running.init_scores, "before_freeze": running.observe} if running else {}
    start = time.perf_counter()
    while model.num_tasks < num_tasks:
        group_cfg = cfg if model.num_tasks + cfg.tasks_at_once <= num_tasks else \
            TrainConfig(**{**cfg.__dict__, "tasks_at_once": num_tasks - model.num_tasks})
        for t in train_task_group(model, stream, group_cfg, **hooks):
            acc = evaluate_task(model, stream, t, "GG").accuracy
            result.after_task.append(acc)
            if on_task is not None:
                on_task(t, acc)
    result.at_end = [evaluate_task(model, stream, t, "GG").accuracy for t in range(num_tasks)]
    result.bytes_stored = model.bytes_per_task() * model.num_tasks  # masks and per-task BatchNorm statistics
    result.seconds = time.perf_counter() - start
    return result
