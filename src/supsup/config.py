"""The one schema of a run: ``RunConfig`` and its sections, every field validated with a message that names it.

A config is read from TOML (the presets in ``supsup/presets/``, or a user's edited copy) or from JSON (the
``config`` of a ``results.json``), changed by ``section.key=value`` overrides, and written back as TOML. TOML has
no null: a field whose value is ``None`` is left out and reads back as its default (every such default is None).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field

import tomli_w

from supsup.architectures import ARCHITECTURES
from supsup.evaluation import SCENARIOS
from supsup.hopfield import HopfieldConfig
from supsup.inference import Inference
from supsup.learners import TrainConfig
from supsup.nns import NNsConfig

MAX_SEED = (1 << 63) - 1
METHODS = ("supsup", "upper-bound", "lower-bound", "separate-heads", "batche", "psp", "hopsupsup")
DENSE_BASELINES = ("upper-bound", "lower-bound", "separate-heads", "psp")  # scenario GG only
MLPS, CONVNETS = ("fc1024", "lenet"), ("gem_resnet18", "resnet50")
MODELS = (*ARCHITECTURES, "bnnet")  # bnnet: HopSupSup's network


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark gives a network: ``classes`` per task, image ``channels``, at most ``max_tasks``."""

    title: str
    classes: int
    channels: int
    max_tasks: int | None
    flat: bool  # images arrive flattened to [b, 784] (MNIST streams) or as [b, C, H, W]


BENCHMARKS = {
    "permuted-mnist": Benchmark("PermutedMNIST", 10, 1, None, True),
    "rotated-mnist": Benchmark("RotatedMNIST", 10, 1, None, True),
    "split-mnist": Benchmark("SplitMNIST", 10, 1, 5, True),  # labels stay the raw digits
    "split-fashion-mnist": Benchmark("SplitFashionMNIST", 2, 1, 5, False),
    "split-cifar100": Benchmark("SplitCIFAR100", 5, 3, 20, False),
    "split-imagenet": Benchmark("SplitImageNet", 10, 3, 100, False),
}


