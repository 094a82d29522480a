"""Scenario NNs: learning with no task identity, neither in training nor at inference (paper §3.4).

The learner sees one stream of ``(x, y)`` batches, with no task ids and no task boundaries. Every
``check_every`` batches it superposes its masks, computes ν = softmax(−∂H/∂α) on the current training
batch (α uniform over n slots) and either

- allocates a new mask, when n · max ν < 1 + ε (no mask explains the batch better than the others), or
- trains the mask argmax ν for the next ``check_every`` batches.

Choices (the paper leaves them open; the reference code decides them the same way unless noted):

- **Untrained slots.** With a single learned mask ν = [1] and the rule would always allocate. So the
  superposition covers n = max(k, ``min_slots``) slots (5 by default): slots past the k allocated masks
  hold the untrained, seeded masks that would be allocated next. They compete in the check, and a
  confident ν whose argmax is an untrained slot counts as "new data" (the reference would silently
  train that slot without counting it; here it is allocated and counted).
- **Masks keep training.** The learner keeps each mask's float scores and its own optimiser state
  (RMSprop is elementwise, so this equals one optimiser over all scores, minus the reference's reset
  at every hidden-task boundary, which the learner cannot see). The model's banks hold the current
  binary masks (``resume_tasks``/``end_tasks`` → ``bank.replace``), so every check superposes the
  latest masks.
- **Budget.** At most ``budget`` masks. When a new mask is wanted and none is left, ``when_full``
  decides: ``"reuse"`` trains the most likely allocated mask (logged as ``"full"``), ``"stop"`` stops
  training (the reference; the paper's "final dip").

The decision log (batch, decision, mask, confidence = n · max ν) is kept in ``NNsResult`` and saves as JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from supsup.data.streams import TaskStream
from supsup.evaluation import predict
from supsup.inference import OBJECTIVES, Inference, alpha_gradient, infer_tasks
from supsup.learners import TrainConfig, make_optimizer
from supsup.model import SupermaskModel
from supsup.seeding import generator

WHEN_FULL = ("reuse", "stop")
DECISIONS = ("first", "new", "reuse", "full", "stop")


@dataclass
class NNsConfig:
    """Knobs of task-free training (the ``[nns]`` section of a run config). Defaults: the paper's PermutedMNIST
    NNs run (§3.4, §2.12). The optimiser comes from the run's ``[train]`` settings, the objective from its
    ``[inference]`` ones.

    ``train_seconds`` / ``eval_seconds`` time-box a run (the driver's budget, ``supsup run`` only): the stream
    ends at the first hidden-task boundary after ``train_seconds`` of training, and the evaluation covers an
    evenly spaced subset of the streamed tasks that fits ``eval_seconds`` (see ``evaluate_nns_within``)."""

    check_every: int = 100  # batches between two checks
    epsilon: float = 2.0 ** -3  # allocate when n · max ν < 1 + ε
    min_slots: int = 5  # n = max(k, min_slots): untrained masks in the superposition early on
    budget: int = 2500  # most masks ever allocated
    when_full: str = "reuse"  # "reuse" the best mask, or "stop" training (reference)
    train_seconds: float | None = None
    eval_seconds: float | None = None

    def __post_init__(self):
        if self.when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {self.when_full!r}")
        for name in ("check_every", "min_slots", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        for name in ("train_seconds", "eval_seconds"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")


@dataclass
class Decision:
    """One entry of the decision log. ``confidence`` = n · max ν (1: no preference, n: certain; None
    for the first batch, which takes mask 0 unchecked); ``best`` = argmax ν over the n slots;
    ``mask`` = the mask trained next (-1 after a stop)."""

    batch: int
    decision: str
    mask: int
    confidence: float | None
    slots: int
    best: int

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise ValueError(f"unknown decision {self.decision!r}; expected one of {DECISIONS}")


@dataclass
class NNsResult:
    """What a task-free run produced: masks allocated, batches trained, the decision log."""

    num_masks: int
    batches: int
    stopped: bool
    decisions: list[Decision] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> NNsResult:
        raw = json.loads(text)
        raw["decisions"] = [Decision(**d) for d in raw["decisions"]]
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> NNsResult:
        return cls.from_json(Path(path).read_text())


def decide(grad: torch.Tensor, num_masks: int, epsilon: float) -> tuple[bool, int, float]:
    """The allocation rule on ``grad = ∂H/∂α [n]`` (n slots, the first ``num_masks`` allocated).

    Returns ``(new, best, confidence)``: ν = softmax(−grad), confidence = n · max ν, best = argmax ν;
    ``new`` when confidence < 1 + ε or when the best slot is an untrained one."""
    nu = torch.softmax(-grad.double(), dim=0)
    best = int(nu.argmax())
    confidence = float(grad.numel() * nu[best])
    return confidence < 1.0 + epsilon or best >= num_masks, best, confidence


class NNsLearner:
    """Task-free learner over a ``SupermaskModel`` with no learned task. Feed batches with ``step``;
    ``finish`` freezes the masks and returns the ``NNsResult``.

    State: ``scores[j]`` = float scores of mask/slot j (one tensor per masked layer) and its optimiser
    state. The model's banks hold max(k, min_slots) rows while training, k rows after ``finish``."""

    def __init__(self, model: SupermaskModel, cfg: NNsConfig = NNsConfig(), train: TrainConfig = TrainConfig(),
                 objective: str = "entropy"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        if model.num_tasks or model.training_tasks:
            raise ValueError(f"NNs starts from an empty model; this one has {model.num_tasks} learned tasks")
        self.model, self.cfg, self.train_cfg, self.objective = model, cfg, train, objective
        self.scores: list[list[torch.Tensor]] = []
        self.optimizer_states: list[dict | None] = []
        self.num_masks = 0
        self.batches = 0
        self.stopped = False
        self.decisions: list[Decision] = []
        self.current: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._add_slots(cfg.min_slots)

    # ------------------------------------------------------------- slots
    def _add_slots(self, count: int) -> None:
        """Seed ``count`` untrained slots: their initial scores, and their masks in the banks."""
        first = self.model.num_tasks
        self.model.begin_tasks(count)
        layers = self.model.mask_layers()
        for j in range(count):
            self.scores.append([layer.scores[j].detach().clone() for layer in layers])
            self.optimizer_states.append(None)
        self.model.end_tasks()
        assert self.model.num_tasks == first + count

    def _train(self, mask: int) -> None:
        """Make ``mask`` the one being trained (its scores and optimiser state)."""
        self.model.resume_tasks([mask], [s.unsqueeze(0) for s in self.scores[mask]])
        self.optimizer = make_optimizer(self.model.score_parameters(), self.train_cfg)
        if self.optimizer_states[mask] is not None:
            self.optimizer.load_state_dict(self.optimizer_states[mask])
        self.current = mask

    def _freeze(self) -> None:
        """Keep the trained mask's scores and optimiser state; write its binary mask into the banks."""
        if self.current is None:
            return
        self.scores[self.current] = [p.detach()[0].clone() for p in self.model.score_parameters()]
        self.optimizer_states[self.current] = self.optimizer.state_dict()
        self.model.end_tasks()
        self.current, self.optimizer = None, None

    def _allocate(self) -> int:
        if self.num_masks == self.model.num_tasks:
            self._add_slots(1)
        self.num_masks += 1
        return self.num_masks - 1

    # -------------------------------------------------------------- check
    @torch.no_grad()
    def check(self, x: torch.Tensor) -> Decision:
        """Decide which mask trains on the coming batches, from the batch ``x``."""
        self._freeze()
        n = self.model.num_tasks
        alpha = torch.full((n,), 1.0 / n, device=x.device)
        grad = alpha_gradient(self.model, x, alpha, self.objective, uniform=True)
        new, best, confidence = decide(grad, self.num_masks, self.cfg.epsilon)
        if not new:
            kind, mask = "reuse", best
        elif self.num_masks < self.cfg.budget:
            kind, mask = "new", self._allocate()
        elif self.cfg.when_full == "stop":
            kind, mask = "stop", -1
        else:
            kind, mask = "full", int(grad[: self.num_masks].argmin())
        return Decision(self.batches, kind, mask, confidence, n, best)

    # --------------------------------------------------------------- train
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One training batch (checking first when due); returns its loss (0-dim, detached), or None once
        stopped."""
        if self.stopped:
            return None
        decision = None
        if self.batches == 0:
            decision = Decision(0, "first", self._allocate(), None, self.model.num_tasks, 0)
        elif self.batches % self.cfg.check_every == 0:
            decision = self.check(x)
        if decision is not None:
            self.decisions.append(decision)
            if decision.decision == "stop":
                self.stopped = True
                return None
            self._freeze()
            self._train(decision.mask)
        self.model.train()
        loss = F.cross_entropy(self.model(x, self.current), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.batches += 1
        return loss.detach()

    def finish(self) -> NNsResult:
        """Freeze the mask in training and drop the untrained slots from the banks (k rows remain)."""
        self._freeze()
        if self.model.num_tasks > self.num_masks:
            for layer in self.model.mask_layers():
                layer.bank.load_packed(layer.bank.packed[: self.num_masks].clone())
            del self.scores[self.num_masks:], self.optimizer_states[self.num_masks:]
        self.model.eval()
        return NNsResult(self.num_masks, self.batches, self.stopped, list(self.decisions), asdict(self.cfg))


def train_nns(model: SupermaskModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              cfg: NNsConfig = NNsConfig(), on_batch: Callable[[int, torch.Tensor], None] | None = None, *,
              train: TrainConfig = TrainConfig(), objective: str = "entropy") -> NNsResult:
    """Learn from ``batches`` of ``(x [B, ...], y [B])`` with no task ids; returns the run's result.

    ``on_batch(batches_done, loss)`` is called after every trained batch (``loss``: its 0-dim cross-entropy,
    not synchronised). The model ends with one learned task per allocated mask (task ids are mask ids,
    unrelated to the hidden tasks' ids)."""
    learner = NNsLearner(model, cfg, train, objective)
    for x, y in batches:
        loss = learner.step(x, y)
        if learner.stopped:
            break
        if on_batch is not None:
            on_batch(learner.batches, loss)
    return learner.finish()


def hidden_task_batches(stream: TaskStream, batches_per_task: int = 1000, batch_size: int = 128,
                        num_tasks: int | None = None, keep_going: Callable[[int], bool] | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The NNs training stream: each task's ``train_batches`` one after another, ids dropped.

    ``keep_going(tasks_done)`` is called after each complete task (the last one too); False ends the
    stream there, so every streamed task is complete. This is the driver's time box: the learner
    consuming the batches never sees the boundaries."""
    for task in range(stream.num_tasks if num_tasks is None else num_tasks):
        yield from stream.train_batches(task, batch_size, batches_per_task)
        if keep_going is not None and not keep_going(task + 1):
            return


@dataclass
class NNsTaskResult:
    """One hidden task: accuracy with inferred masks, and how often each mask was inferred."""

    task: int
    accuracy: float
    inferred: dict[int, int]  # mask id -> test images classified with it


@dataclass
class NNsEvaluation:
    """Per-task results, in task order; ``planned`` = the tasks a time budget chose (None: no budget)."""

    tasks: list[NNsTaskResult] = field(default_factory=list)
    planned: list[int] | None = None

    @property
    def average_accuracy(self) -> float:
        return sum(t.accuracy for t in self.tasks) / len(self.tasks)

    @property
    def evaluated_tasks(self) -> list[int]:
        return [t.task for t in self.tasks]

    def as_dict(self) -> dict:
        return {"average_accuracy": self.average_accuracy, "evaluated_tasks": self.evaluated_tasks,
                "planned_tasks": self.planned, "tasks": [asdict(t) for t in self.tasks]}


@torch.no_grad()
def evaluate_nns(model: SupermaskModel, stream: TaskStream, how: Inference = Inference(),
                 tasks: Iterable[int] | None = None, batch_size: int = 128, seed: int = 0,
                 on_task: Callable[[NNsTaskResult], None] | None = None) -> NNsEvaluation:
    """Shared-label accuracy with inferred masks (paper NNs protocol): each hidden task's test set in
    shuffled batches of ``batch_size``; one inference per batch (``how``, One-Shot H from the first
    image by default); the batch is classified with the inferred mask, whichever it is.

    One host-device sync per batch (the inferred mask id picks the weights) and one per task."""
    model.eval()
    evaluation = NNsEvaluation()
    k = model.num_tasks
    for task in range(stream.num_tasks) if tasks is None else tasks:
        x, y = stream.test_set(task)
        order = torch.randperm(x.shape[0], generator=generator(seed, "test-order", task)).to(x.device)
        right = torch.zeros((), dtype=torch.long, device=x.device)
        counts = torch.zeros(k, dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            inferred = infer_tasks(model, x[idx], how)  # 0-dim (one mask per batch) or [b] (per sample)
            right += (predict(model, x[idx], inferred if inferred.dim() else int(inferred)) == y[idx]).sum()
            ids = inferred.expand(idx.numel())
            counts.scatter_add_(0, ids, torch.ones_like(ids))  # bincount would sync
        inferred_counts = {m: c for m, c in enumerate(counts.tolist()) if c}
        result = NNsTaskResult(task, int(right) / x.shape[0], inferred_counts)
        evaluation.tasks.append(result)
        if on_task is not None:
            on_task(result)
    return evaluation


def spaced(total: int, count: int) -> list[int]:
    """``min(count, total)`` evenly spaced ids of ``0..total-1``, both ends included (integer steps)."""
    count = min(count, total)
    if count <= 1:
        return [0][:count]
    return [i * (total - 1) // (count - 1) for i in range(count)]


def coarse_to_fine(items: list[int]) -> list[int]:
    """``items`` reordered first, last, then midpoints level by level: any prefix spans the whole range."""
    if len(items) < 2:
        return list(items)
    order, spans = [0, len(items) - 1], [(0, len(items) - 1)]
    while spans:
        a, b = spans.pop(0)
        if b - a >= 2:
            m = (a + b) // 2
            order.append(m)
            spans += [(a, m), (m, b)]
    return [items[i] for i in order]


def evaluate_nns_within(model: SupermaskModel, stream: TaskStream, num_tasks: int, seconds: float | None, *,
                        how: Inference | None = None, batch_size: int = 128, seed: int = 0,
                        on_task: Callable[[NNsTaskResult], None] | None = None,
                        clock: Callable[[], float] = time.perf_counter) -> NNsEvaluation:
    """``evaluate_nns`` over hidden tasks ``0..num_tasks-1``, or, when ``seconds`` would not cover them, an
    evenly spaced subset that fits (``seconds=None``: all tasks).

    Task 0 (warm-up) and task ``num_tasks-1`` go first; the time t of the second sets the plan
    ``spaced(num_tasks, 2 + ⌊0.9 · remaining seconds / t⌋)`` (stored as ``planned``). The rest of the
    plan runs coarse to fine, and no task starts once ``seconds`` have passed, so if the estimate was
    wrong the evaluated tasks (the result's ``evaluated_tasks``) still span the range."""
    if num_tasks < 1:
        raise ValueError(f"nothing to evaluate: num_tasks must be >= 1, got {num_tasks}")
    kwargs = {"how": how or Inference(), "batch_size": batch_size, "seed": seed, "on_task": on_task}
    if seconds is None:
        return evaluate_nns(model, stream, tasks=range(num_tasks), **kwargs)
    start = clock()
    evaluation = evaluate_nns(model, stream, tasks=[0], **kwargs)
    plan = [0]
    if num_tasks > 1 and clock() - start < seconds:
        before = clock()
        evaluation.tasks += evaluate_nns(model, stream, tasks=[num_tasks - 1], **kwargs).tasks
        per_task = max(clock() - before, 1e-9)
        fit = int(0.9 * max(seconds - (clock() - start), 0.0) / per_task)
        plan = spaced(num_tasks, 2 + fit)
        for task in coarse_to_fine(plan)[2:]:
            if clock() - start >= seconds:
                break
            evaluation.tasks += evaluate_nns(model, stream, tasks=[task], **kwargs).tasks
    evaluation.tasks.sort(key=lambda t: t.task)
    evaluation.planned = plan
    return evaluation
