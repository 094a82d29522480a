"""The methods ``supsup run`` can run on a task stream with task boundaries (scenarios GG, GNs, GNu), behind one
interface the run loop uses: ``train_group`` learns the next group of tasks, ``evaluate`` measures learned tasks
(all by default), ``bytes_stored`` is what the method keeps. Only SupSup's state is a ``SupermaskModel`` (``resumable``).

- ``SupSup``: supermasks (and SupSup Transfer); GG, GNs or GNu.
- ``Baseline``: Upper Bound, Lower Bound, Separate Heads, PSP, BatchE in GG; BatchE in GNu is ABatchE.
- ``HopSupSupRun``: neuron masks kept only in Hopfield stores, recovered from unlabelled data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from supsup.architectures import ARCHITECTURES, build_model
from supsup.baselines import MultiHead, TaskConditioned, UpperBound
from supsup.config import BENCHMARKS, RunConfig
from supsup.data.streams import TaskStream
from supsup.density import er_density
from supsup.distributed import World, evaluate as evaluate_dealt, train_round
from supsup.evaluation import evaluate, evaluate_mixed
from supsup.learners import train_task_group
from supsup.model import SupermaskModel
from supsup.transfer import RunningMeanScores

OnBatch = Callable[[int, torch.Tensor], None]  # (tasks' batches done, their loss: 0-dim, not synchronised)


def architecture_kwargs(config: RunConfig) -> dict:
    """The registry arguments of ``config``'s network besides ``output_size`` (as checkpoints record them)."""
    if config.model == "gem_resnet18":
        return {"in_channels": BENCHMARKS[config.benchmark].channels, **({} if config.width is None
                                                                        else {"nf": config.width})}
    if config.model == "resnet50":
        return {"in_channels": BENCHMARKS[config.benchmark].channels, **({} if config.width is None
                                                                        else {"width": config.width})}
    return {}


def make_model(config: RunConfig, num_classes: int) -> SupermaskModel:
    density = er_density(config.er_multiplier) if config.er_multiplier is not None else config.density
    return build_model(config.model, output_size=config.output_size, seed=config.seed, num_classes=num_classes,
                       rule=config.rule, density=density, **architecture_kwargs(config)).to(config.device)


def headline(config: RunConfig) -> str:
    """The per-task figure the accuracy matrix holds: with the task given (GG, or when per-sample inference is
    measured on a subsampled mixed stream only, ``mixed_per_task``) or inferred."""
    mixed_only = config.inference.granularity == "sample" and config.mixed_per_task is not None
    return "accuracy" if config.scenario == "GG" or mixed_only else "accuracy_inferred"


def _averages(rows: list[dict]) -> dict:
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None
    return {"num_tasks": len(rows), "average_accuracy": mean("accuracy"),
            "average_accuracy_inferred": mean("accuracy_inferred"),
            "average_task_inference_accuracy": mean("task_inference_accuracy")}