def _matches(value, hint) -> bool:
    """Whether a JSON/TOML value fits a field's type hint (int, float, str, bool, X | None, list[int])."""
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


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def from_fields(cls, data, where: str):
    """``cls(**data)`` for a dataclass, with an error naming the field for unknown, missing or mistyped ones;
    nested dataclass fields are read the same way, from nested dicts."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a table of settings, got {data!r:.60}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{where}.{key} is not a setting (known: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[key]):
            value = from_fields(hints[key], value, f"{where}.{key}")
        elif not _matches(value, hints[key]):
            raise ValueError(f"{where}.{key} must be of type {_type_name(hints[key])}, got {value!r:.60}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{where}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


@dataclass
class RunConfig:
    """Everything a run needs; saved into ``results.json`` as ``config``. See ``supsup presets show NAME``."""

    preset: str
    method: str = "supsup"  # or a baseline (METHODS); "batche" in GNu is ABatchE
    benchmark: str = "permuted-mnist"
    tasks: int = 5
    model: str = "lenet"
    output_size: int = 100
    width: int | None = None  # conv nets: nf of the reduced ResNet-18 (20), ResNet-50's width (64); BNNet (2048)
    image_size: int | None = None  # SplitImageNet: crop size (None: 224)
    rule: str = "threshold"
    density: float | None = None  # top-k rule: one density for every layer ...
    er_multiplier: float | None = None  # ... or Erdős–Rényi layer-wise densities with this multiplier
    transfer: bool = False  # SupSup Transfer: a new task starts from the mean of earlier tasks' scores
    scenario: str = "GNu"
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: Inference = field(default_factory=Inference)
    nns: NNsConfig = field(default_factory=NNsConfig)  # scenario NNs only
    hopfield: HopfieldConfig = field(default_factory=HopfieldConfig)  # method hopsupsup only
    head_lr: float = 1e-2  # separate-heads: learning rate of the later tasks' heads
    eval_at: list[int] = field(default_factory=list)  # task counts at which to evaluate (the end always)
    mixed_per_task: int | None = None  # granularity 'sample': test samples per task in the mixed stream (None: all)
    seed: int = 1
    device: str = "cpu"
    paper: str = ""  # where the experiment is in the paper (a note; never compared)

    def __post_init__(self):
        for value, allowed, what in ((self.method, METHODS, "method"), (self.benchmark, BENCHMARKS, "benchmark"),
                                     (self.model, MODELS, "model"), (self.scenario, (*SCENARIOS, "NNs"), "scenario"),
                                     (self.rule, ("threshold", "topk"), "rule")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
        bench = BENCHMARKS[self.benchmark]
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if bench.max_tasks is not None and self.tasks > bench.max_tasks:
            raise ValueError(f"{self.benchmark} has at most {bench.max_tasks} tasks, got {self.tasks}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^63 - 1], got {self.seed}")
        if self.output_size < bench.classes:
            raise ValueError(f"output_size {self.output_size} is smaller than the {bench.classes} classes")
        if self.inference.objective == "g" and self.output_size <= bench.classes:
            raise ValueError(f"the G objective needs superfluous outputs: output_size must exceed the "
                             f"{bench.classes} classes, got {self.output_size}")
        if self.mixed_per_task is not None and self.mixed_per_task < 1:
            raise ValueError(f"mixed_per_task must be >= 1, got {self.mixed_per_task}")
        if any(n < 1 for n in self.eval_at):
            raise ValueError(f"eval_at must hold task counts >= 1, got {self.eval_at}")
        for name in ("width", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_model()
        self._check_method()

    def _check_model(self) -> None:
        bench = BENCHMARKS[self.benchmark]
        if (self.model == "bnnet") != (self.method == "hopsupsup"):
            raise ValueError("model bnnet is HopSupSup's network: use it with method hopsupsup, and only there")
        if self.model in CONVNETS and bench.flat:
            raise ValueError(f"{self.model} needs images ([b, C, H, W]); {self.benchmark} gives flat vectors: use "
                             f"an image benchmark ({', '.join(b for b, v in BENCHMARKS.items() if not v.flat)})")
        if self.model in MLPS and bench.channels != 1:
            raise ValueError(f"{self.model} takes 28x28 grey images; {self.benchmark} has {bench.channels} channels")
        if self.width is not None and self.model in MLPS:
            raise ValueError(f"width sets a conv net's or BNNet's width; {self.model} has fixed widths")
        if self.image_size is not None and self.benchmark != "split-imagenet":
            raise ValueError("image_size only applies to split-imagenet")
        if self.rule == "topk" and (self.density is None) == (self.er_multiplier is None):
            raise ValueError("the topk rule needs one of density (every layer) or er_multiplier (Erdős–Rényi)")
        if self.rule == "threshold" and (self.density, self.er_multiplier) != (None, None):
            raise ValueError("density and er_multiplier only apply to rule topk (threshold masks keep s >= 0)")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.er_multiplier is not None and self.er_multiplier <= 0:
            raise ValueError(f"er_multiplier must be > 0, got {self.er_multiplier}")

    def _check_method(self) -> None:
        if self.method in DENSE_BASELINES and self.scenario != "GG":
            raise ValueError(f"method {self.method} is a GG baseline (task given): set scenario GG")
        if self.method == "batche" and self.scenario not in ("GG", "GNu"):
            raise ValueError("method batche runs in scenario GG (BatchE) or GNu (ABatchE, One-Shot inference)")
        if self.method == "hopsupsup" and (self.scenario, self.benchmark) != ("GNu", "split-mnist"):
            raise ValueError("method hopsupsup runs on benchmark split-mnist in scenario GNu")
        if self.method == "hopsupsup" and self.train.optimizer != "sgd":
            raise ValueError("HopSupSup trains its neuron masks with SGD: set train.optimizer = \"sgd\"")
        if self.scenario == "NNs" and self.method != "supsup":
            raise ValueError("scenario NNs is a SupSup scenario: set method supsup")
        if self.transfer and (self.method != "supsup" or self.scenario == "NNs"):
            raise ValueError("transfer (SupSup Transfer) needs method supsup and a scenario with task boundaries")

    # ------------------------------------------------------------------ forms
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """A config from its JSON/TOML form; unknown, missing or mistyped fields raise ``ValueError`` naming them."""
        return from_fields(cls, data, "config")

    def to_toml(self) -> str:
        """The config as TOML (fields that are None left out: they read back as their default)."""
        return tomli_w.dumps(_without_none(self.to_dict()))

    def replaced(self, changes: dict) -> RunConfig:
        """A new config with ``changes`` (a nested dict, like a TOML table) merged in, validated as a whole."""
        return RunConfig.from_dict(merge(self.to_dict(), changes))

    def summary(self) -> str:
        """One line saying what this config runs (made from the settings, so it never disagrees with them)."""
        bench = BENCHMARKS[self.benchmark].title
        net = {"fc1024": "FC 1024-1024", "lenet": "LeNet 300-100", "gem_resnet18": "reduced ResNet-18",
               "resnet50": "ResNet-50", "bnnet": "BNNet"}[self.model]
        if self.width is not None:
            net += f" (width {self.width})"
        what = {"supsup": "SupSup Transfer" if self.transfer else "SupSup", "upper-bound": "Upper Bound",
                "lower-bound": "Lower Bound", "separate-heads": "Separate Heads", "psp": "PSP",
                "batche": "ABatchE" if self.scenario == "GNu" else "BatchE", "hopsupsup": "HopSupSup"}[self.method]
        how = self.scenario
        if self.scenario in ("GNs", "GNu", "NNs") and self.method in ("supsup", "batche"):
            inf = self.inference
            how += f" {inf.method} / {inf.objective} / {inf.granularity}"
        return (f"{what}: {self.tasks} {bench} task{'s' * (self.tasks != 1)}, {net}, s = {self.output_size}, {how}"
                + (f" (paper {self.paper})" if self.paper else ""))


def _without_none(data):
    if isinstance(data, dict):
        return {k: _without_none(v) for k, v in data.items() if v is not None}
    return data


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in, table by table (a copy; neither input changes)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_setting(text: str) -> dict:
    """``"section.key=value"`` as a nested dict ``{"section": {"key": value}}``. The value is read as a TOML
    value (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"text"``), and as plain text when it is not one."""
    path, sep, raw = text.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ValueError(f"--set {text!r}: expected section.key=value (e.g. train.lr=1e-3 or tasks=3)")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    for key in reversed(keys):
        value = {key.strip(): value}
    return value
