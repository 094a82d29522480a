"""The ``supsup`` command: run a preset, re-evaluate a saved run, list presets, fetch data.

Every failure a user can cause ends with one line on stderr, ``error: what is wrong; what to do``, and
exit status 1 (2 for a usage error). An interrupted run (SIGINT: 130, SIGTERM: 143) says what is saved
and the command that resumes it.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from supsup.evaluation import SCENARIOS
from supsup.inference import GRANULARITIES, METHODS, OBJECTIVES
from supsup.presets import PRESETS, RunConfig, get_preset

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Supermasks in Superposition: learn many tasks with binary masks on a frozen random network.")
console = Console()
errors = Console(stderr=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops the way it does on Ctrl-C."""


def fail(message: str, code: int = 1, label: str = "error") -> typer.Exit:
    """Print ``error: message`` as one line on stderr; returns the exit to raise."""
    errors.print(Text.assemble((f"{label}: ", "bold red"), message), soft_wrap=True, highlight=False)
    return typer.Exit(code)


def usage(message: str) -> typer.Exit:
    return fail(message, 2)


def _choices(name: str, values) -> type[Enum]:
    """A CLI choice type whose values are the library's own constants (one source of truth)."""
    return Enum(name, {v: v for v in values}, type=str)


Model = _choices("Model", ("fc1024", "lenet"))
Scenario = _choices("Scenario", (*SCENARIOS, "NNs"))
Method = _choices("Method", METHODS)
Objective = _choices("Objective", OBJECTIVES)
Granularity = _choices("Granularity", GRANULARITIES)


DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Data root (default: $SUPSUP_DATA or ~/.cache/supsup).")]
Device = Annotated[Optional[str], typer.Option("--device", help="torch device, e.g. cpu or cuda.")]


def _apply_overrides(config: RunConfig, **overrides) -> RunConfig:
    train = {k: overrides.pop(k) for k in ("batches_per_task", "tasks_at_once") if overrides.get(k) is not None}
    inference = {k: overrides.pop(k) for k in ("method", "objective", "granularity", "steps") if overrides.get(k) is not None}
    top = {k: (v.value if isinstance(v, Enum) else v) for k, v in overrides.items() if v is not None}
    inference = {k: (v.value if isinstance(v, Enum) else v) for k, v in inference.items()}
    data = dataclasses.asdict(config)
    data.update(top)
    data["train"].update(train)
    data["inference"].update(inference)
    data["eval_at"] = [n for n in data["eval_at"] if n <= data["tasks"]]
    return RunConfig.from_dict(data)  # validates the settings together (e.g. objective against output size)


class _Bar:
    """Adapts experiment progress callbacks to a rich progress bar."""

    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def stage(self, description: str, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, steps: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, steps)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


@contextmanager
def _clear_errors():
    """Bad input (data, checkpoint, settings, files) ends the command with its message, not a traceback."""
    import torch

    from supsup.checkpoint import CheckpointError
    from supsup.data.sources import DataError
    from supsup.experiment import RunError

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise fail(f"out of memory: {str(err).splitlines()[0]}; use fewer --tasks-at-once or a smaller model") from err
    except (DataError, CheckpointError, RunError, ValueError, IndexError) as err:
        raise fail(str(err)) from err
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        raise fail(f"cannot use{where}: {err.strerror or err}") from err


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _columns(scenario: str) -> list[tuple[str, str]]:
    """(header, key) of the per-task table for a scenario."""
    if scenario == "GG":
        return [("accuracy (task given)", "accuracy")]
    if scenario == "NNs":
        return [("accuracy (masks inferred, shared labels)", "accuracy_inferred"), ("masks used", "inferred_masks")]
    return [("accuracy (task given)", "accuracy"), ("task-inference accuracy", "task_inference_accuracy"),
            ("accuracy (task inferred)", "accuracy_inferred")]


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{m}: {n}" for m, n in value.items())
    return _fmt(value)


