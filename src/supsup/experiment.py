"""One run from a ``RunConfig``: data -> task stream -> learner -> evaluation -> run directory.

A run directory is one unit, every file in it written atomically:

- ``model.safetensors``: the checkpoint, rewritten after every task group. Its metadata holds the run's
  config, what built the data and the progress so far (evaluation schedule, seconds): it alone is enough
  to resume.
- ``results.json``: ``status`` (``running``, ``interrupted``, ``complete``), the config, what built the data
  and the model, the checkpoint's sha256, the kernel backend, the schedule so far and, once complete, the
  per-task figures. Rewritten right after the checkpoint.
- ``nns_decisions.json`` (scenario NNs) and ``eval-*.json`` (``supsup eval``).

``run(..., resume=True)`` continues after the last finished task group: every random object is derived from
(seed, task), so the masks and every figure equal those of an uninterrupted run. ``reevaluate`` checks
the checkpoint, results.json and the rebuilt data against each other and refuses a mismatch.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from supsup import kernels
from supsup.architectures import ARCHITECTURES, build_model
from supsup.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint, load_into, read_metadata
from supsup.data.idx import load_mnist
from supsup.data.streams import STREAMS, TaskStream
from supsup.evaluation import Evaluation, evaluate, evaluate_mixed
from supsup.files import sha256_file, write_atomic, write_json
from supsup.learners import train_task_group
from supsup.masks import packed_size
from supsup.model import SupermaskModel
from supsup.presets import RunConfig

RESULTS, CHECKPOINT, DECISIONS = "results.json", "model.safetensors", "nns_decisions.json"
#: What ``--force`` removes from an existing run directory (nothing else in it is touched).
RUN_FILES = (RESULTS, CHECKPOINT, DECISIONS, "eval-*.json", f".{RESULTS}.*.tmp", f".{CHECKPOINT}.*.tmp",
             f".{DECISIONS}.*.tmp")
#: Config fields a resumed run or a re-evaluation may change (they do not change what was learned).
FREE_FIELDS = ("device", "description")


class RunError(RuntimeError):
    """A run directory cannot be used as asked: not empty, not a run, or its files do not belong together."""


@dataclass
class Progress:
    """Callbacks a front end (the CLI's progress bar) may set; all optional."""

    on_stage: Callable[[str, int], None] = lambda description, total: None
    on_advance: Callable[[int], None] = lambda steps: None


# ------------------------------------------------------------------------------------ checks first
def check_device(name: str) -> torch.device:
    """The torch device ``name``, or ``ValueError`` saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}: expected e.g. 'cpu', 'cuda' or 'cuda:1'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported: use cpu, cuda or mps")
    return device


def bytes_per_task(config: RunConfig) -> int:
    """Bytes of one task's masks for ``config``'s network (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        net = ARCHITECTURES[config.model](output_size=config.output_size)
    return sum(packed_size(m.weight.numel()) for m in net.modules() if isinstance(m, (torch.nn.Linear,
                                                                                      torch.nn.Conv2d)))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CPU: Linux ``MemAvailable``), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from supsup.checkpoint import _available_memory

    return _available_memory() if device.type == "cpu" else None


def check_run(config: RunConfig) -> torch.device:
    """Everything about a run that can be checked before any data is read or anything trained."""
    device = check_device(config.device)
    masks = bytes_per_task(config) * config.tasks
    free = available_memory(device)
    if free is not None and masks > free:
        raise ValueError(f"the masks of {config.tasks:,} tasks take {masks / 2**30:,.1f} GiB, more than the "
                         f"{free / 2**30:,.1f} GiB of memory available on {device}: ask for fewer --tasks")
    return device


# ------------------------------------------------------------------------------------ run directory
class RunDirectory:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results, self.checkpoint, self.decisions = (self.path / n for n in (RESULTS, CHECKPOINT, DECISIONS))

    def own_files(self) -> list[Path]:
        return sorted({f for pattern in RUN_FILES for f in self.path.glob(pattern)})

    def prepare(self, force: bool) -> None:
        """Make an empty (or, with ``force``, emptied of run files) writable directory, or say why not."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a directory: choose another --out")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not force:
                names = ", ".join(sorted(p.name for p in self.path.iterdir())[:4])
                raise RunError(f"--out {self.path} is not empty (it holds {names}): pass --resume {self.path} to "
                               f"continue that run, --force to replace it, or choose another --out")
            for file in self.own_files():
                file.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / ".write-test", {})
            (self.path / ".write-test").unlink()
        except OSError as err:
            raise RunError(f"cannot write into {self.path}: {err.strerror or err}; choose another --out") from err

    def remove_temporaries(self) -> None:
        """Temporary files of writes cut off by a kill (an atomic write leaves no other trace)."""
        for file in self.own_files():
            if file.name.endswith(".tmp"):
                file.unlink()

    def read_results(self) -> dict:
        import json

        if not self.results.is_file():
            raise RunError(f"{self.results} not found: is {self.path} a run directory written by `supsup run`?")
        try:
            results = json.loads(self.results.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{self.results} is not valid JSON ({err}): the file was cut short or edited") from err
        if not isinstance(results, dict) or "config" not in results or "status" not in results:
            raise RunError(f"{self.results} is not a supsup results file (no 'config' or 'status')")
        return results

    def config(self) -> RunConfig:
        try:
            return RunConfig.from_dict(self.read_results()["config"])
        except ValueError as err:
            raise RunError(f"{self.results}: {err}") from err

    def save(self, model: SupermaskModel, run_state: dict) -> str:
        """Write the checkpoint atomically; returns its sha256 (from the bytes written, not read back)."""
        return write_atomic(self.checkpoint, checkpoint_bytes(model, extra={"run": run_state}))


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: saved ≠ now`` for every field that differs (nested dicts by dotted key)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if prefix == "" and key in FREE_FIELDS:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} ≠ {b!r}")
    return out


def _require_same(what: str, saved: dict, now: dict, advice: str) -> None:
    diff = _differences(saved, now)
    if diff:
        raise RunError(f"{what} differ: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}; {advice}")


# ------------------------------------------------------------------------------------ pieces
def make_stream(config: RunConfig, data_root=None) -> TaskStream:
    data = load_mnist(data_root, device=config.device)
    stream = STREAMS[config.benchmark](data, config.tasks, seed=config.seed)
    stream.source = data.source
    return stream


def make_model(config: RunConfig, stream: TaskStream) -> SupermaskModel:
    return build_model(config.model, output_size=config.output_size, seed=config.seed,
                       num_classes=stream.num_classes, rule=config.rule, density=config.density).to(config.device)


def describe_data(config: RunConfig, stream: TaskStream) -> dict:
    """What built the data: compared on resume and re-evaluation (the source is only reported)."""
    return {"benchmark": config.benchmark, "seed": config.seed, "tasks": config.tasks,
            "fingerprint": stream.fingerprint()}


def describe_model(model: SupermaskModel) -> dict:
    return {"architecture": model.architecture, "seed": model.seed, "rule": model.rule,
            "bytes_per_task": model.bytes_per_task(), "num_weights": model.num_weights()}


def evaluation_summary(num_tasks: int, evaluation: Evaluation) -> dict:
    return {
        "num_tasks": num_tasks,
        "average_accuracy": evaluation.average_accuracy,
        "average_accuracy_inferred": evaluation.average_accuracy_inferred,
        "average_task_inference_accuracy": evaluation.average_task_inference_accuracy,
    }


def run_evaluation(model: SupermaskModel, stream: TaskStream, config: RunConfig, progress: Progress) -> dict:
    """Evaluate all learned tasks under the config's scenario; with per-sample granularity, also
    on the mixed stream. Returns the JSON-ready figures."""
    how = config.inference
    k = model.num_tasks
    progress.on_stage(f"evaluating {k} tasks ({config.scenario})", k)
    # With per-sample granularity, per-task figures infer every sample within its own task's test set,
    # unless the mixed stream is subsampled (``mixed_per_task``): then per task only the task-given accuracy.
    mixed_only = how.granularity == "sample" and config.mixed_per_task is not None
    evaluation = evaluate(model, stream, "GG" if mixed_only else config.scenario, how, seed=config.seed,
                          on_task=lambda r: progress.on_advance(1))
    out = {"tasks": [r.as_dict() for r in evaluation.tasks], **evaluation_summary(k, evaluation)}
    if how.granularity == "sample" and config.scenario != "GG":
        total = sum(min(stream.size(t, "test"), config.mixed_per_task or 1 << 62) for t in range(k))
        progress.on_stage(f"mixed stream of {k} tasks, per-sample inference", total)
        out["mixed_stream"] = evaluate_mixed(model, stream, how, config.scenario, per_task=config.mixed_per_task,
                                             seed=config.seed, on_batch=progress.on_advance).as_dict()
    return out


def _environment(config: RunConfig) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "device": config.device, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ runs
class _Run:
    """One session of a run: the state that goes into the checkpoint and results.json."""

    def __init__(self, config: RunConfig, directory: RunDirectory, stream: TaskStream, model: SupermaskModel):
        self.config, self.dir, self.stream, self.model = config, directory, stream, model
        self.data = describe_data(config, stream)
        self.schedule: list[dict] = []
        self.train_seconds = self.eval_seconds = 0.0
        self.sessions = 1
        self.checkpoint_sha256: str | None = None
        self.saved_tasks = 0  # learned tasks in the checkpoint on disk

    def state(self) -> dict:
        """What the checkpoint carries besides the model: enough to resume."""
        return {"config": self.config.to_dict(), "data": self.data, "schedule": self.schedule,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds, "sessions": self.sessions}

    def adopt(self, state: dict) -> None:
        self.schedule, self.sessions = list(state["schedule"]), state["sessions"] + 1
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]

    def results(self, status: str, **figures) -> dict:
        return {
            "status": status,
            "config": self.config.to_dict(),
            **figures,
            "tasks_done": self.saved_tasks,
            "data": self.data,
            "model": describe_model(self.model),
            "checkpoint": {"file": CHECKPOINT, "sha256": self.checkpoint_sha256, "tasks": self.saved_tasks},
            "kernels": kernels.describe(self.config.device),
            "bytes_per_task": self.model.bytes_per_task(),
            "bits_per_weight": 8 * self.model.bytes_per_task() / self.model.num_weights(),
            "num_weights": self.model.num_weights(),
            "schedule": self.schedule,
            "seconds": self.train_seconds + self.eval_seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "sessions": self.sessions,
            "data_source": self.stream.source,
            "environment": _environment(self.config),
        }

    def save(self, status: str = "running", **figures) -> dict:
        """Checkpoint (unless interrupted: then the last one stands), then results.json."""
        if status != "interrupted":
            self.checkpoint_sha256 = self.dir.save(self.model, self.state())
            self.saved_tasks = self.model.num_tasks
        results = self.results(status, **figures)
        write_json(self.dir.results, results)
        return results


def _resume(directory: RunDirectory, config: RunConfig, session: _Run) -> None:
    """Load the run's checkpoint (if one was written) into ``session`` after checking it belongs."""
    if not directory.checkpoint.exists():
        return  # killed before the first task group finished: start from the beginning
    try:
        meta = read_metadata(directory.checkpoint)
    except CheckpointError as err:
        raise RunError(f"cannot resume {directory.path}: {err}") from err
    state = (meta.get("extra") or {}).get("run")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise RunError(f"{directory.checkpoint} is not a checkpoint of a `supsup run` (no run state)")
    advice = f"{directory.path} mixes files of different runs; start a new run with --force or another --out"
    _require_same(f"{directory.checkpoint.name} and {RESULTS} configs", state["config"], config.to_dict(), advice)
    _require_same(f"the data of {directory.checkpoint.name} and of this run", state["data"], session.data, advice)
    try:
        load_into(session.model, directory.checkpoint)
    except CheckpointError as err:
        raise RunError(f"cannot resume {directory.path}: {err}") from err
    session.adopt(state)
    session.checkpoint_sha256 = sha256_file(directory.checkpoint)
    session.saved_tasks = session.model.num_tasks


def run(config: RunConfig, out_dir: str | Path, data_root=None, progress: Progress = Progress(), *,
        resume: bool = False, force: bool = False) -> dict:
    """Train and evaluate as configured into the run directory ``out_dir``; returns results.json's content.

    ``resume``: continue the run in ``out_dir`` (whose results.json must hold ``config``). Otherwise
    ``out_dir`` must be empty or absent (``force``: its run files are removed first). On
    ``KeyboardInterrupt`` (SIGINT, or SIGTERM turned into one by the CLI) what is finished stays saved,
    results.json says ``interrupted``, and the interrupt propagates."""
    check_run(config)
    directory = RunDirectory(out_dir)
    if resume:
        if config.scenario == "NNs":
            raise RunError("scenario NNs runs cannot be resumed: the task-free learner keeps the float scores and "
                           "optimiser state of every mask in memory, which the checkpoint does not hold. Start "
                           "it again with --force")
        if directory.read_results()["status"] == "complete":
            raise RunError(f"the run in {directory.path} is complete: nothing to resume (re-evaluate it with "
                           f"`supsup eval {directory.path}`)")
        directory.remove_temporaries()
    else:
        directory.prepare(force)
    torch.manual_seed(config.seed)
    kernels.retain_freed_memory()  # training re-allocates the same large tensors every step
    stream = make_stream(config, data_root)
    model = make_model(config, stream)
    session = _Run(config, directory, stream, model)
    if resume:
        _resume(directory, config, session)
    try:
        if config.scenario == "NNs":
            return _run_nns(session, progress)
        return _run_tasks(session, progress)
    except KeyboardInterrupt:
        session.save("interrupted")
        raise


def _run_tasks(session: _Run, progress: Progress) -> dict:
    config, model, stream = session.config, session.model, session.stream
    schedule = sorted({n for n in config.eval_at if model.num_tasks < n < config.tasks})
    batches = config.train.batches_per_task
    progress.on_stage(f"training {config.tasks} tasks", config.tasks * batches)
    progress.on_advance(model.num_tasks * batches)
    if not session.checkpoint_sha256:
        session.save()
    while model.num_tasks < config.tasks:
        tick = time.perf_counter()
        train_task_group(model, stream, config.train, on_batch=lambda count: progress.on_advance(count))
        session.train_seconds += time.perf_counter() - tick
        if schedule and model.num_tasks >= schedule[0]:
            schedule.pop(0)
            tick = time.perf_counter()
            figures = run_evaluation(model, stream, config, Progress())
            session.schedule.append({k: v for k, v in figures.items() if k != "tasks"})
            session.eval_seconds += time.perf_counter() - tick
            progress.on_stage(f"training {config.tasks} tasks", config.tasks * batches)
            progress.on_advance(model.num_tasks * batches)
        session.save()
    tick = time.perf_counter()
    figures = run_evaluation(model, stream, config, progress)
    session.eval_seconds += time.perf_counter() - tick
    if not session.schedule or session.schedule[-1]["num_tasks"] != model.num_tasks:
        session.schedule.append({k: v for k, v in figures.items() if k != "tasks"})
    return session.save("complete", **figures)


def _run_nns(session: _Run, progress: Progress) -> dict:
    """Scenario NNs: the stream's tasks as one unlabeled stream of batches; masks allocated by the
    learner; evaluated with inferred masks and shared labels. Saves the decision log."""
    from supsup.nns import NNsConfig, evaluate_nns, hidden_task_batches, train_nns

    config, model, stream = session.config, session.model, session.stream
    cfg = NNsConfig(optimizer=config.train.optimizer, lr=config.train.lr, weight_decay=config.train.weight_decay,
                    objective=config.inference.objective)
    batches = hidden_task_batches(stream, config.train.batches_per_task, config.train.batch_size)
    progress.on_stage(f"NNs: {config.tasks} hidden tasks, no task ids", config.tasks * config.train.batches_per_task)
    done = [0]

    def advance(batches_done: int) -> None:
        progress.on_advance(batches_done - done[0])
        done[0] = batches_done

    tick = time.perf_counter()
    learned = train_nns(model, batches, cfg, on_batch=advance)
    session.train_seconds = time.perf_counter() - tick
    write_json(session.dir.decisions, learned.to_dict())
    progress.on_stage(f"evaluating {config.tasks} hidden tasks with inferred masks", config.tasks)
    tick = time.perf_counter()
    evaluation = evaluate_nns(model, stream, config.inference, seed=config.seed,
                              on_task=lambda r: progress.on_advance(1))
    session.eval_seconds = time.perf_counter() - tick
    return session.save("complete", **nns_figures(evaluation), num_hidden_tasks=config.tasks,
                        num_masks=learned.num_masks, stopped_at_budget=learned.stopped)


def nns_figures(evaluation) -> dict:
    """JSON-ready figures of an ``NNsEvaluation``: per hidden task, accuracy and which masks were inferred."""
    return {"tasks": [{"task": r.task, "accuracy_inferred": r.accuracy,
                       "inferred_masks": {str(m): n for m, n in r.inferred.items()}} for r in evaluation.tasks],
            "average_accuracy": None, "average_accuracy_inferred": evaluation.average_accuracy}


def reevaluate(run_dir: str | Path, config: RunConfig, data_root=None, progress: Progress = Progress()) -> dict:
    """Evaluate a saved run's checkpoint again (possibly with other inference settings), after checking
    that results.json, the checkpoint and the rebuilt data belong together."""
    directory = RunDirectory(run_dir)
    results = directory.read_results()
    check_device(config.device)
    if not directory.checkpoint.is_file():
        raise RunError(f"{directory.checkpoint} not found: the run saved no task yet")
    recorded = (results.get("checkpoint") or {}).get("sha256")
    actual = sha256_file(directory.checkpoint)
    if recorded != actual:
        raise RunError(f"{directory.checkpoint} is not the checkpoint {RESULTS} was written with (sha256 "
                       f"{actual[:12]}…, recorded {str(recorded)[:12]}…): the files of {directory.path} do not "
                       f"belong together" + (" (resume the run to finish it)" if results["status"] != "complete"
                                             else ""))
    meta = read_metadata(directory.checkpoint)
    state = (meta.get("extra") or {}).get("run") or {}
    saved = RunConfig.from_dict(results["config"]).to_dict()
    advice = f"the files of {directory.path} do not belong together"
    _require_same(f"{CHECKPOINT} and {RESULTS} configs", state.get("config") or {}, saved, advice)
    _require_same(f"{CHECKPOINT} and the model of {RESULTS}",
                  {"seed": meta["seed"], "architecture": meta["architecture"]},
                  {"seed": config.seed, "architecture": {"name": config.model, "output_size": config.output_size}},
                  advice)
    stream = make_stream(config, data_root)
    _require_same(f"the data recorded in {RESULTS} and the data rebuilt now", results.get("data") or {},
                  describe_data(config, stream), "the data or the random generator changed since the run")
    model = load_checkpoint(directory.checkpoint, device=config.device)
    model.num_classes = stream.num_classes
    started = time.perf_counter()
    if config.scenario == "NNs":
        from supsup.nns import evaluate_nns

        evaluation = evaluate_nns(model, stream, config.inference, seed=config.seed,
                                  on_task=lambda r: progress.on_advance(1))
        figures = {**nns_figures(evaluation), "num_hidden_tasks": config.tasks, "num_masks": model.num_tasks}
    else:
        figures = run_evaluation(model, stream, config, progress)
    return {"config": config.to_dict(), **figures, "bytes_per_task": model.bytes_per_task(),
            "checkpoint": {"file": CHECKPOINT, "sha256": actual, "tasks": model.num_tasks},
            "kernels": kernels.describe(config.device), "seconds": time.perf_counter() - started}


def tasks_saved(run_dir: str | Path) -> int:
    """Learned tasks in a run directory's checkpoint (0 when none was written yet)."""
    checkpoint = RunDirectory(run_dir).checkpoint
    return read_metadata(checkpoint)["num_tasks"] if checkpoint.is_file() else 0

