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
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from supsup.baselines.common import accuracy, fit, head_of, parameter_count, set_submodule
from supsup.data.streams import TaskStream
from supsup.gg import GGResult
from supsup.learners import TrainConfig
from supsup.seeding import derive_seed

FP32 = 4
Builder = Callable[[], nn.Module]


def _seeded(build: Builder, seed: int, *what) -> nn.Module:
    torch.manual_seed(derive_seed(seed, *what))
    return build()


def upper_bound(build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
                seed: int = 0) -> GGResult:
    """A fresh dense network per task, all weights trained; accuracy right after each task."""
    num_tasks = num_tasks or stream.num_tasks
    result, start = GGResult("Upper Bound"), time.perf_counter()
    for t in range(num_tasks):
        net = _seeded(build, seed, "upper-bound", t).to(stream.device).train()
        fit(net.parameters(), net, stream, t, cfg)
        net.eval()
        result.after_task.append(accuracy(net, stream, t))
        result.bytes_stored += parameter_count(net) * FP32
    result.at_end = list(result.after_task)  # each task keeps its own network
    result.seconds = time.perf_counter() - start
    return result


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


def _multi_head(method: str, build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None,
                seed: int, freeze_after_first: bool, head_cfg: TrainConfig | None) -> GGResult:
    num_tasks = num_tasks or stream.num_tasks
    model = _Heads(_seeded(build, seed, method), num_tasks).to(stream.device)
    result, start = GGResult(method), time.perf_counter()
    for t in range(num_tasks):
        if freeze_after_first and t > 0:
            model.trunk.eval().requires_grad_(False)  # frozen weights and BN statistics
            model.heads[t].train()
            fit(model.heads[t].parameters(), model.forward_task(t), stream, t, head_cfg or cfg)
        else:
            model.train()
            fit(list(model.trunk.parameters()) + list(model.heads[t].parameters()), model.forward_task(t), stream,
                t, cfg)
        model.eval()
        result.after_task.append(accuracy(model.forward_task(t), stream, t))
    result.at_end = [accuracy(model.forward_task(t), stream, t) for t in range(num_tasks)]
    result.bytes_stored = (parameter_count(model.trunk) + sum(parameter_count(h) for h in model.heads)) * FP32
    result.seconds = time.perf_counter() - start
    return result


def lower_bound(build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
                seed: int = 0) -> GGResult:
    """One trunk trained on every task in turn (it forgets), a head per task."""
    return _multi_head("Lower Bound", build, stream, cfg, num_tasks, seed, False, None)


def separate_heads(build: Builder, stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
                   seed: int = 0, head_lr: float = 1e-2) -> GGResult:
    """Trunk trained with task 1 then frozen; a head per task (heads of later tasks at ``head_lr``)."""
    return _multi_head("Separate Heads", build, stream, cfg, num_tasks, seed, True, replace(cfg, lr=head_lr))