def print_results(results: dict) -> None:
    """The final table: per task, accuracy with the task given and inferred, and the averages."""
    config = results["config"]
    inf, scenario = config["inference"], config["scenario"]
    title = (f"{config['preset']}: {config['benchmark']}, {config['model']} (s={config['output_size']}), "
             f"scenario {scenario}")
    if scenario != "GG":
        title += f", {inf['method']} / {inf['objective']} / {inf['granularity']}"
    columns = _columns(scenario)
    table = Table(title=title)
    table.add_column("hidden task" if scenario == "NNs" else "task", justify="right")
    for header, _ in columns:
        table.add_column(header, justify="right")
    rows = results["tasks"]
    shown = rows if len(rows) <= 30 else rows[:10] + [None] + rows[-10:]
    for row in shown:
        if row is None:
            table.add_row("…", *["…"] * len(columns))
        else:
            table.add_row(str(row["task"]), *[_cell(row.get(key)) for _, key in columns])
    averages = {"accuracy": results.get("average_accuracy"),
                "task_inference_accuracy": results.get("average_task_inference_accuracy"),
                "accuracy_inferred": results.get("average_accuracy_inferred")}
    table.add_row("mean", *[_fmt(averages.get(key)) for _, key in columns], style="bold")
    console.print(table)
    if scenario == "NNs":
        console.print(f"NNs: {results['num_masks']} masks allocated for {results['num_hidden_tasks']} hidden tasks "
                      f"(decision log: nns_decisions.json)")
    if "mixed_stream" in results:
        m = results["mixed_stream"]
        console.print(f"mixed stream ({m['samples']} samples of all tasks shuffled): accuracy with tasks given "
                      f"{m['accuracy_given']:.4f}, per-sample task inference {m['task_inference_accuracy']:.4f}, "
                      f"accuracy with tasks inferred {m['accuracy_inferred']:.4f}")
    if "bytes_per_task" in results:
        extra = f" ({results['bits_per_weight']:.3f} bits per weight)" if "bits_per_weight" in results else ""
        console.print(f"masks stored: {results['bytes_per_task']:,} bytes per task{extra}")
    if "seconds" in results:
        console.print(f"time: {results['seconds']:.1f} s")


def _check_options(config: RunConfig, given: dict) -> None:
    """Options that the resolved scenario would silently ignore are usage errors."""
    inference = [k for k in ("inference", "objective", "granularity", "steps") if given.get(k) is not None]
    if config.scenario == "GG" and inference:
        raise usage(f"--{inference[0]} has no effect in scenario GG (the task is given at test time): drop it, or "
                    f"choose --scenario GNu or GNs")
    if given.get("steps") is not None and config.inference.method != "gradient":
        raise usage("--steps only applies to --inference gradient")
    if config.scenario == "NNs" and given.get("tasks_at_once") is not None:
        raise usage("--tasks-at-once has no effect in scenario NNs (there are no task boundaries)")


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _interrupted(out: Path, err: KeyboardInterrupt) -> typer.Exit:
    from supsup.experiment import RunDirectory, RunError

    code = 143 if isinstance(err, Terminated) else 130
    what = "terminated" if code == 143 else "interrupted"
    try:
        results = RunDirectory(out).read_results()
    except RunError:
        results = None
    if results is None or results["config"].get("scenario") == "NNs":
        return fail(f"nothing resumable was saved in {out}; start again with --force --out {out}", code, what)
    done, total = results["tasks_done"], results["config"]["tasks"]
    return fail(f"{done} of {total} tasks are saved in {out}; resume with: supsup run --resume {out}", code, what)


