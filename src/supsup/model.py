"""SupermaskModel: a converted network plus the task bookkeeping that SupSup needs."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from supsup.convert import DensityFn, convert_to_supermask
from supsup.layers import MultitaskBatchNorm, Route, Superposition, SupermaskLayer
from supsup.masks import topk_keep_many
from supsup.pertask import PerTaskTensor


class SupermaskModel(nn.Module):
    """Wraps a network converted by ``convert_to_supermask`` (``conversion`` options are passed on: ``weights``,
    ``bias``, ``norm_affine``, ``strict``, ``leave``); ``self.conversion`` is its report, also in ``repr``.

    ``forward(x, task, **kwargs)`` (``x`` ``[B, ...]``; ``kwargs`` go to the network) with ``task``:
    - ``int``: that task for the whole batch; ``list[int]`` of K ids: the batch is K stacked equal chunks;
    - ``torch.Tensor [B]`` of ids: each sample with its own task (grouped internally);
    - ``Superposition``: the α-mix of all learned masks (task inference).
    With per-sample ids, tensor ``kwargs`` whose first dimension is B (e.g. a key padding mask) are split with
    the batch; other kwargs go unchanged to every group.

    Learned tasks are frozen: no forward changes their masks or BatchNorm statistics, in train or eval
    mode. ``state_dict()`` holds everything learned (packed masks, per-task BatchNorm statistics, the
    scores of tasks in training, each layer's base-weight seed); ``load_state_dict`` into a freshly
    built model of the same architecture and seed grows its banks and restores every task.
    """

    def __init__(self, net: nn.Module, *, seed: int, rule: str = "threshold",
                 density: float | DensityFn | None = None, architecture: dict | None = None,
                 num_classes: int | None = None, **conversion):
        super().__init__()
        self.net, self.conversion = convert_to_supermask(net, seed=seed, rule=rule, density=density, **conversion)
        self.seed, self.rule = seed, rule
        self.architecture = architecture or {"name": "custom"}
        self.num_classes = num_classes
        if not self.mask_layers():
            raise ValueError("the network has no Linear, Conv, Embedding or attention layer to put supermasks on")

    def __repr__(self) -> str:
        return f"{super().__repr__()}\nconversion:\n{self.conversion.table()}"

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, then a check that every layer holds the same tasks and every
        BatchNorm their statistics (a partial state would silently mix tasks)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if not (result.missing_keys or result.unexpected_keys):
            self._check_consistent()
        return result

    def _check_consistent(self) -> None:
        layers = self.mask_layers()
        counts = {layer.num_learned for layer in layers}
        training = {tuple(layer.training_tasks) for layer in layers}
        if len(counts) > 1 or len(training) > 1:
            raise RuntimeError(f"inconsistent state: the masked layers hold {sorted(counts)} learned tasks and "
                               f"tasks in training {sorted(training)}; every layer must hold the same tasks")
        needed = max([self.num_tasks, *[t + 1 for t in self.training_tasks]])
        for name, norm in self.named_modules():
            if isinstance(norm, MultitaskBatchNorm) and norm.running_mean.shape[0] < needed:
                raise RuntimeError(f"inconsistent state: {name} has BatchNorm statistics for "
                                   f"{norm.running_mean.shape[0]} tasks, the masks for {needed}")
        for name, rows in self.named_modules():
            if isinstance(rows, PerTaskTensor) and (rows.learned.shape[0] != self.num_tasks or
                                                    rows.training_tasks != self.training_tasks):
                raise RuntimeError(f"inconsistent state: {name} holds {rows.learned.shape[0]} learned tasks and "
                                   f"tasks in training {rows.training_tasks}, the masks {self.num_tasks} and "
                                   f"{self.training_tasks}")

    # ------------------------------------------------------------------ parts
    def mask_layers(self) -> list[SupermaskLayer]:
        return [m for m in self.net.modules() if isinstance(m, SupermaskLayer)]

    def norm_layers(self) -> list[MultitaskBatchNorm]:
        return [m for m in self.net.modules() if isinstance(m, MultitaskBatchNorm)]

    def per_task_tensors(self) -> list[PerTaskTensor]:
        """The per-task float vectors (biases, norm affines) the conversion chose."""
        return [m for m in self.net.modules() if isinstance(m, PerTaskTensor)]

    @property
    def num_tasks(self) -> int:
        """Number of learned (frozen) tasks."""
        return self.mask_layers()[0].num_learned

    @property
    def training_tasks(self) -> list[int]:
        return list(self.mask_layers()[0].training_tasks)

    @property
    def output_size(self) -> int:
        last = self.mask_layers()[-1]
        return getattr(last, "out_features", None) or last.out_channels

    def bytes_per_task(self) -> int:
        """Bytes one task occupies when stored: its masks Σ_layers ⌈P_l/8⌉, plus 4 bytes for every per-task
        float (BatchNorm mean and variance, per-task biases and affines)."""
        floats = sum(2 * bn.num_features for bn in self.norm_layers()) + \
            sum(t.numel for t in self.per_task_tensors())
        return self.mask_bytes_per_task() + 4 * floats

    def mask_bytes_per_task(self) -> int:
        """Bytes of one task's masks alone: Σ_layers ⌈P_l/8⌉ (1 bit per weight)."""
        return sum(layer.bank.nbytes_per_task for layer in self.mask_layers())

    def num_weights(self) -> int:
        return sum(layer.weight.numel() for layer in self.mask_layers())

    # --------------------------------------------------------------- task life
    def begin_tasks(self, count: int = 1, init_scores: list[torch.Tensor] | None = None,
                    first: int | None = None) -> list[int]:
        """Start training ``count`` new tasks; returns their ids. Scores are seeded per (layer, task),
        so training K tasks together starts from the same scores as training them one by one.

        ``first``: id of the first task (default: the next one). Tasks past the next one can be trained (a
        rank's share of a distributed round), and frozen once the tasks before them are learned."""
        if self.training_tasks:
            raise RuntimeError(f"tasks {self.training_tasks} are still being trained: call end_tasks first")
        first = self.num_tasks if first is None else first
        if first < self.num_tasks:
            raise ValueError(f"task {first} is learned already: new tasks start at {self.num_tasks}")
        ids = list(range(first, first + count))
        for i, layer in enumerate(self.mask_layers()):
            layer.begin_tasks(ids, None if init_scores is None else init_scores[i])
        for norm in self.norm_layers():
            norm.ensure_tasks(ids[-1] + 1)
        for rows in self.per_task_tensors():
            rows.begin_tasks(ids)
        return ids

    def resume_tasks(self, task_ids: list[int], init_scores: list[torch.Tensor]) -> None:
        """Train learned tasks further from given scores (one ``[K, *shape]`` per layer); ``end_tasks``
        then overwrites their masks. Used where masks keep training (scenario NNs)."""
        if self.training_tasks:
            raise RuntimeError(f"tasks {self.training_tasks} are still being trained: call end_tasks first")
        for t in task_ids:
            self._check_task(t)
        for layer, scores in zip(self.mask_layers(), init_scores, strict=True):
            layer.begin_tasks(list(task_ids), scores)
        for rows in self.per_task_tensors():
            rows.begin_tasks(list(task_ids))

    def end_tasks(self) -> None:
        """Freeze the tasks being trained into the mask banks (1 bit per weight)."""
        for layer in self.mask_layers():
            layer.end_tasks()
        for rows in self.per_task_tensors():
            rows.end_tasks()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything an optimiser should train: the scores, then the per-task vectors of the tasks in training."""
        return self.score_parameters() + [t.trained for t in self.per_task_tensors() if t.trained is not None]

    def score_parameters(self) -> list[nn.Parameter]:
        """The trainable scores of the tasks being trained (one ``[K, *shape]`` tensor per layer)."""
        params = [layer.scores for layer in self.mask_layers() if layer.scores is not None]
        if not params:
            raise RuntimeError("no task is being trained: call begin_tasks first")
        return params

    # ----------------------------------------------------------------- forward
    @contextmanager
    def routed(self, route: Route) -> Iterator[None]:
        """Set how every masked layer and BatchNorm picks its mask for the duration of a forward.

        When the route uses tasks being trained, the top-k masks of every top-k layer are selected
        together first (one batched selection instead of one per layer)."""
        masked = self.mask_layers()
        norms = self.norm_layers()
        layers = masked + norms + self.per_task_tensors()
        for layer in layers:
            layer.route = route
        trained = set(masked[0].training_tasks)
        for norm in norms:
            norm.updating = trained  # learned tasks' statistics are frozen
        if isinstance(route, int):
            uses_training = route in trained
        else:
            uses_training = isinstance(route, list) and bool(trained & set(route))
        selecting = [m for m in masked if m.rule == "topk" and m.scores is not None] if uses_training else []
        if selecting:
            keeps = topk_keep_many([m.scores for m in selecting], [m.density for m in selecting])
            for layer, keep in zip(selecting, keeps):
                layer.training_keep = keep
        try:
            yield
        finally:
            for layer in layers:
                layer.route = None
            for layer in selecting:
                layer.training_keep = None

    def forward(self, x: torch.Tensor, task: int | list[int] | torch.Tensor | Superposition, **kwargs) -> torch.Tensor:
        if isinstance(task, torch.Tensor):
            if task.dtype == torch.bool or task.is_floating_point() or task.is_complex():
                raise TypeError(f"task ids must be integers, got a {task.dtype} tensor")
            if task.dim() == 0:
                task = int(task)
            else:
                return self._forward_per_sample_tasks(x, task, kwargs)
        elif isinstance(task, numbers.Integral) and not isinstance(task, bool):
            task = int(task)  # numpy integers too
        if isinstance(task, Superposition):
            k = self.num_tasks
            if task.alpha.shape[-1] != k:
                raise ValueError(f"alpha has {task.alpha.shape[-1]} entries, but {k} tasks are learned")
            if task.per_sample and task.alpha.shape[0] != x.shape[0]:
                raise ValueError(f"per-sample alpha has {task.alpha.shape[0]} rows for a batch of {x.shape[0]}")
        elif isinstance(task, list):
            for t in task:
                self._check_task(t)
        else:
            self._check_task(task)
        with self.routed(task):
            return self.net(x, **kwargs)

    def _check_task(self, task) -> None:
        if not isinstance(task, int) or isinstance(task, bool):
            raise TypeError(f"task must be an int, a list of ints, a tensor of ids or a Superposition; got {task!r}")
        if not (0 <= task < self.num_tasks or task in self.training_tasks):
            learned = f"0..{self.num_tasks - 1}" if self.num_tasks else "none yet"
            raise IndexError(f"task {task} is not known: learned tasks are {learned}, "
                             f"tasks in training are {self.training_tasks or 'none'}")

    def _forward_per_sample_tasks(self, x: torch.Tensor, tasks: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if tasks.shape != (x.shape[0],):
            raise ValueError(f"per-sample task ids must have shape [{x.shape[0]}], got {tuple(tasks.shape)}")
        if x.shape[0] == 0:  # no ids to route by: an empty output of the right shape, from any known task
            known = self.training_tasks or list(range(self.num_tasks))
            if not known:
                raise IndexError("no task is learned or being trained")
            return self.forward(x, known[0], **kwargs)
        out = None
        for t in tasks.unique().tolist():
            idx = (tasks == t).nonzero().squeeze(1)
            part = {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0] else v
                    for k, v in kwargs.items()}
            y = self.forward(x[idx], int(t), **part)
            if out is None:
                out = y.new_empty(x.shape[0], *y.shape[1:])
            out[idx] = y
        return out
