"""One run from a ``RunConfig``: data -> task stream -> method -> evaluation -> run directory (``rundir.py``).

``_run_tasks`` is the one place where task groups are trained, evaluated at the schedule (the accuracy matrix,
``metrics.py``) and checkpointed. ``run(..., resume=True)`` continues after the last finished task group: every
random object is derived from (seed, task), so the masks and every figure equal those of an uninterrupted run.
Only SupSup's state is a checkpoint (SupSup Transfer's running score sums in a file beside it); the other methods
and scenario NNs cannot be resumed (the refusal says why). ``reevaluate`` checks the checkpoint, results.json and the rebuilt data against each other.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save as safetensors_save

from supsup import kernels, metrics
from supsup.checkpoint import CheckpointError, load_checkpoint, load_into, read_metadata
from supsup.config import RunConfig
from supsup.data.streams import STREAMS, TaskStream
from supsup.distributed import DistributedError, World
from supsup.files import sha256_file, write_atomic, write_json
from supsup.checks import check_device, check_run, why_not_resumable
from supsup.loggers import Logs, RunLog, TensorBoardLog
from supsup.methods import SupSup, architecture_kwargs, headline, make_method
from supsup.rundir import (CHECKPOINT, CONFUSION, MATRIX, METRICS, RESULTS, TENSORBOARD, TRANSFER, RunDirectory,
                           RunError, as_saved_now, require_same)


# ------------------------------------------------------------------------------------ pieces
def make_stream(config: RunConfig, data_root=None) -> TaskStream:
    """The benchmark's task stream, its data read (and checked) from the data root."""
    name, device = config.benchmark, config.device
    if name in STREAMS:
        from supsup.data.idx import load_mnist

        data = load_mnist(data_root, device=device)
        stream = STREAMS[name](data, config.tasks, seed=config.seed)
    elif name == "split-fashion-mnist":
        from supsup.data.fashion import SplitFashionMNIST, load_split_fashion

        data = load_split_fashion(data_root, device)
        stream = SplitFashionMNIST(data, config.tasks, seed=config.seed)
    elif name == "split-cifar100":
        from supsup.data.cifar import SplitCIFAR100, load_cifar100

        data = load_cifar100(data_root, device)
        stream = SplitCIFAR100(data, config.tasks, seed=config.seed)
    else:
        from supsup.data.imagenet import SplitImageNet
        from supsup.data.sources import data_root as resolve

        size = config.image_size or 224
        stream = SplitImageNet(data_root, config.tasks, seed=config.seed, image_size=size, resize=size * 8 // 7,
                               device=device)
        stream.source = f"files in {resolve(data_root) / 'imagenet'}"
        return stream
    stream.source = data.source
    return stream


def describe_data(config: RunConfig, stream: TaskStream) -> dict:
    """What built the data: compared on resume and re-evaluation (the source is only reported)."""
    return {"benchmark": config.benchmark, "seed": config.seed, "tasks": config.tasks,
            "fingerprint": stream.fingerprint()}


def _environment(config: RunConfig) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "device": config.device, "threads": torch.get_num_threads()}


def _summary(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k not in ("tasks", "confusion")}


