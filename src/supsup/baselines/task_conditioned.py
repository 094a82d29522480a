"""BatchE and PSP: one shared weight per layer, conditioned on the task by a small per-task factor.

- **BatchE** (Wen et al.; "Rand W" as in the paper's SplitCIFAR100 runs): W random and frozen, per task a
  rank-one pair ``s_t`` (c_out) and ``r_t`` (c_in), init random ±1: ``out = s_t ⊙ layer(W, r_t ⊙ x)``.
  Stores the per-task pairs (W is a seed).
- **PSP** (Cheung et al.): W shared and trained on every task; per task a fixed random orthogonal context
  ``C_t`` (c_in × c_in, from a seed) mixes the input channels: ``out = layer(W, C_t x) = layer(W C_t, x)``.
  Stores W (the contexts are seeds).
Both keep per-task non-affine BN statistics (as SupSup does) so that BN does not mix tasks.

**ABatchE** (paper Fig. 5 right): BatchE without the task id. ``TaskConditioned.forward(x, Superposition(α))``
mixes the ensemble members' outputs in every layer, ``Σ_i α_i s_i ⊙ layer(W, r_i ⊙ x)``, so SupSup's task
inference (``inference.infer_tasks``: One-Shot, Binary, ... on ∂objective/∂α) picks a member the way it picks a
mask. Networks without BatchNorm only (the paper's FC 1024-1024).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from supsup.baselines.common import accuracy, fit, learn_stream, per_task_batchnorm, replace_layers, set_task
from supsup.data.streams import TaskStream
from supsup.gg import GGResult
from supsup.layers import MultitaskBatchNorm, Superposition
from supsup.learners import TrainConfig
from supsup.seeding import derive_seed, generator

FP32 = 4


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight)


def _channels(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-channel vector ``[C]`` over ``x [B, C, ...]``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class BatchELayer(nn.Module):
    """Frozen ``layer.weight`` with per-task rank-one factors ``s[t] [c_out]``, ``r[t] [c_in]`` (one parameter
    per task, so weight decay on task t's optimiser never touches another task's factors)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, num_tasks: int, seed: int):
        super().__init__()
        if getattr(layer, "groups", 1) != 1:
            raise ValueError("BatchE here supports ungrouped layers only")
        self.layer = layer.requires_grad_(False)
        c_out, c_in = layer.weight.shape[:2]
        g = generator(seed, "batche-init")
        sign = lambda n: torch.randint(0, 2, (n,), generator=g).float() * 2 - 1  # noqa: E731
        self.s = nn.ParameterList(nn.Parameter(sign(c_out)) for _ in range(num_tasks))
        self.r = nn.ParameterList(nn.Parameter(sign(c_in)) for _ in range(num_tasks))
        self.task: int | Superposition = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.task, Superposition):
            return self._superposed(x, self.task.alpha)
        y = _apply(self.layer, x * _channels(x, self.r[self.task]), self.layer.weight)
        return y * _channels(y, self.s[self.task])

    def _superposed(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Σ_i α_i s_i ⊙ layer(W, r_i ⊙ x) over the first k members, ``alpha [k]`` or ``[B, k]``."""
        b, k = x.shape[0], alpha.shape[-1]
        r, s = torch.stack(list(self.r[:k])), torch.stack(list(self.s[:k]))  # [k, c_in], [k, c_out]
        spatial = [1] * (x.dim() - 2)
        xs = x.unsqueeze(1) * r.view(1, k, -1, *spatial)  # [B, k, c_in, ...]
        y = _apply(self.layer, xs.flatten(0, 1), self.layer.weight).unflatten(0, (b, k))  # [B, k, c_out, ...]
        weights = alpha.expand(b, k) if alpha.dim() == 1 else alpha
        return (y * s.view(1, k, -1, *spatial) * weights.view(b, k, 1, *spatial)).sum(1)

    def task_parameters(self) -> int:
        return self.s[0].numel() + self.r[0].numel()


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``[n, n]`` matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class PSPLayer(nn.Module):
    """Trained ``layer.weight`` seen through a per-task orthogonal input-channel context ``C_t``."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, seed: int):
        super().__init__()
        if getattr(layer, "groups", 1) != 1:
            raise ValueError("PSP here supports ungrouped layers only")
        self.layer, self.seed, self.task = layer, seed, 0
        self._context: tuple[int, torch.Tensor] | None = None

    def context(self, task: int) -> torch.Tensor:
        """``C_t [c_in, c_in]``, regenerated from (seed, task) and cached for the current task only."""
        if self._context is None or self._context[0] != task:
            c_in = self.layer.weight.shape[1]
            self._context = (task, random_orthogonal(c_in, generator(self.seed, "psp", task)).to(self.layer.weight))
        return self._context[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, context = self.layer.weight, self.context(self.task)
        if isinstance(self.layer, nn.Linear):  # W (C_t x): B·c_in² work instead of c_out·c_in² for W C_t
            return _apply(self.layer, torch.nn.functional.linear(x, context), w)
        return _apply(self.layer, x, torch.einsum("oi...,ij->oj...", w, context))  # W C_t


class TaskConditioned(nn.Module):
    """BatchE or PSP over a network: ``learn()`` trains the next task, ``forward(x, task)`` takes a task id, a
    tensor of per-sample ids or (BatchE) a ``Superposition`` of the members learned so far (ABatchE)."""

    def __init__(self, method: str, build: Callable[[], nn.Module], stream: TaskStream, cfg: TrainConfig,
                 num_tasks: int, seed: int):
        super().__init__()
        if method not in ("BatchE", "PSP"):
            raise ValueError(f"method must be BatchE or PSP, got {method!r}")
        self.name, self.stream, self.cfg = method, stream, cfg
        torch.manual_seed(derive_seed(seed, method))
        net = per_task_batchnorm(build(), num_tasks)
        self.layers: list[BatchELayer | PSPLayer] = []

        def wrap(name, module):
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                layer_seed = derive_seed(seed, method, name)
                new = BatchELayer(module, num_tasks, layer_seed) if method == "BatchE" else PSPLayer(module, layer_seed)
                self.layers.append(new)
                return new
            return None

        self.net = replace_layers(net, wrap).to(stream.device)
        self.num_tasks, self.num_classes = 0, stream.num_classes

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | Superposition) -> torch.Tensor:
        if isinstance(task, torch.Tensor) and task.dim() == 1:  # per-sample ids: one forward per task
            out = None
            for t in task.unique().tolist():
                idx = (task == t).nonzero().squeeze(1)
                y = self.forward(x[idx], int(t))
                out = y.new_empty(x.shape[0], *y.shape[1:]) if out is None else out
                out[idx] = y
            return out
        if isinstance(task, Superposition):
            if self.name != "BatchE" or any(isinstance(m, MultitaskBatchNorm) for m in self.net.modules()):
                raise ValueError("superposed members (ABatchE) need BatchE on a network without BatchNorm")
            for layer in self.layers:
                layer.task = task
            return self.net(x)
        set_task(self.net, int(task))
        return self.net(x)

    def learn(self, on_batch=None) -> int:
        t = self.num_tasks
        set_task(self.net, t)
        self.net.train()
        params = ([p for layer in self.layers for p in (layer.s[t], layer.r[t])] if self.name == "BatchE"
                  else list(self.net.parameters()))
        fit(params, self.net, self.stream, t, self.cfg, on_batch)
        self.net.eval()
        self.num_tasks += 1
        return t

    def accuracy(self, task: int) -> float:
        self.net.eval()
        set_task(self.net, task)
        return accuracy(self.net, self.stream, task)

    def bytes_stored(self) -> int:
        """BatchE: the learned tasks' rank-one pairs (W is a seed); PSP: W (the contexts are seeds). fp32."""
        if self.name == "BatchE":
            return self.num_tasks * sum(layer.task_parameters() for layer in self.layers) * FP32
        return sum(layer.layer.weight.numel() for layer in self.layers) * FP32


def batche(build: Callable[[], nn.Module], stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
           seed: int = 0) -> GGResult:
    """BatchE with a random frozen W: per-task rank-one factors trained (paper: Adam lr 0.1)."""
    num_tasks = num_tasks or stream.num_tasks
    return learn_stream(TaskConditioned("BatchE", build, stream, cfg, num_tasks, seed), num_tasks)


def psp(build: Callable[[], nn.Module], stream: TaskStream, cfg: TrainConfig, num_tasks: int | None = None,
        seed: int = 0) -> GGResult:
    """PSP: shared W trained on every task through per-task random orthogonal contexts (paper: RMSprop 1e-4)."""
    num_tasks = num_tasks or stream.num_tasks
    return learn_stream(TaskConditioned("PSP", build, stream, cfg, num_tasks, seed), num_tasks)
