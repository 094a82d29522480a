"""Training loops. With task boundaries known (GG, GNs, GNu), tasks are learned in groups of K:
one grouped computation over the K tasks' stacked batches, which gives the same masks as
learning them one after another (scores, batch order and optimiser state are all per task)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from supsup import fused
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
    cuda_graph: bool = False  # on CUDA, capture the training step once and replay it (see TrainingStep)
    fused_step: bool = True  # RMSprop over threshold scores on the CPU in one pass (see supsup.fused)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        for name in ("batch_size", "batches_per_task", "tasks_at_once"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def make_optimizer(trained: SupermaskModel | list[torch.nn.Parameter], cfg: TrainConfig,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """A fresh optimiser over the task(s) being trained (elementwise, so per task): a model's
    ``trainable_parameters()`` (scores and per-task vectors), or the given parameters.

    For a model, with ``cfg.fused_step``, RMSprop without weight decay over threshold scores alone on the
    CPU is ``supsup.fused.ThresholdRMSprop`` (the same update in one pass, the square root correctly rounded).
    ``capturable``: state and learning rate live on the parameters' device (a tensor lr, which schedulers
    update in place), as a CUDA-graphed step needs."""
    if isinstance(trained, SupermaskModel):
        layers = [layer for layer in trained.mask_layers() if layer.scores is not None]
        params = trained.trainable_parameters()
        if cfg.fused_step and cfg.optimizer == "rmsprop" and cfg.weight_decay == 0 and not capturable \
                and len(params) == len(layers) and fused.applies_to(layers):
            return fused.ThresholdRMSprop(layers, lr=cfg.lr)
    else:
        params = trained
    if capturable:
        lr, extra = torch.tensor(cfg.lr, device=params[0].device), {"capturable": True}
    else:
        lr, extra = cfg.lr, {}
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay, **extra)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, **extra)
    if capturable:
        raise ValueError("SGD is not capturable here: use adam or rmsprop with a CUDA graph")
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class TrainingStep:
    """One optimisation step: ``loss = loss_fn(x, y)``, backward, ``optimizer.step()``; returns the loss.

    With ``cuda_graph`` (CUDA only; the optimiser built with ``capturable=True``) the first ``warmup``
    calls run eagerly on a side stream, the next one captures the whole step as a CUDA graph, and every
    call from then on copies ``x, y`` into the graph's input buffers and replays it: the same kernels on
    the same batches, without Python and launch costs per kernel. Every call is a real step on its batch.
    Batches must then keep their shape, and ``loss_fn`` must not synchronise with the host."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                 cuda_graph: bool = False, warmup: int = 3):
        self.loss_fn, self.optimizer, self.cuda_graph, self.warmup = loss_fn, optimizer, cuda_graph, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(x, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.cuda_graph:
            self.optimizer.zero_grad(set_to_none=True)
            return self._step(x, y)
        if not x.is_cuda:
            raise ValueError("cuda_graph needs the batches on a CUDA device")
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            static_x, static_y = x.clone(), y.clone()
            self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                static_loss = self._step(static_x, static_y)
            self._static = (static_x, static_y, static_loss)
        else:
            static_x, static_y, _ = self._static
            if x.shape != static_x.shape or y.shape != static_y.shape:
                raise ValueError(f"a CUDA-graphed step needs batches of one shape: captured {tuple(static_x.shape)}, "
                                 f"got {tuple(x.shape)}")
            static_x.copy_(x)
            static_y.copy_(y)
        self.graph.replay()
        return self._static[2]


def train_task_group(model: SupermaskModel, stream: TaskStream, cfg: TrainConfig,
                     on_batch: Callable[[int, torch.Tensor], None] | None = None, *,
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
    fit_task_group(model, stream, cfg, on_batch)
    if before_freeze is not None:
        before_freeze(model)
    model.end_tasks()
    model.eval()
    return ids


class Replica(Protocol):
    """This process's part of a group of processes that train the same tasks (data parallelism)."""

    size: int  # processes in the group

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole batch ``[B, ...]`` -> ``[B / size, ...]``."""

    def wrap(self, model: SupermaskModel) -> Callable[..., torch.Tensor]:
        """The forward to train with: ``model``'s, averaging the scores' gradients over the group."""


def fit_task_group(model: SupermaskModel, stream: TaskStream, cfg: TrainConfig,
                   on_batch: Callable[[int, torch.Tensor], None] | None = None,
                   replica: Replica | None = None) -> None:
    """Train the tasks being trained (begun with ``model.begin_tasks``; stream task t for model task t) for
    ``cfg.batches_per_task`` batches each, in one grouped computation. ``on_batch(K, loss)`` after every step.

    ``replica``: this process computes the loss on its share of every batch (the mean over its rows), and
    the replica's forward averages the gradients, so the step is the one of the whole batch."""
    ids = model.training_tasks
    graphed = cfg.cuda_graph and model.mask_layers()[0].weight.is_cuda and replica is None
    optimizer = make_optimizer(model, cfg, capturable=graphed)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.batches_per_task)
                if cfg.cosine else None)
    model.train()
    route = ids if len(ids) > 1 else ids[0]
    forward, share = (model, lambda t: t) if replica is None else (replica.wrap(model), replica.share)
    rows = cfg.batch_size // (1 if replica is None else replica.size)
    # Sum of per-task mean losses: each task's scores get exactly its own gradient.
    step = TrainingStep(lambda x, y: F.cross_entropy(forward(x, route), y, reduction="sum") / rows,
                        optimizer, cuda_graph=graphed)
    iterators = [stream.train_batches(t, cfg.batch_size, cfg.batches_per_task) for t in ids]
    for _ in range(cfg.batches_per_task):
        batches = [next(it) for it in iterators]
        loss = step(torch.cat([share(b[0]) for b in batches]), torch.cat([share(b[1]) for b in batches]))
        if schedule is not None:
            schedule.step()
        if on_batch is not None:
            on_batch(len(ids), loss)