@app.command()
def run(
    preset: Annotated[Optional[str], typer.Argument(help="Preset name (see `supsup presets`).")] = None,
    tasks: Annotated[Optional[int], typer.Option(help="Number of tasks.")] = None,
    batches_per_task: Annotated[Optional[int], typer.Option(help="Training batches per task.")] = None,
    model: Annotated[Optional[Model], typer.Option(help="Network.")] = None,
    output_size: Annotated[Optional[int], typer.Option(help="Outputs (classes + superfluous neurons).")] = None,
    scenario: Annotated[Optional[Scenario], typer.Option(
        help="GG (task given), GNs or GNu (task inferred), NNs (no task ids at all).")] = None,
    inference: Annotated[Optional[Method], typer.Option("--inference", help="Task-inference method.")] = None,
    objective: Annotated[Optional[Objective], typer.Option(help="Task-inference objective.")] = None,
    granularity: Annotated[Optional[Granularity], typer.Option(help="One inference per image, batch or sample.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps of the gradient inference method.")] = None,
    tasks_at_once: Annotated[Optional[int], typer.Option(help="Tasks trained together as one batched computation.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, scores, permutations and batch order.")] = None,
    small: Annotated[bool, typer.Option("--small", help="Use the preset's scaled-down CPU form.")] = False,
    device: Device = None,
    data_root: DataRoot = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/PRESET-TIME); must be "
                                                              "empty or absent.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory after its "
                                                                    "last finished task.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the run files in a non-empty --out.")] = False,
) -> None:
    """Train on a preset's task stream, evaluate, print a table, and save results.json + model.safetensors
    (the checkpoint is written after every task group, so an interrupted run can be resumed)."""
    from supsup import kernels
    from supsup.experiment import Progress as Callbacks, RunDirectory, RunError, check_run, run as run_experiment

    given = dict(tasks=tasks, batches_per_task=batches_per_task, model=model, output_size=output_size,
                 scenario=scenario, method=inference, objective=objective, granularity=granularity, steps=steps,
                 tasks_at_once=tasks_at_once, seed=seed)
    if resume is not None:
        changed = [k for k, v in given.items() if v is not None] + (["small"] if small else []) + \
            (["out"] if out is not None else []) + (["force"] if force else [])
        if preset is not None or changed:
            what = "a preset" if preset is not None else f"--{changed[0].replace('_', '-')}"
            raise usage(f"--resume continues a run with its own settings ({resume}/results.json): {what} cannot "
                        f"be given with it (only --device and --data-root)")
        try:
            config = RunDirectory(resume).config()
        except RunError as err:
            raise fail(str(err)) from err
        if device is not None:
            config.device = device
        out = resume
    else:
        if preset is None:
            raise usage("give a preset (see `supsup presets`) or --resume RUN_DIR")
        try:
            config = _apply_overrides(get_preset(preset, small=small), **given, device=device)
        except (KeyError, ValueError) as err:
            raise usage(str(err.args[0] if err.args else err)) from err
        _check_options(config, {**given, "inference": inference})
        out = out or Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _clear_errors():
        check_run(config)
        backend = kernels.describe(config.device)
    console.print(f"[bold]{config.description or config.preset}[/bold]\n{config.tasks} tasks × "
                  f"{config.train.batches_per_task} batches of {config.train.batch_size}, device {config.device}, "
                  f"seed {config.seed} → {out}" + (" (resumed)" if resume is not None else ""), highlight=False)
    console.print(f"kernels: {backend['backend']}" + (f" ({backend['reason']})" if "reason" in backend else ""),
                  highlight=False)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with _progress() as progress, _clear_errors():
            bar = _Bar(progress)
            results = run_experiment(config, out, data_root, Callbacks(bar.stage, bar.advance),
                                     resume=resume is not None, force=force)
    except KeyboardInterrupt as err:
        raise _interrupted(out, err) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(f"data: {results['data_source']}")
    print_results(results)
    console.print(f"saved {out / 'results.json'} and {out / 'model.safetensors'}")


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `supsup run`.")],
    scenario: Annotated[Optional[Scenario], typer.Option(help="Override the scenario.")] = None,
    inference: Annotated[Optional[Method], typer.Option("--inference")] = None,
    objective: Annotated[Optional[Objective], typer.Option()] = None,
    granularity: Annotated[Optional[Granularity], typer.Option()] = None,
    steps: Annotated[Optional[int], typer.Option()] = None,
    mixed_per_task: Annotated[Optional[int], typer.Option(
        help="With --granularity sample: test samples per task in the mixed stream (default all); "
             "per-task figures are then the task-given accuracies only.")] = None,
    device: Device = None,
    data_root: DataRoot = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write the JSON (default RUN_DIR/eval-*.json).")] = None,
) -> None:
    """Re-evaluate a saved run from its checkpoint (optionally with other inference settings), after
    checking that the checkpoint, results.json and the rebuilt data belong together."""
    from supsup.experiment import Progress as Callbacks, RunDirectory, RunError, reevaluate
    from supsup.files import write_json

    directory = RunDirectory(run_dir)
    try:
        config = directory.config()
    except RunError as err:
        raise fail(str(err)) from err
    try:
        config = _apply_overrides(config, scenario=scenario, method=inference, objective=objective,
                                  granularity=granularity, steps=steps, device=device, mixed_per_task=mixed_per_task)
    except ValueError as err:
        raise usage(str(err)) from err
    _check_options(config, dict(inference=inference, objective=objective, granularity=granularity, steps=steps))
    if mixed_per_task is not None and config.inference.granularity != "sample":
        raise usage("--mixed-per-task only applies to --granularity sample")
    inf = config.inference
    target = out or run_dir / f"eval-{config.scenario}-{inf.method}-{inf.objective}-{inf.granularity}.json"
    inputs = [directory.results, directory.checkpoint, directory.decisions]
    if target.is_dir() or any(target.exists() and f.exists() and target.samefile(f) for f in inputs):
        raise usage(f"--out {target} is {'a directory' if target.is_dir() else 'an input of this command'}: "
                    f"choose another file")
    with _progress() as progress, _clear_errors():
        bar = _Bar(progress)
        results = reevaluate(run_dir, config, data_root, Callbacks(bar.stage, bar.advance))
    print_results(results)
    with _clear_errors():
        write_json(target, results)
    console.print(f"saved {target}")


