"""SupSup as an Avalanche strategy, built the way Avalanche builds PackNet: a model that takes task labels
(``SupSupModel``, a ``MultiTaskModule``), a plugin that freezes each experience's mask (``SupSupPlugin``),
and a ``SupervisedTemplate`` with both (``SupSup``).

One supermask per training experience. Before each training experience Avalanche calls the model's
``adaptation``, which begins the experience's mask, and then the strategy's ``make_optimizer``, which
builds the optimiser over that mask's scores; after the experience the plugin freezes the mask. Task
labels choose the mask when the benchmark gives them (every experience its own label); otherwise each
sample's mask is inferred (``infer_tasks`` at sample granularity).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation import GenericPluginMetric
    from avalanche.evaluation.metrics import Accuracy
    from avalanche.models import MultiTaskModule
    from avalanche.training.plugins.evaluation import default_evaluator
    from avalanche.training.templates import SupervisedTemplate
except ImportError as err:  # pragma: no cover - exercised only where avalanche-lib is missing
    from supsup.integrations import missing_extra

    raise missing_extra("avalanche-lib", "avalanche", err) from err

from supsup.data.streams import TaskStream
from supsup.inference import Inference, infer_tasks
from supsup.learners import TrainConfig, make_optimizer
from supsup.model import SupermaskModel

NO_LABEL = -1  # in ``mask_origins``: the experience had several task labels, or none


class SupSupModel(MultiTaskModule):
    """A ``SupermaskModel`` behind Avalanche's multi-task interface: ``forward(x, task_labels)`` with
    ``task_labels`` ``[B]`` (or an int, or None) -> logits ``[B, output_size]``.

    Every mask remembers the experience it learned and that experience's task label: ``mask_origins``
    ``[T, 2]`` int64 (experience, label), kept in ``state_dict`` beside the masks. ``route_by_labels``:
    ``True`` routes by label (each experience must bring one new label), ``False`` always infers,
    ``None`` routes by label while every mask has a label of its own and infers once a label repeats
    (benchmarks without task labels give every experience label 0)."""

    def __init__(self, model: SupermaskModel, *, route_by_labels: bool | None = None,
                 inference: Inference = Inference(granularity="sample")):
        super().__init__()
        if not isinstance(model, SupermaskModel):
            raise TypeError(f"SupSupModel wraps a SupermaskModel, got {type(model).__name__}")
        self.supermasks = model
        self.route_by_labels = route_by_labels
        self.inference = inference
        self.register_buffer("mask_origins", torch.zeros(0, 2, dtype=torch.int64))
        self.last_tasks: torch.Tensor | None = None  # [B]: the mask each sample of the last forward used

    @property
    def routes_by_labels(self) -> bool:
        if self.route_by_labels is not None:
            return self.route_by_labels
        labels = self.mask_origins[:, 1].tolist()
        return NO_LABEL not in labels and len(set(labels)) == len(labels)

    def experience_mask(self, experience: int) -> int | None:
        """The mask learned on training experience ``experience`` (the latest, if trained twice), or None."""
        rows = (self.mask_origins[:, 0] == experience).nonzero().flatten().tolist()
        return rows[-1] if rows else None

    def adaptation(self, experience) -> None:
        """Before a training experience (Avalanche builds the optimiser after this): begin its mask."""
        super().adaptation(experience)
        if not self.training:
            return
        labels = sorted(set(getattr(experience, "task_labels", [])))
        label = labels[0] if len(labels) == 1 else NO_LABEL
        if self.route_by_labels and (label == NO_LABEL or label in self.mask_origins[:, 1].tolist()):
            raise ValueError(f"experience {experience.current_experience} has task labels {labels}: routing by "
                             f"label needs one new label per experience (labels with masks: "
                             f"{self.mask_origins[:, 1].tolist()}); use route_by_labels=None to infer masks")
        self.supermasks.begin_tasks(1)
        origin = torch.tensor([[experience.current_experience, label]], device=self.mask_origins.device)
        self.mask_origins = torch.cat([self.mask_origins, origin])

    def route(self, x: torch.Tensor, task_labels=None) -> torch.Tensor | None:
        """Mask ids ``[B]``: the label's mask where labels route and it has one; otherwise the mask in
        training (train mode, or no mask learned yet) or the inferred one. None when no mask exists."""
        model = self.supermasks
        tasks = torch.full((x.shape[0],), NO_LABEL, dtype=torch.int64, device=x.device)
        if task_labels is not None and self.routes_by_labels:
            labels = torch.as_tensor(task_labels, device=x.device).expand(x.shape[0])
            for task, label in enumerate(self.mask_origins[:, 1].tolist()):
                tasks[labels == label] = task
        open_ = tasks == NO_LABEL
        if not bool(open_.any()):
            return tasks
        if model.training_tasks and (self.training or model.num_tasks == 0):
            tasks[open_] = model.training_tasks[0]
        elif model.num_tasks:
            tasks[open_] = infer_tasks(model, x[open_], self.inference)
        else:
            return None
        return tasks

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        tasks = self.route(x, task_labels)
        self.last_tasks = tasks
        if tasks is None:  # no mask at all (Avalanche's evaluation before the first experience): chance
            return torch.zeros(x.shape[0], self.supermasks.output_size, device=x.device)
        if x.shape[0] and bool((tasks == tasks[0]).all()):
            return self.supermasks(x, int(tasks[0]))  # one mask for the batch: no regrouping
        return self.supermasks(x, tasks)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "mask_origins")
        if isinstance(saved, torch.Tensor) and saved.dim() == 2:
            self.mask_origins = self.mask_origins.new_zeros(saved.shape)  # grow to the saved masks
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        masks = self.supermasks.num_tasks + len(self.supermasks.training_tasks)
        if self.mask_origins.shape[0] != masks:
            raise RuntimeError(f"inconsistent state: mask_origins describes {self.mask_origins.shape[0]} masks, "
                               f"the model holds {masks}")
        return result


def _supsup_model(strategy) -> SupSupModel:
    if not isinstance(strategy.model, SupSupModel):
        raise ValueError(f"SupSupPlugin needs a SupSupModel as the strategy's model, got "
                         f"{type(strategy.model).__name__}")
    return strategy.model


class SupSupPlugin(SupervisedPlugin):
    """Freezes each experience's mask after training on it (1 bit per weight; its scores are dropped).

    It runs before the evaluator and Avalanche's periodic evaluation, so the evaluation at the end of an
    experience sees the frozen mask."""

    def before_training_exp(self, strategy, *args, **kwargs):
        if not _supsup_model(strategy).supermasks.training_tasks:
            raise RuntimeError("no mask was begun for this experience: the strategy must call the model's "
                               "adaptation before training (SupervisedTemplate does)")

    def after_training_exp(self, strategy, *args, **kwargs):
        _supsup_model(strategy).supermasks.end_tasks()


class SupSup(SupervisedTemplate):
    """Supermasks in Superposition (Wortsman et al., 2020): a frozen random network learns one binary
    mask per experience; nothing is forgotten. Task labels route samples to masks when the benchmark
    gives them; otherwise each sample's mask is inferred.

    The optimiser is rebuilt for every experience over that experience's scores (``optimizer``: one of
    ``rmsprop``, ``adam``, ``sgd``, with ``lr``, ``weight_decay`` and, for SGD, ``momentum``; ``fused_step=False``
    for torch's RMSprop, e.g. for a plugin that clips the scores' gradients, which the fused step leaves as
    dL/d(W ⊙ M)); the other arguments are ``SupervisedTemplate``'s."""

    def __init__(self, *, model: SupSupModel, optimizer: str = "rmsprop", lr: float = 1e-4,
                 weight_decay: float = 0.0, momentum: float = 0.9, fused_step: bool = True, criterion=None,
                 train_mb_size: int = 128,
                 train_epochs: int = 1, eval_mb_size: int | None = None, device: str | torch.device = "cpu",
                 plugins=None, evaluator=default_evaluator, eval_every: int = -1, **base_kwargs):
        if not isinstance(model, SupSupModel):
            raise TypeError(f"SupSup needs a SupSupModel, got {type(model).__name__}: "
                            f"wrap your SupermaskModel as SupSupModel(model)")
        self.train_config = TrainConfig(optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                        batch_size=train_mb_size, fused_step=fused_step)
        super().__init__(model=model, optimizer=None, criterion=criterion or nn.CrossEntropyLoss(),
                         train_mb_size=train_mb_size, train_epochs=train_epochs, eval_mb_size=eval_mb_size,
                         device=device, plugins=[*(plugins or []), SupSupPlugin()], evaluator=evaluator,
                         eval_every=eval_every, **base_kwargs)

    def make_optimizer(self, **kwargs):
        """A fresh optimiser over the scores of the experience's mask. Avalanche calls this before and
        after the model's adaptation; only the second call finds a mask in training."""
        if self.model.supermasks.training_tasks:
            self.optimizer = make_optimizer(self.model.supermasks, self.train_config)

    def _after_training_exp(self, **kwargs):
        """After every plugin saw the experience end: drop the optimiser, whose scores the frozen mask
        replaced. This frees their state, and lets Avalanche's ``save_checkpoint`` work between experiences:
        it pickles with dill, and dill 0.4 cannot pickle torch 2.14's optimisers (it looks for their class
        in ``torch.optim.sgd`` and the like, names that ``torch.optim`` deletes)."""
        super()._after_training_exp(**kwargs)
        self.optimizer = None