# ------------------------------------------------------------------------------------ runs
class _Run:
    """One session of a run: the state that goes into the checkpoint, results.json and the CSV files."""

    def __init__(self, config: RunConfig, directory: RunDirectory, stream: TaskStream, log: RunLog,
                 world: World = World()):
        self.config, self.dir, self.stream, self.log, self.world = config, directory, stream, log, world
        self.method = make_method(config, stream, world) if config.scenario != "NNs" else None
        self.data = describe_data(config, stream)
        self.schedule: list[dict] = []  # averages at every evaluation
        self.matrix = metrics.AccuracyMatrix()
        self.progress: dict[str, list] = {"tasks_learned": [], "bytes_stored": [], "train_loss": []}
        self.scalars: list[tuple[int, str, float]] = []
        self.train_seconds = self.eval_seconds = 0.0
        self.sessions = 1
        self.command: str | None = None
        self.transfer: dict | None = None  # SupSup Transfer: the file of the running score sums and its sha256
        self.nns_model = None  # scenario NNs: the model, checkpointed once trained
        self.checkpoint_sha256: str | None = None
        self.saved_tasks = 0  # learned tasks in the checkpoint on disk (or, unresumable, in results.json)

    def checkpointed(self):
        """The SupermaskModel the checkpoint holds (SupSup; NNs once trained), or None for other methods."""
        return self.method.model if isinstance(self.method, SupSup) else self.nns_model

    def record(self, tasks_learned: int, values: dict) -> None:
        """Scalars for metrics.csv and the logs."""
        values = {k: v for k, v in values.items() if v is not None}
        self.scalars += [(tasks_learned, k, float(v)) for k, v in values.items()]
        self.log.scalars(tasks_learned, values)

    def state(self) -> dict:
        """What the checkpoint carries besides the model: enough to resume."""
        return {"config": self.config.to_dict(), "data": self.data, "schedule": self.schedule,
                "matrix": self.matrix.to_dict(), "progress": self.progress, "scalars": self.scalars,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds, "sessions": self.sessions,
                "command": self.command, "transfer": self.transfer, "trained_by": self._trained_by()}

    def _trained_by(self, tasks: int | None = None) -> list[list[int]]:
        """For each learned task (or the first ``tasks``), the ranks that trained it ([0] in one process;
        none for the other methods and scenario NNs)."""
        return list(getattr(self.method, "trained_by", []))[:tasks]

    def adopt(self, state: dict) -> None:
        self.schedule, self.sessions = list(state["schedule"]), state["sessions"] + 1
        self.matrix = metrics.AccuracyMatrix.from_dict(state["matrix"])
        self.progress, self.scalars = state["progress"], [tuple(s) for s in state["scalars"]]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        self.command = state.get("command")
        if isinstance(self.method, SupSup):  # (checkpoints from before distribution: all by rank 0)
            self.method.trained_by = state.get("trained_by") or [[0]] * self.method.num_tasks

    def results(self, status: str, **figures) -> dict:
        config = self.config
        out = {"status": status, "command": self.command, "config": config.to_dict(), **figures,
               "tasks_done": self.saved_tasks,
               "data": self.data, "data_source": self.stream.source}
        if self.method is not None:
            out["model"] = self.method.describe()
            out["bytes_stored"] = self.method.bytes_stored()
        model = self.checkpointed()
        if model is not None:
            out.update(checkpoint={"file": CHECKPOINT, "sha256": self.checkpoint_sha256, "tasks": self.saved_tasks,
                                   **({"transfer": self.transfer} if self.transfer else {})},
                       bytes_per_task=model.bytes_per_task(), num_weights=model.num_weights(),
                       mask_bytes_per_task=model.mask_bytes_per_task(),
                       bits_per_weight=8 * model.mask_bytes_per_task() / model.num_weights())
        if self.matrix.values:
            out["accuracy_matrix"] = self.matrix.to_dict()
        return {**out, "schedule": self.schedule, "progress": self.progress,
                "kernels": kernels.describe(config.device), "seconds": self.train_seconds + self.eval_seconds,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds, "sessions": self.sessions,
                "environment": _environment(config),
                "distributed": {**self.world.describe(), "trained_by": self._trained_by(self.saved_tasks)}}

    def save_transfer(self) -> dict | None:
        """SupSup Transfer: write the running score sums as ``transfer-N.safetensors``; returns what the
        checkpoint records of it (None before any task)."""
        running = getattr(self.method, "running", None)
        if running is None or running.count == 0:
            return None
        name = TRANSFER.format(tasks=running.count)
        tensors = {k: v.detach().cpu().contiguous() for k, v in running.state_dict().items()}
        return {"file": name, "sha256": write_atomic(self.dir.path / name, safetensors_save(tensors))}

    def save(self, status: str = "running", **figures) -> dict:
        """Checkpoint (unless interrupted: then the last one stands), the CSV files, then results.json, written
        by rank 0 while the other ranks wait (not when interrupted: they may be gone)."""
        if status == "interrupted":
            return self._write(status, **figures) if self.world.writes else {}
        written = self.world.on_writer(lambda: self._write(status, **figures), "writing the checkpoint")
        if written is not None:
            return written
        self.saved_tasks = self.method.num_tasks if self.method is not None else self.config.tasks
        return self.results(status, **figures)

    def _write(self, status: str, **figures) -> dict:
        if status != "interrupted":
            if self.checkpointed() is not None:
                self.transfer = self.save_transfer()
                self.checkpoint_sha256 = self.dir.save(self.checkpointed(), self.state())
                for old in self.dir.path.glob("transfer-*.safetensors"):
                    if self.transfer is None or old.name != self.transfer["file"]:
                        old.unlink()
            self.saved_tasks = self.method.num_tasks if self.method is not None else self.config.tasks
        write_atomic(self.dir.path / METRICS, metrics.scalars_csv(self.scalars).encode())
        if self.matrix.values:
            write_atomic(self.dir.path / MATRIX, metrics.matrix_csv(self.matrix, self.config.tasks).encode())
        if "confusion" in figures:
            write_atomic(self.dir.path / CONFUSION, metrics.confusion_csv(figures["confusion"]).encode())
            figures["confusion"] = {str(t): {str(i): n for i, n in row.items()}
                                    for t, row in figures["confusion"].items()}
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
    require_same(f"{directory.checkpoint.name} and {RESULTS} configs", as_saved_now(state["config"]),
                 config.to_dict(), advice)
    require_same(f"the data of {directory.checkpoint.name} and of this run", state["data"], session.data, advice)
    try:
        load_into(session.method.model, directory.checkpoint)
    except CheckpointError as err:
        raise RunError(f"cannot resume {directory.path}: {err}") from err
    if state.get("transfer"):  # SupSup Transfer: the running sums the checkpoint was written with
        path = directory.path / state["transfer"]["file"]
        if not path.is_file() or sha256_file(path) != state["transfer"]["sha256"]:
            raise RunError(f"cannot resume {directory.path}: {path.name} is missing or is not the file the "
                           f"checkpoint was written with (sha256 differs); start again with --force")
        session.method.running.load_state_dict(load_file(str(path)), device=session.config.device)
        session.transfer = state["transfer"]
    session.adopt(state)
    session.checkpoint_sha256 = sha256_file(directory.checkpoint)
    session.saved_tasks = session.method.num_tasks


