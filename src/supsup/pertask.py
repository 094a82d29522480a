"""Small float tensors kept per task (a bias vector, a norm's affine): one row per learned task.

``PerTaskTensor`` follows the owning model's route like a supermask layer: a task id uses that task's row,
K stacked ids each chunk's own row, a ``Superposition`` the α-mix of the learned rows (per sample for
per-sample α). The rows of the tasks in training are a trainable ``nn.Parameter`` ``[K, *shape]``; learned
rows ``[T, *shape]`` are a buffer, never trained. Both are in ``state_dict()``.
"""

from __future__ import annotations

import torch
from torch import nn

from supsup.layers import Route, Superposition


class PerTaskTensor(nn.Module):
    """A float tensor of ``shape`` per task; new tasks start from ``init`` (``[*shape]``, not stored)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.shape = tuple(init.shape)
        self.register_buffer("init", init.detach().clone().float(), persistent=False)
        self.register_buffer("learned", torch.zeros(0, *self.shape))
        self.register_buffer("training_ids", torch.zeros(0, dtype=torch.int64))
        self.training_tasks: list[int] = []  # training_ids as a list: read per forward without a device sync
        self.trained: nn.Parameter | None = None
        self.route: Route = None

    def extra_repr(self) -> str:
        return f"shape={self.shape}, tasks={self.learned.shape[0]}"

    @property
    def numel(self) -> int:
        return self.init.numel()

    # ------------------------------------------------------------- task life
    def begin_tasks(self, task_ids: list[int]) -> None:
        """Trainable rows ``[K, *shape]`` for ``task_ids``: a learned task's own row, a new one from ``init``."""
        rows = [self.learned[t] if t < self.learned.shape[0] else self.init for t in task_ids]
        self.trained = nn.Parameter(torch.stack(rows).clone())
        self.training_ids = torch.tensor(task_ids, dtype=torch.int64, device=self.learned.device)
        self.training_tasks = list(task_ids)

    @torch.no_grad()
    def end_tasks(self) -> None:
        """Freeze the trained rows into ``learned`` (replacing a retrained task's row)."""
        if self.trained is None:
            return
        for task, row in zip(self.training_tasks, self.trained.detach()):
            if task < self.learned.shape[0]:
                self.learned[task] = row
            elif task == self.learned.shape[0]:
                self.learned = torch.cat([self.learned, row.unsqueeze(0)])
            else:
                raise RuntimeError(f"task {task} cannot be added after {self.learned.shape[0]} learned tasks")
        self.trained = None
        self.training_ids = self.training_ids.new_zeros(0)
        self.training_tasks = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Grow ``learned`` to the saved rows and adopt the saved tasks in training."""
        learned, trained = state_dict.get(prefix + "learned"), state_dict.get(prefix + "trained")
        ids = state_dict.get(prefix + "training_ids")
        if isinstance(learned, torch.Tensor) and tuple(learned.shape[1:]) == self.shape:
            self.learned = torch.zeros(learned.shape, device=self.learned.device)
        if isinstance(ids, torch.Tensor):
            self.training_ids = self.training_ids.new_zeros(ids.shape)
        self.trained = None if trained is None else nn.Parameter(torch.empty(trained.shape, device=self.init.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.training_tasks = self.training_ids.tolist()

    # ---------------------------------------------------------------- values
    def _row(self, task: int) -> torch.Tensor:
        ids = self.training_tasks
        if task in ids:
            return self.trained[ids.index(task)]
        if not 0 <= task < self.learned.shape[0]:
            raise IndexError(f"per-task tensor has rows for tasks 0..{self.learned.shape[0] - 1} and training "
                             f"tasks {ids}, not {task}")
        return self.learned[task]

    def value(self, batch: int) -> tuple[torch.Tensor, bool]:
        """This route's value and whether it is per sample: ``[*shape]``, or ``[batch, *shape]``."""
        route = self.route
        if isinstance(route, Superposition):
            k = route.alpha.shape[-1]
            if k > self.learned.shape[0]:
                raise IndexError(f"per-task tensor has {self.learned.shape[0]} learned rows, alpha mixes {k}")
            mixed = (route.alpha.to(self.learned.dtype) @ self.learned[:k].flatten(1))
            return mixed.view(*route.alpha.shape[:-1], *self.shape), route.per_sample
        if isinstance(route, list):
            if batch % len(route):
                raise ValueError(f"batch of {batch} cannot be split into {len(route)} equal task chunks")
            rows = torch.stack([self._row(t) for t in route])
            return rows.repeat_interleave(batch // len(route), 0), True
        if route is None:
            raise RuntimeError("per-task tensor used without a task: call it through SupermaskModel.forward")
        return self._row(route), False

    def broadcast_to(self, y: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """This route's value shaped to broadcast against ``y`` ``[B, ...]``: on dims 1.. of ``y`` (channels
        first, ``[B, C, *spatial]``) or on its trailing dims (``[B, *, C]``)."""
        v, per_sample = self.value(y.shape[0])
        v = v.to(y.dtype)
        lead, ones = (y.shape[0] if per_sample else 1,), [1] * (y.dim() - 1 - len(self.shape))
        return v.view(*lead, *self.shape, *ones) if channels_first else v.view(*lead, *ones, *self.shape)