class SupSup:
    """Supermasks on a frozen random network; with ``config.transfer``, SupSup Transfer.

    With a ``world`` of several ranks (``supsup.distributed``), each round of groups is dealt to the ranks
    and evaluation too; ``trained_by`` holds, per learned task, the ranks that trained it."""

    resumable = True

    def __init__(self, config: RunConfig, stream: TaskStream, world: World = World()):
        self.config, self.stream, self.world = config, stream, world
        self.model = make_model(config, stream.num_classes)
        self.name = "SupSup Transfer" if config.transfer else "SupSup"
        self.running = RunningMeanScores() if config.transfer else None
        self.trained_by: list[list[int]] = []

    @property
    def num_tasks(self) -> int:
        return self.model.num_tasks

    def train_group(self, on_batch: OnBatch, until: int | None = None) -> list[int]:
        """Learn the next group of tasks (several ranks: the next round of groups, none starting at or after
        task ``until``); returns the new task ids."""
        first = self.model.num_tasks
        if self.world.size > 1:
            self.trained_by += train_round(self.model, self.stream, self.config.train, self.world, on_batch, until)
            return list(range(first, self.model.num_tasks))
        hooks = {"init_scores": self.running.init_scores, "before_freeze": self.running.observe} if self.running \
            else {}
        new = train_task_group(self.model, self.stream, self.config.train, on_batch, **hooks)
        self.trained_by += [[0]] * len(new)
        return new

    def evaluate(self, on_task: Callable[[int], None], on_sample: Callable[[int], None] | None = None,
                 tasks: list[int] | None = None) -> dict:
        """Learned ``tasks`` (all by default) under the config's scenario; with per-sample granularity, also the
        mixed stream of all tasks."""
        config, how = self.config, self.config.inference
        # With per-sample granularity and a subsampled mixed stream (``mixed_per_task``), per task only the
        # task-given accuracy; otherwise every sample is inferred within its own task's test set.
        mixed_only = how.granularity == "sample" and config.mixed_per_task is not None
        evaluation = evaluate_dealt(self.world, self.model, self.stream, "GG" if mixed_only else config.scenario, how,
                                    tasks=tasks, seed=config.seed, on_task=lambda r: on_task(self.world.size))
        rows = [r.as_dict() for r in evaluation.tasks]
        out = {"tasks": rows, **_averages(rows)}
        if how.granularity == "sample" and config.scenario != "GG" and tasks is None:
            out["mixed_stream"] = evaluate_mixed(self.model, self.stream, how, config.scenario,
                                                 per_task=config.mixed_per_task, seed=config.seed,
                                                 on_batch=on_sample).as_dict()
        return out

    def bytes_stored(self) -> int:
        """Bit-packed masks plus the per-task floats (BatchNorm statistics, biases, affines) of the learned tasks."""
        return self.model.bytes_per_task() * self.num_tasks

    def describe(self) -> dict:
        m = self.model
        return {"method": self.name, "architecture": m.architecture, "seed": m.seed, "rule": m.rule,
                "bytes_per_task": m.bytes_per_task(), "num_weights": m.num_weights()}


class Baseline:
    """A dense or task-conditioned baseline on the same stream and batches (``supsup.baselines``)."""

    resumable = False

    def __init__(self, config: RunConfig, stream: TaskStream):
        self.config, self.stream = config, stream
        kwargs = architecture_kwargs(config)

        def build():
            return ARCHITECTURES[config.model](output_size=config.output_size, **kwargs)

        method, cfg, seed = config.method, config.train, config.seed
        if method == "upper-bound":
            self.impl = UpperBound(build, stream, cfg, seed)
        elif method in ("lower-bound", "separate-heads"):
            name = "Lower Bound" if method == "lower-bound" else "Separate Heads"
            head = None if method == "lower-bound" else dataclasses.replace(cfg, lr=config.head_lr)
            self.impl = MultiHead(name, build, stream, cfg, config.tasks, seed, method == "separate-heads", head)
        else:
            self.impl = TaskConditioned("BatchE" if method == "batche" else "PSP", build, stream, cfg, config.tasks,
                                        seed)
        self.name = "ABatchE" if method == "batche" and config.scenario == "GNu" else self.impl.name

    @property
    def num_tasks(self) -> int:
        return self.impl.num_tasks

    def train_group(self, on_batch: OnBatch) -> list[int]:
        return [self.impl.learn(on_batch)]

    def evaluate(self, on_task: Callable[[int], None], on_sample=None, tasks: list[int] | None = None) -> dict:
        if self.config.scenario == "GNu":  # ABatchE: the member inferred as SupSup infers a mask
            evaluation = evaluate(self.impl, self.stream, "GNu", self.config.inference, tasks=tasks,
                                  seed=self.config.seed, on_task=lambda r: on_task(1))
            rows = [r.as_dict() for r in evaluation.tasks]
        else:
            rows = []
            for t in range(self.num_tasks) if tasks is None else tasks:
                rows.append({"task": t, "accuracy": self.impl.accuracy(t)})
                on_task(1)
        return {"tasks": rows, **_averages(rows)}

    def bytes_stored(self) -> int:
        return self.impl.bytes_stored()

    def describe(self) -> dict:
        return {"method": self.name, "architecture": {"name": self.config.model,
                                                      "output_size": self.config.output_size,
                                                      **architecture_kwargs(self.config)},
                "seed": self.config.seed}


def make_method(config: RunConfig, stream: TaskStream, world: World = World()):
    """The learner of ``config.method`` (only SupSup runs on several ranks of ``world``)."""
    if config.method == "supsup":
        return SupSup(config, stream, world)
    if config.method == "hopsupsup":
        return HopSupSupRun(config, stream)
    return Baseline(config, stream)