def run(config: RunConfig, out_dir: str | Path, data_root=None, log: RunLog = RunLog(), *, resume: bool = False,
        force: bool = False, tensorboard: bool = False, command: str | None = None, world: World = World()) -> dict:
    """Train and evaluate as configured into the run directory ``out_dir``; returns results.json's content.

    ``resume``: continue the run in ``out_dir`` (whose results.json must hold ``config``). Otherwise ``out_dir``
    must be empty or absent (``force``: its run files are removed first). ``tensorboard``: scalars also into
    ``out_dir/tensorboard``. ``command``: what started the run, for results.json (a resumed run keeps the first
    one). On ``KeyboardInterrupt`` (SIGINT, or SIGTERM turned into one by the CLI) what is
    finished stays saved, results.json says ``interrupted``, and the interrupt propagates.

    ``world``: the ranks of a torchrun job (``supsup.distributed.init``): SupSup's task groups and evaluation
    are dealt to them; rank 0 alone writes the run directory. A rank that fails or stops answering ends
    the run on every rank with a ``RunError`` that says how to resume."""
    check_run(config)
    if world.size > 1 and (config.scenario == "NNs" or config.method != "supsup" or config.transfer):
        raise RunError(f"only SupSup (without transfer) runs on several processes, not "
                       f"{'scenario NNs' if config.scenario == 'NNs' else config.preset or config.method}: "
                       f"run it in one process")
    directory = RunDirectory(out_dir)
    created = world.on_writer(lambda: _prepare(directory, config, resume, force), "preparing the run directory")
    torch.manual_seed(config.seed)
    kernels.retain_freed_memory()  # training re-allocates the same large tensors every step
    try:
        stream = world.writer_first(lambda: make_stream(config, data_root), "loading the data")
    except BaseException:
        if created and not any(directory.path.iterdir()):
            directory.path.rmdir()  # leave no empty run directory behind when the data cannot be read
        raise
    tensorboard = tensorboard and world.writes
    logs = Logs(log, TensorBoardLog(directory.path / TENSORBOARD) if tensorboard else None)
    try:
        session = _Run(config, directory, stream, logs, world)
        session.command = command
        if resume:
            _resume(directory, config, session)
        try:
            return _run_nns(session) if config.scenario == "NNs" else _run_tasks(session)
        except KeyboardInterrupt:
            session.save("interrupted")
            raise
        except DistributedError as err:
            session.save("interrupted")
            raise RunError(f"{err}; {tasks_saved(directory.path)} of {config.tasks} tasks are saved in "
                           f"{directory.path}; resume with: supsup run --resume {directory.path} (under torchrun, "
                           f"any number of processes)") from err
    finally:
        logs.close()