@app.command()
def presets() -> None:
    """List the presets (the paper's experiments) and their scaled-down CPU forms."""
    table = Table(title="presets (add --small for the scaled-down CPU form)")
    for column in ("name", "tasks", "model", "s", "scenario / inference", "description"):
        table.add_column(column)
    for name in PRESETS:
        c = get_preset(name)
        table.add_row(name, f"{c.tasks} (small: {get_preset(name, small=True).tasks})", c.model, str(c.output_size),
                      f"{c.scenario} {c.inference.method}/{c.inference.objective}/{c.inference.granularity}",
                      c.description)
    console.print(table)


@app.command()
def fetch(data_root: DataRoot = None) -> None:
    """Fetch and verify MNIST into the data root; says which source served."""
    from supsup.data.sources import MNIST, data_root as resolve, ensure_dataset

    with _clear_errors():
        folder, source = ensure_dataset(MNIST, resolve(data_root))
    console.print(f"MNIST verified in {folder} (source: {source})")


@app.command()
def bench(
    device: Annotated[str, typer.Option("--device", help="torch device: cpu or cuda.")] = "cpu",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: under a minute on 2 CPU cores.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's).")] = None,
    retain_memory: Annotated[bool, typer.Option(help="Keep freed CPU memory in the heap (glibc mallopt).")] = True,
) -> None:
    """Speed and memory of training and One-Shot inference, each as a ratio to the dense computation."""
    import torch

    from supsup.bench import run_benchmarks

    if threads is not None:
        torch.set_num_threads(threads)
    run_benchmarks(device, quick=quick, json_path=json_path, console=console, retain_memory=retain_memory)
    if json_path is not None:
        console.print(f"saved {json_path}")


def main(argv: list[str] | None = None) -> int:
    """The console entry point: runs the command and returns its exit status. A usage error (typer's
    parser errors included) prints one line and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=argv or ["--help"], prog_name="supsup", standalone_mode=False)
    except typer.TyperException as err:  # the parser's errors: unknown option, bad value, missing argument
        ctx = getattr(err, "ctx", None)
        command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
        fail(f"{err.format_message()} (see: supsup{command} --help)", err.exit_code)
        return err.exit_code
    except typer.Abort:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
