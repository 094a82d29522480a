"""What every baseline shares: the training loop and the GG accuracy over a task stream, so the
baselines run on the same harness (same streams, batches, optimiser settings) as SupSup."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from supsup.data.streams import TaskStream
from supsup.gg import GGResult
from supsup.layers import MultitaskBatchNorm
from supsup.learners import TrainConfig, make_optimizer

Forward = Callable[[torch.Tensor], torch.Tensor]
OnBatch = Callable[[int, torch.Tensor], None]


class Baseline(Protocol):
    """A GG baseline, task by task: ``learn(task)`` trains the next task, ``accuracy(task)`` is a learned
    task's test accuracy now (evaluated with the task given), ``bytes_stored`` what it keeps (bytes)."""

    name: str
    num_tasks: int

    def learn(self, on_batch: OnBatch | None = None) -> int: ...

    def accuracy(self, task: int) -> float: ...

    def bytes_stored(self) -> int: ...


def learn_stream(baseline: Baseline, num_tasks: int) -> GGResult:
    """Learn tasks 0..num_tasks-1; GG accuracy of each right after it and at the end, bytes stored, seconds."""
    result, start = GGResult(baseline.name), time.perf_counter()
    while baseline.num_tasks < num_tasks:
        result.after_task.append(baseline.accuracy(baseline.learn()))
    result.at_end = [baseline.accuracy(t) for t in range(num_tasks)]
    result.bytes_stored = baseline.bytes_stored()
    result.seconds = time.perf_counter() - start
    return result


def fit(params: Iterable[nn.Parameter], forward: Forward, stream: TaskStream, task: int, cfg: TrainConfig,
        on_batch: OnBatch | None = None) -> None:
    """Train ``params`` on stream task ``task``: a fresh optimiser, ``cfg.batches_per_task`` batches, CE loss.
    ``on_batch(1, loss)`` after every batch (``loss``: 0-dim, detached, not synchronised)."""
    params = [p for p in params if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.batches_per_task) if cfg.cosine else None
    for x, y in stream.train_batches(task, cfg.batch_size, cfg.batches_per_task):
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if on_batch is not None:
            on_batch(1, loss.detach())


@torch.no_grad()
def accuracy(forward: Forward, stream: TaskStream, task: int, batch_size: int = 1000) -> float:
    """Test accuracy of ``forward`` (already in eval mode) on stream task ``task``."""
    n, right = stream.size(task, "test"), 0
    for start in range(0, n, batch_size):
        x, y = stream.batch(task, "test", torch.arange(start, min(n, start + batch_size), device=stream.device))
        right += int((forward(x).argmax(-1) == y).sum())
    return right / n


def head_of(net: nn.Module) -> tuple[str, nn.Linear]:
    """The final Linear layer (the ``fc`` of our ResNets, or the last Linear of a Sequential)."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError("the network has no Linear output layer to use as a head")
    return last


def set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def replace_layers(net: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every leaf module for which ``fn(name, module)`` returns a module."""
    for name, module in list(net.named_modules()):
        if name and not list(module.children()):
            new = fn(name, module)
            if new is not None:
                set_submodule(net, name, new)
    return net


def per_task_batchnorm(net: nn.Module, num_tasks: int) -> nn.Module:
    """Every BatchNorm2d/1d → non-affine BatchNorm with per-task running statistics (as SupSup's)."""
    def swap(name, module):
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn = MultitaskBatchNorm(module.num_features, module.eps, module.momentum or 0.1)
            bn.ensure_tasks(num_tasks)
            return bn
        return None
    return replace_layers(net, swap)


def set_task(net: nn.Module, task: int) -> None:
    """Point every task-conditioned layer (``.task``) and per-task BatchNorm (``.route``) at ``task``."""
    for m in net.modules():
        if isinstance(m, MultitaskBatchNorm):
            m.route = task
        elif hasattr(m, "task"):
            m.task = task


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