def _prepare(directory: RunDirectory, config: RunConfig, resume: bool, force: bool) -> bool:
    """Check (resume) or prepare the run directory; whether it was created now."""
    if resume:
        if (why := why_not_resumable(config)) is not None:
            raise RunError(f"{why}. Start it again with --force --out {directory.path}")
        if directory.read_results()["status"] == "complete":
            raise RunError(f"the run in {directory.path} is complete: nothing to resume (re-evaluate it with "
                           f"`supsup eval {directory.path}`)")
        directory.remove_temporaries()
        return False
    created = not directory.path.exists()
    directory.prepare(force)
    return created


def _evaluate(session: _Run) -> dict:
    """Every learned task, as the method evaluates it: a row of the accuracy matrix and a schedule entry."""
    method, log, n = session.method, session.log, session.method.num_tasks
    log.stage(f"evaluating {n} tasks ({session.config.scenario})", n)
    tick = time.perf_counter()
    figures = method.evaluate(on_task=lambda steps: log.advance(steps), on_sample=lambda steps: log.advance(steps))
    session.eval_seconds += time.perf_counter() - tick
    session.matrix.add(n, [row[headline(session.config)] for row in figures["tasks"]])
    summary = {**_summary(figures), "bytes_stored": method.bytes_stored()}
    if not session.schedule or session.schedule[-1]["num_tasks"] != n:
        session.schedule.append(summary)
    session.record(n, {f"eval/{k}": v for k, v in summary.items()
                       if k != "num_tasks" and isinstance(v, (int, float))})
    return figures


def _right_after(session: _Run, tasks: list[int]) -> None:
    """A partial row of the accuracy matrix: only the tasks just learned (cheap with the task given)."""
    tick = time.perf_counter()
    figures = session.method.evaluate(on_task=lambda steps: None, tasks=tasks)
    session.eval_seconds += time.perf_counter() - tick
    row: list[float | None] = [None] * session.method.num_tasks
    for r in figures["tasks"]:
        row[r["task"]] = r[headline(session.config)]
    session.matrix.add(session.method.num_tasks, row)


