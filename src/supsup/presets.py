"""Named configurations for the paper's experiments. Each has the paper's (full) settings and a
scaled-down CPU form (``small``) that finishes in minutes on 2 cores."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from supsup.data.streams import STREAMS
from supsup.evaluation import SCENARIOS
from supsup.inference import Inference
from supsup.learners import TrainConfig

MAX_SEED = (1 << 63) - 1
MNIST_MODELS = ("fc1024", "lenet")
NUM_CLASSES = 10  # every MNIST stream


def _matches(value, hint) -> bool:
    """Whether a JSON value fits a field's type hint (int, float, str, bool, X | None, list[int])."""
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def from_fields(cls, data, where: str):
    """``cls(**data)`` for a dataclass, with an error naming the field for unknown, missing or mistyped ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {data!r:.60}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{where}.{key} is not a setting (known: {', '.join(sorted(names))})")
        if not dataclasses.is_dataclass(hints[key]) and not _matches(value, hints[key]):
            kind = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key])
            raise ValueError(f"{where}.{key} must be of type {kind}, got {value!r:.60}")
    try:
        return cls(**data)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


@dataclass
class RunConfig:
    """Everything a run needs; saved into ``results.json`` as ``config``."""

    preset: str
    benchmark: str = "permuted-mnist"
    tasks: int = 5
    model: str = "lenet"
    output_size: int = 100
    rule: str = "threshold"
    density: float | None = None
    scenario: str = "GNu"
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: Inference = field(default_factory=Inference)
    eval_at: list[int] = field(default_factory=list)  # task counts at which to evaluate (the end always)
    mixed_per_task: int | None = None  # granularity 'sample': test samples per task in the mixed stream (None: all)
    seed: int = 1
    device: str = "cpu"
    description: str = ""

    def __post_init__(self):
        if self.scenario not in (*SCENARIOS, "NNs"):
            raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {(*SCENARIOS, 'NNs')}")
        if self.benchmark not in STREAMS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}; known: {', '.join(sorted(STREAMS))}")
        if self.model not in MNIST_MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MNIST_MODELS}")
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^63 - 1], got {self.seed}")
        if self.output_size < NUM_CLASSES:
            raise ValueError(f"output_size {self.output_size} is smaller than the {NUM_CLASSES} classes")
        if self.inference.objective == "g" and self.output_size <= NUM_CLASSES:
            raise ValueError(f"the G objective needs superfluous outputs: output_size must exceed the "
                             f"{NUM_CLASSES} classes, got {self.output_size}")
        if self.mixed_per_task is not None and self.mixed_per_task < 1:
            raise ValueError(f"mixed_per_task must be >= 1, got {self.mixed_per_task}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """A config from its JSON form; unknown, missing or mistyped fields raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be an object, got {data!r:.60}")
        data = dict(data)
        data["train"] = from_fields(TrainConfig, data.get("train", {}), "config.train")
        data["inference"] = from_fields(Inference, data.get("inference", {}), "config.inference")
        return from_fields(cls, data, "config")


def _preset(name, description, small: dict, **kwargs) -> tuple[RunConfig, dict]:
    return RunConfig(preset=name, description=description, **kwargs), small


_SCHEDULE_250 = [10, 50, 100, 150, 200, 250]
_SCHEDULE_2500 = [10, 500, 1000, 1500, 2000, 2500]
_ROTATED_SCHEDULE = [2, 5, 10, 15, 20, 25, 30, 35, 36]

# name, description, overrides of the scaled-down CPU form, full settings
_TABLE = [
    ("demo", "README main job: 5 PermutedMNIST tasks, LeNet 300-100 (s=100), GNu One-Shot H", {},
     dict(tasks=5, model="lenet", output_size=100)),
    ("permuted-mnist", "PermutedMNIST 250 tasks, FC 1024-1024, s=500, GNu One-Shot H (paper Fig 3 right)",
     dict(tasks=5), dict(tasks=250, model="fc1024", output_size=500, eval_at=_SCHEDULE_250)),
    ("permuted-mnist-g", "PermutedMNIST 250 tasks, FC 1024-1024, s=500, GNu One-Shot G (paper Fig 3 right)",
     dict(tasks=5), dict(tasks=250, model="fc1024", output_size=500, eval_at=_SCHEDULE_250,
                         inference=Inference(objective="g"))),
    ("permuted-mnist-lenet", "PermutedMNIST 250 tasks, LeNet 300-100, s=100, GNu One-Shot H (paper Fig 3 left)",
     dict(tasks=10), dict(tasks=250, model="lenet", output_size=100, eval_at=_SCHEDULE_250)),
    ("permuted-mnist-lenet-g", "PermutedMNIST 250 tasks, LeNet 300-100, s=100, GNu One-Shot G (paper Fig 3 left)",
     dict(tasks=10), dict(tasks=250, model="lenet", output_size=100, eval_at=_SCHEDULE_250,
                          inference=Inference(objective="g"))),
    ("permuted-mnist-2500", "PermutedMNIST 2500 tasks, LeNet 300-100, s=500, GNu One-Shot H (paper Fig 4)",
     dict(tasks=20), dict(tasks=2500, model="lenet", output_size=500, eval_at=_SCHEDULE_2500)),
    ("rotated-mnist", "RotatedMNIST 36 tasks (10° apart), FC 1024-1024, s=200, GNu Binary H on the full batch "
     "of 128 (paper Fig 5 left)", dict(train=TrainConfig(batches_per_task=200), eval_at=[]),
     dict(benchmark="rotated-mnist", tasks=36, model="fc1024", output_size=200, eval_at=_ROTATED_SCHEDULE,
          inference=Inference(method="binary", granularity="batch"))),
    ("nns-permuted-mnist", "Scenario NNs: PermutedMNIST 2500 hidden tasks of 1000 batches, no task ids in training "
     "or test, LeNet 300-100, s=500, masks allocated by the entropy-gradient rule (paper Fig 4)", dict(tasks=20),
     dict(tasks=2500, model="lenet", output_size=500, scenario="NNs")),
    ("split-mnist", "SplitMNIST 5 tasks of 2 digits, LeNet 300-100, s=100, GNu One-Shot H", {},
     dict(benchmark="split-mnist", tasks=5, model="lenet", output_size=100)),
    *[(f"output-size-{s}", f"Output-size ablation (paper Fig 6): LeNet, s={s}, PermutedMNIST 250 tasks, GNu One-Shot H",
       dict(tasks=10), dict(tasks=250, model="lenet", output_size=s, eval_at=_SCHEDULE_250)) for s in (25, 100, 200)],
]

PRESETS: dict[str, tuple[RunConfig, dict]] = {
    name: (RunConfig(preset=name, description=description, **full), small)
    for name, description, small, full in _TABLE
}


def get_preset(name: str, small: bool = False) -> RunConfig:
    """A fresh copy of a preset; ``small=True`` applies its scaled-down CPU form."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    config, small_overrides = PRESETS[name]
    config = RunConfig.from_dict(config.to_dict())
    if small:
        config = dataclasses.replace(config, **small_overrides)
        config.eval_at = [n for n in config.eval_at if n <= config.tasks]
    return config
