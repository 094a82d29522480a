"""One run from a ``RunConfig``: data -> task stream -> learner -> evaluation -> files.

Writes into the run directory: ``results.json`` (config, per-task figures, averages, bytes per
task, seconds, evaluation schedule) and ``model.safetensors`` (packed masks + metadata).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from supsup.architectures import build_model
from supsup.checkpoint import load_checkpoint, save_checkpoint
from supsup.data.idx import load_mnist
from supsup.data.streams import STREAMS, TaskStream
from supsup.evaluation import Evaluation, evaluate, evaluate_mixed
from supsup.kernels import retain_freed_memory
from supsup.learners import train_task_group
from supsup.model import SupermaskModel
from supsup.presets import RunConfig


@dataclass
class Progress:
    """Callbacks a front end (the CLI's progress bar) may set; all optional."""

    on_stage: Callable[[str, int], None] = lambda description, total: None
    on_advance: Callable[[int], None] = lambda steps: None


def make_stream(config: RunConfig, data_root=None) -> TaskStream:
    if config.benchmark not in STREAMS:
        raise ValueError(f"unknown benchmark {config.benchmark!r}; known: {sorted(STREAMS)}")
    data = load_mnist(data_root, device=config.device)
    stream = STREAMS[config.benchmark](data, config.tasks, seed=config.seed)
    stream.source = data.source
    return stream


def make_model(config: RunConfig, stream: TaskStream) -> SupermaskModel:
    return build_model(config.model, output_size=config.output_size, seed=config.seed,
                       num_classes=stream.num_classes, rule=config.rule, density=config.density).to(config.device)


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
            "device": config.device}


def run_nns(config: RunConfig, stream: TaskStream, model: SupermaskModel, out_dir: Path, progress: Progress) -> dict:
    """Scenario NNs: the stream's tasks as one unlabeled stream of batches; masks allocated by the
    learner; evaluated with inferred masks and shared labels. Saves the decision log."""
    from supsup.nns import NNsConfig, evaluate_nns, hidden_task_batches, train_nns

    started = time.perf_counter()
    cfg = NNsConfig(optimizer=config.train.optimizer, lr=config.train.lr, weight_decay=config.train.weight_decay,
                    objective=config.inference.objective)
    batches = hidden_task_batches(stream, config.train.batches_per_task, config.train.batch_size)
    total = config.tasks * config.train.batches_per_task
    progress.on_stage(f"NNs: {config.tasks} hidden tasks, no task ids", total)
    done = [0]

    def advance(batches_done: int) -> None:
        progress.on_advance(batches_done - done[0])
        done[0] = batches_done

    learned = train_nns(model, batches, cfg, on_batch=advance)
    learned.save(out_dir / "nns_decisions.json")
    train_seconds = time.perf_counter() - started
    progress.on_stage(f"evaluating {config.tasks} hidden tasks with inferred masks", config.tasks)
    evaluation = evaluate_nns(model, stream, config.inference, seed=config.seed,
                              on_task=lambda r: progress.on_advance(1))
    save_checkpoint(model, out_dir / "model.safetensors", extra={"preset": config.preset})
    return {
        "config": config.to_dict(),
        "tasks": [{"task": r.task, "accuracy_inferred": r.accuracy,
                   "inferred_masks": {str(m): n for m, n in r.inferred.items()}} for r in evaluation.tasks],
        "average_accuracy": None,
        "average_accuracy_inferred": evaluation.average_accuracy,
        "num_hidden_tasks": config.tasks,
        "num_masks": learned.num_masks,
        "stopped_at_budget": learned.stopped,
        "bytes_per_task": model.bytes_per_task(),
        "bits_per_weight": 8 * model.bytes_per_task() / model.num_weights(),
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "data_source": stream.source,
        "environment": _environment(config),
    }


def run(config: RunConfig, out_dir: str | Path, data_root=None, progress: Progress = Progress()) -> dict:
    """Train and evaluate as configured; write results.json and model.safetensors into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    retain_freed_memory()  # training re-allocates the same large tensors every step
    started = time.perf_counter()
    stream = make_stream(config, data_root)
    model = make_model(config, stream)
    if config.scenario == "NNs":
        results = run_nns(config, stream, model, out_dir, progress)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        return results
    schedule = sorted({n for n in config.eval_at if n < config.tasks})
    train_seconds = eval_seconds = 0.0
    checkpoints: list[dict] = []
    progress.on_stage(f"training {config.tasks} tasks", config.tasks * config.train.batches_per_task)
    while model.num_tasks < config.tasks:
        tick = time.perf_counter()
        train_task_group(model, stream, config.train, on_batch=lambda count: progress.on_advance(count))
        train_seconds += time.perf_counter() - tick
        if schedule and model.num_tasks >= schedule[0]:
            schedule.pop(0)
            tick = time.perf_counter()
            figures = run_evaluation(model, stream, config, Progress())
            checkpoints.append({k: v for k, v in figures.items() if k != "tasks"})
            eval_seconds += time.perf_counter() - tick
            # a run cut short still leaves its curve so far
            (out_dir / "results.partial.json").write_text(json.dumps(
                {"config": config.to_dict(), "schedule": checkpoints, "seconds": time.perf_counter() - started}))
            progress.on_stage(f"training {config.tasks} tasks", config.tasks * config.train.batches_per_task)
            progress.on_advance(model.num_tasks * config.train.batches_per_task)
    tick = time.perf_counter()
    figures = run_evaluation(model, stream, config, progress)
    eval_seconds += time.perf_counter() - tick
    checkpoints.append({k: v for k, v in figures.items() if k != "tasks"})
    save_checkpoint(model, out_dir / "model.safetensors", extra={"preset": config.preset})
    results = {
        "config": config.to_dict(),
        **figures,
        "bytes_per_task": model.bytes_per_task(),
        "bits_per_weight": 8 * model.bytes_per_task() / model.num_weights(),
        "num_weights": model.num_weights(),
        "schedule": checkpoints,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "data_source": stream.source,
        "environment": _environment(config),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def reevaluate(run_dir: str | Path, config: RunConfig, data_root=None, progress: Progress = Progress()) -> dict:
    """Load a saved run's model and evaluate it again (possibly with other inference settings)."""
    run_dir = Path(run_dir)
    stream = make_stream(config, data_root)
    model = load_checkpoint(run_dir / "model.safetensors", device=config.device)
    model.num_classes = stream.num_classes
    started = time.perf_counter()
    figures = run_evaluation(model, stream, config, progress)
    return {"config": config.to_dict(), **figures, "bytes_per_task": model.bytes_per_task(),
            "seconds": time.perf_counter() - started}