def _run_tasks(session: _Run) -> dict:
    """Train the task groups, evaluate at the schedule, checkpoint after each group, evaluate at the end."""
    config, method, log = session.config, session.method, session.log
    schedule = sorted({n for n in config.eval_at if method.num_tasks < n < config.tasks})
    total = config.tasks * config.train.batches_per_task
    if not session.saved_tasks:
        session.save()
    staged = False
    while method.num_tasks < config.tasks:
        if not staged:
            log.stage(f"training {config.tasks} tasks", total)
            log.advance(method.num_tasks * config.train.batches_per_task)
            staged = True
        loss_sum, batches, n_before = torch.zeros(()), 0, method.num_tasks

        def on_batch(steps: int, loss: torch.Tensor) -> None:
            nonlocal loss_sum, batches
            loss_sum, batches = loss_sum.to(loss.device) + loss.detach() / steps, batches + 1
            log.advance(steps, loss / steps)

        tick = time.perf_counter()
        # several ranks: a round stops at the group after which one process would evaluate next
        until = max(schedule[0], n_before + 1) if schedule else None
        new = method.train_group(on_batch, until=until) if session.world.size > 1 else method.train_group(on_batch)
        seconds = time.perf_counter() - tick
        session.train_seconds += seconds
        n, loss = method.num_tasks, float(loss_sum) / max(batches, 1)
        for key, value in (("tasks_learned", n), ("bytes_stored", method.bytes_stored()), ("train_loss", loss)):
            session.progress[key].append(value)
        session.record(n, {"train/loss": loss, "train/seconds": seconds, "bytes/stored": method.bytes_stored()})
        if schedule and n >= schedule[0]:
            schedule.pop(0)
            _evaluate(session)
            staged = False
        elif config.scenario == "GG":  # the task given: each new task right after it, for forgetting and BWT
            _right_after(session, new)
        session.save()
    figures = _evaluate(session)
    table = metrics.confusion(figures["tasks"])
    summary = metrics.summary(session.matrix)
    summary["task_inference_accuracy"] = metrics.inference_accuracy(table) if table else None
    session.record(method.num_tasks, {f"metrics/{k}": v for k, v in summary.items()})
    return session.save("complete", **figures, metrics=summary, **({"confusion": table} if table else {}))


def _run_nns(session: _Run) -> dict:
    """Scenario NNs: the stream's tasks as one unlabeled stream of batches; masks allocated by the learner;
    evaluated with inferred masks and shared labels. Saves the decision log."""
    from supsup.methods import make_model
    from supsup.nns import evaluate_nns_within, hidden_task_batches, train_nns

    config, stream, log = session.config, session.stream, session.log
    model = make_model(config, stream.num_classes)
    budget = config.nns.train_seconds
    start, streamed = time.perf_counter(), [0]

    def keep_going(done: int) -> bool:
        streamed[0] = done
        session.record(done, {"train/seconds": time.perf_counter() - start})
        return budget is None or time.perf_counter() - start < budget

    batches = hidden_task_batches(stream, config.train.batches_per_task, config.train.batch_size,
                                  keep_going=keep_going)
    log.stage(f"NNs: {config.tasks} hidden tasks, no task ids", config.tasks * config.train.batches_per_task)
    done = [0]

    def advance(batches_done: int, loss: torch.Tensor) -> None:
        log.advance(batches_done - done[0], loss)
        done[0] = batches_done

    learned = train_nns(model, batches, config.nns, on_batch=advance, train=config.train,
                        objective=config.inference.objective)
    session.nns_model = model
    session.train_seconds = time.perf_counter() - start
    write_json(session.dir.decisions, learned.to_dict())
    count = streamed[0] or config.tasks
    log.stage(f"evaluating {count} hidden tasks with inferred masks", count)
    tick = time.perf_counter()
    evaluation = evaluate_nns_within(model, stream, count, config.nns.eval_seconds, how=config.inference,
                                     seed=config.seed, on_task=lambda r: log.advance(1))
    session.eval_seconds = time.perf_counter() - tick
    figures = nns_figures(evaluation)
    session.matrix.add(count, [None] * count)
    for row in figures["tasks"]:
        session.matrix.values[-1][row["task"]] = row["accuracy_inferred"]
    table = {r.task: dict(r.inferred) for r in evaluation.tasks}
    session.record(count, {"eval/average_accuracy_inferred": figures["average_accuracy_inferred"],
                           "eval/masks": learned.num_masks})
    return session.save("complete", **figures, num_hidden_tasks=count, num_masks=learned.num_masks,
                        stopped_at_budget=learned.stopped, confusion=table,
                        model={"method": "SupSup (NNs)", "architecture": model.architecture, "seed": model.seed,
                               "rule": model.rule, "bytes_per_task": model.bytes_per_task(),
                               "num_weights": model.num_weights()},
                        bytes_stored=model.bytes_per_task() * model.num_tasks)