class TaskInferenceAccuracy(GenericPluginMetric):
    """Evaluation metric: the fraction of samples that used the mask learned on their own experience
    (``TaskInference_Exp`` per experience, ``TaskInference_Stream`` over the stream). Test experience i
    is taken to hold the data of training experience i; experiences without a mask yet emit nothing."""

    def __init__(self, emit_at: str = "experience"):
        super().__init__(Accuracy(), reset_at=emit_at, emit_at=emit_at, mode="eval")
        self._samples = 0

    def reset(self) -> None:
        super().reset()
        self._samples = 0

    def update(self, strategy) -> None:
        model = _supsup_model(strategy)
        mask = model.experience_mask(strategy.experience.current_experience)
        if mask is not None and model.last_tasks is not None:
            self._metric.update(model.last_tasks, torch.full_like(model.last_tasks, mask))
            self._samples += model.last_tasks.numel()

    def _package_result(self, strategy):
        return super()._package_result(strategy) if self._samples else None

    def __str__(self) -> str:
        return "TaskInference_Exp" if self._emit_at == "experience" else "TaskInference_Stream"


def task_inference_metrics(*, experience: bool = True, stream: bool = True) -> list[TaskInferenceAccuracy]:
    """Task-inference accuracy per experience and/or over the stream, for an ``EvaluationPlugin``."""
    return [TaskInferenceAccuracy(at) for at, wanted in (("experience", experience), ("stream", stream)) if wanted]


def stream_benchmark(stream: TaskStream, *, task_labels: bool = True, batches: TrainConfig | None = None,
                     test_samples: int | None = None):
    """An Avalanche benchmark of a supsup task stream: experience t = task t (train and test tensors).

    ``task_labels``: experience t has task label t (else every experience has label 0, as in benchmarks
    without task labels). ``batches``: each experience's training set is the ``batches_per_task`` batches
    of ``batch_size`` that ``train_task_group`` draws, in its order (train with ``shuffle=False`` to
    replay exactly the runner's batches); None: the whole training split. ``test_samples``: the first N
    test samples of each task (None: all)."""
    train, test = [], []
    for t in range(stream.num_tasks):
        if batches is None:
            x, y = stream.batch(t, "train", torch.arange(stream.size(t, "train"), device=stream.device))
        else:
            pairs = list(stream.train_batches(t, batches.batch_size, batches.batches_per_task))
            x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        train.append([x, y])
        n = stream.size(t, "test") if test_samples is None else min(test_samples, stream.size(t, "test"))
        test.append(list(stream.batch(t, "test", torch.arange(n, device=stream.device))))
    labels = list(range(stream.num_tasks)) if task_labels else [0] * stream.num_tasks
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=labels)
