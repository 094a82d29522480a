"""Upper Bound, Lower Bound and Separate Heads: dense networks with affine BN, trained normally.

- **Upper Bound**: a separate dense network per task, evaluated right after its task (no forgetting
  possible); stores one network per task.
- **Lower Bound**: one trunk trained on every task in turn, a head per task; evaluated at the end, so it
  shows forgetting (paper: 24.5% on SplitCIFAR100).
- **Separate Heads**: the trunk is trained with task 1 and then frozen (BN statistics too); later tasks
  train only their own head (paper: heads with Adam lr 1e-2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from supsup.baselines.common import OnBatch, accuracy, fit, head_of, learn_stream, parameter_count, set_submodule
from supsup.data.streams import TaskStream
from supsup.gg import GGResult
from supsup.learners import TrainConfig
from supsup.seeding import derive_seed

FP32 = 4
Builder = Callable[[], nn.Module]


def _seeded(build: Builder, seed: int, *what) -> nn.Module:
    torch.manual_seed(derive_seed(seed, *what))
    return build()


class UpperBound:
    """A fresh dense network per task, all weights trained. Each task keeps its own network, so its accuracy is
    the one measured right after it was learned (the networks themselves are not kept in memory)."""

    name = "Upper Bound"

    def __init__(self, build: Builder, stream: TaskStream, cfg: TrainConfig, seed: int = 0):
        self.build, self.stream, self.cfg, self.seed = build, stream, cfg, seed
        self.accuracies: list[float] = []
        self.parameters = 0

    @property
    def num_tasks(self) -> int:
        return len(self.accuracies)

    def learn(self, on_batch: OnBatch | None = None) -> int:
        t = self.num_tasks
        net = _seeded(self.build, self.seed, "upper-bound", t).to(self.stream.device).train()
        fit(net.parameters(), net, self.stream, t, self.cfg, on_batch)
        self.accuracies.append(accuracy(net.eval(), self.stream, t))
        self.parameters = parameter_count(net)
        return t

    def accuracy(self, task: int) -> float:
        return self.accuracies[task]

    def bytes_stored(self) -> int:
        return self.num_tasks * self.parameters * FP32


class _Heads(nn.Module):
    """A trunk (the network without its last Linear) and one Linear head per task."""

    def __init__(self, net: nn.Module, num_tasks: int):
        super().__init__()
        name, last = head_of(net)
        set_submodule(net, name, nn.Identity())
        self.trunk = net
        self.heads = nn.ModuleList(copy.deepcopy(last) for _ in range(num_tasks))
        for head in self.heads[1:]:
            head.reset_parameters()

    def forward_task(self, task: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self.heads[task](self.trunk(x))


class MultiHead:
    """A shared trunk and a head per task: trained on every task in turn (Lower Bound), or only with the first
    task and then frozen, BN statistics too (``freeze_after_first``: Separate Heads, later heads at ``head_cfg``)."""

    def __init__(self, name: str, build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int, seed: int,
                 freeze_after_first: bool = False, head_cfg: TrainConfig | None = None):
        self.name, self.stream, self.cfg, self.head_cfg = name, stream, cfg, head_cfg or cfg
        self.freeze_after_first = freeze_after_first
        self.model = _Heads(_seeded(build, seed, name), num_tasks).to(stream.device)
        self.num_tasks = 0

    def learn(self, on_batch: OnBatch | None = None) -> int:
        t, model = self.num_tasks, self.model
        if self.freeze_after_first and t > 0:
            model.trunk.eval().requires_grad_(False)  # frozen weights and BN statistics
            model.heads[t].train()
            fit(model.heads[t].parameters(), model.forward_task(t), self.stream, t, self.head_cfg, on_batch)
        else:
            model.train()
            fit(list(model.trunk.parameters()) + list(model.heads[t].parameters()), model.forward_task(t),
                self.stream, t, self.cfg, on_batch)
        model.eval()
        self.num_tasks += 1
        return t

    def accuracy(self, task: int) -> float:
        return accuracy(self.model.eval().forward_task(task), self.stream, task)

    def bytes_stored(self) -> int:
        return (parameter_count(self.model.trunk) + sum(parameter_count(h) for h in self.model.heads)) * FP32


def upper_bound(build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
                seed: int = 0) -> GGResult:
    """A fresh dense network per task, all weights trained; accuracy right after each task."""
    return learn_stream(UpperBound(build, stream, cfg, seed), num_tasks or stream.num_tasks)


def lower_bound(build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
                seed: int = 0) -> GGResult:
    """One trunk trained on every task in turn (it forgets), a head per task."""
    num_tasks = num_tasks or stream.num_tasks
    return learn_stream(MultiHead("Lower Bound", build, stream, cfg, num_tasks, seed), num_tasks)


def separate_heads(build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
                   seed: int = 0, head_lr: float = 1e-2) -> GGResult:
    """Trunk trained with task 1 then frozen; a head per task (heads of later tasks at ``head_lr``)."""
    num_tasks = num_tasks or stream.num_tasks
    return learn_stream(MultiHead("Separate Heads", build, stream, cfg, num_tasks, seed, True,
                                  replace(cfg, lr=head_lr)), num_tasks)