def nns_figures(evaluation) -> dict:
    """JSON-ready figures of an ``NNsEvaluation``: per hidden task, accuracy and which masks were inferred."""
    return {"tasks": [{"task": r.task, "accuracy_inferred": r.accuracy,
                       "inferred_masks": {str(m): n for m, n in r.inferred.items()}} for r in evaluation.tasks],
            "evaluated_tasks": evaluation.evaluated_tasks,
            "average_accuracy": None, "average_accuracy_inferred": evaluation.average_accuracy}


def reevaluate(run_dir: str | Path, config: RunConfig, data_root=None, log: RunLog = RunLog()) -> dict:
    """Evaluate a saved run's checkpoint again (possibly with other inference settings), after checking
    that results.json, the checkpoint and the rebuilt data belong together."""
    directory = RunDirectory(run_dir)
    results = directory.read_results()
    check_device(config.device)
    if config.method != "supsup":
        raise RunError(f"{directory.path} holds a run of method {config.method}, which keeps no checkpoint to "
                       f"re-evaluate: run it again to change its evaluation")
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
    require_same(f"{CHECKPOINT} and {RESULTS} configs", as_saved_now(state.get("config") or {}), saved, advice)
    architecture = {"name": config.model, "output_size": config.output_size, **architecture_kwargs(config)}
    require_same(f"{CHECKPOINT} and the model of {RESULTS}",
                 {"seed": meta["seed"], "architecture": meta["architecture"]},
                 {"seed": config.seed, "architecture": architecture}, advice)
    stream = make_stream(config, data_root)
    require_same(f"the data recorded in {RESULTS} and the data rebuilt now", results.get("data") or {},
                 describe_data(config, stream), "the data or the random generator changed since the run")
    model = load_checkpoint(directory.checkpoint, device=config.device)
    model.num_classes = stream.num_classes
    started = time.perf_counter()
    if config.scenario == "NNs":
        from supsup.nns import evaluate_nns

        log.stage(f"evaluating {config.tasks} hidden tasks", config.tasks)
        evaluation = evaluate_nns(model, stream, config.inference, seed=config.seed,
                                  on_task=lambda r: log.advance(1))
        figures = {**nns_figures(evaluation), "num_hidden_tasks": config.tasks, "num_masks": model.num_tasks}
    else:
        method = SupSup(config, stream)
        method.model = model
        log.stage(f"evaluating {model.num_tasks} tasks ({config.scenario})", model.num_tasks)
        figures = method.evaluate(on_task=lambda steps: log.advance(steps), on_sample=lambda s: log.advance(s))
    return {"config": config.to_dict(), **figures, "bytes_per_task": model.bytes_per_task(),
            "checkpoint": {"file": CHECKPOINT, "sha256": actual, "tasks": model.num_tasks},
            "kernels": kernels.describe(config.device), "seconds": time.perf_counter() - started}


def tasks_saved(run_dir: str | Path) -> int:
    """Learned tasks in a run directory's checkpoint (0 when none was written yet)."""
    checkpoint = RunDirectory(run_dir).checkpoint
    return read_metadata(checkpoint)["num_tasks"] if checkpoint.is_file() else 0
