"""Training loops. With task boundaries known (GG, GNs, GNu), tasks are learned in groups of K:
one grouped computation over the K tasks' stacked batches, which gives the same masks as
learning them one after another (scores, batch order and optimiser state are all per task)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from supsup.data.streams import TaskStream
from supsup.model import SupermaskModel

OPTIMIZERS = ("rmsprop", "adam", "sgd")


@dataclass
class TrainConfig:
    """Per-task training settings. The defaults are the paper's MNIST ones (RMSprop 1e-4, 1000 × 128)."""

    optimizer: str = "rmsprop"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    batch_size: int = 128
    batches_per_task: int = 1000
    cosine: bool = False  # cosine-anneal the learning rate over the task's batches
    tasks_at_once: int = 1  # K: tasks trained together as one grouped computation

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        for name in ("batch_size", "batches_per_task", "tasks_at_once"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimiser over the scores of the task(s) being trained (elementwise, so per task)."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_task_group(model: SupermaskModel, stream: TaskStream, cfg: TrainConfig,
                     on_batch: Callable[[int], None] | None = None, *,
                     init_scores: Callable[[int], list[torch.Tensor] | None] | None = None,
                     before_freeze: Callable[[SupermaskModel], None] | None = None) -> list[int]:
    """Learn the next K stream tasks (K = ``cfg.tasks_at_once``, fewer at the end of the stream);
    model task t learns stream task t. Returns the new task ids, already frozen into the banks.

    Hooks (used by score transfer): ``init_scores(K)`` gives the starting scores (one ``[K, *shape]`` per
    layer, or None for the seeded default); ``before_freeze(model)`` sees the trained scores before
    ``end_tasks`` drops them."""
    first = model.num_tasks
    count = min(cfg.tasks_at_once, stream.num_tasks - first)
    if count < 1:
        raise ValueError(f"the stream has {stream.num_tasks} tasks and all are learned")
    ids = model.begin_tasks(count, None if init_scores is None else init_scores(count))
    optimizer = make_optimizer(model.score_parameters(), cfg)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.batches_per_task)
                if cfg.cosine else None)
    model.train()
    iterators = [stream.train_batches(t, cfg.batch_size, cfg.batches_per_task) for t in ids]
    for step in range(cfg.batches_per_task):
        batches = [next(it) for it in iterators]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        logits = model(x, ids if count > 1 else ids[0])
        # Sum of per-task mean losses: each task's scores get exactly its own gradient.
        loss = F.cross_entropy(logits, y, reduction="sum") / cfg.batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if on_batch is not None:
            on_batch(count)
    if before_freeze is not None:
        before_freeze(model)
    model.end_tasks()
    model.eval()
    return ids