class HopSupSupRun:
    """HopSupSup on SplitMNIST: each task's neuron masks are learned, written into the Hopfield stores and
    dropped; ``evaluate`` recovers every task's mask from unlabelled data (``config.hopfield.protocol``) and
    scores it. The true masks are kept beside the model for diagnostics only (Hamming distances, steps)."""

    resumable = False
    name = "HopSupSup"

    def __init__(self, config: RunConfig, stream: TaskStream):
        from supsup.hopfield import HopSupSup, HopTrainConfig

        self.config, self.stream, hop = config, stream, config.hopfield
        self.model = HopSupSup(seed=config.seed, width=config.width or 2048, rule=hop.rule, joint=hop.joint,
                               output_size=config.output_size).to(config.device)
        t = config.train
        self.train_cfg = HopTrainConfig(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                        batch_size=t.batch_size, holdout=hop.holdout, max_batches=t.batches_per_task,
                                        seed=config.seed)
        self.true_masks: list[list[torch.Tensor]] = []

    @property
    def num_tasks(self) -> int:
        return self.model.num_tasks

    def train_group(self, on_batch: OnBatch) -> list[int]:
        from supsup.hopfield import train_task

        task = self.num_tasks
        self.true_masks.append(train_task(self.model, self.stream, task, self.train_cfg,
                                          on_batch=lambda b, loss: on_batch(1, loss)))
        return [task]

    def _batches(self, task: int, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A task's test set in seeded shuffled batches, or its held-out training images, in ``test_batch``es."""
        from supsup.hopfield import split_train
        from supsup.seeding import generator

        size = self.config.hopfield.test_batch
        if split == "test":
            x, y = self.stream.test_set(task)
            order = torch.randperm(x.shape[0], generator=generator(self.config.seed, "hop-test", task)).to(x.device)
            return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, x.shape[0], size)]
        _, held_out = split_train(self.stream, task, self.train_cfg.holdout, self.train_cfg.seed)
        return [self.stream.batch(task, "train", held_out[i : i + size]) for i in range(0, held_out.numel(), size)]

    def evaluate(self, on_task: Callable[[int], None], on_sample=None, tasks: list[int] | None = None) -> dict:
        from supsup.hopfield import RecoveryConfig, accuracy, hamming, recover, steps_to_match, steps_to_recover

        hop, true, rows = self.config.hopfield, self.true_masks, []
        recovery = RecoveryConfig(lr=hop.recovery_lr, gamma=hop.gamma)
        for task in range(self.num_tasks) if tasks is None else tasks:
            test = self._batches(task, "test")
            data = [x for x, _ in (test if hop.protocol == "transductive" else self._batches(task, "held-out"))]
            r = recover(self.model, data, recovery)
            distances = [hamming(r.masks, m) for m in true]
            nearest = min(range(len(true)), key=distances.__getitem__)
            exact = steps_to_match(r.history, true[task])
            rows.append({"task": task, "accuracy": accuracy(self.model, true[task], test),
                         "task_inference_accuracy": float(nearest == task),
                         "accuracy_inferred": accuracy(self.model, r.masks, test),
                         "inferred": {str(nearest): sum(y.numel() for _, y in test)},
                         "recovered_exactly": exact is not None and exact < 30, "steps_to_exact": exact,
                         "steps_to_nearest": steps_to_recover(r.history, true, task),
                         "hamming_true": distances[task],
                         "hamming_nearest_other": min([d for j, d in enumerate(distances) if j != task], default=None),
                         "recovery_batches": len(data)})
            on_task(1)
        return {"tasks": rows, **_averages(rows), "recovered_exactly": sum(r["recovered_exactly"] for r in rows)}

    def bytes_stored(self) -> int:
        """The Hopfield stores: constant in the number of tasks."""
        return self.model.nbytes

    def describe(self) -> dict:
        hop = self.config.hopfield
        return {"method": self.name, "architecture": {"name": "bnnet", "width": self.config.width or 2048,
                                                      "output_size": self.config.output_size},
                "seed": self.config.seed, "store": {"rule": hop.rule, "joint": hop.joint, "bytes": self.model.nbytes},
                "mask_bits_per_task": self.model.mask_bits_per_task}
