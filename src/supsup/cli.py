"""The ``supsup`` command: run a preset or a config file, re-evaluate a saved run, report on runs, list and show
presets, fetch data, benchmark.

Every failure a user can cause ends with one line on stderr, ``error: what is wrong; what to do``, and
exit status 1 (2 for a usage error). An interrupted run (SIGINT: 130, SIGTERM: 143) says what is saved
and the command that resumes it.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from supsup.config import MODELS, RunConfig, merge, parse_setting
from supsup.evaluation import SCENARIOS
from supsup.inference import GRANULARITIES, METHODS, OBJECTIVES
from supsup.learners import OPTIMIZERS
from supsup.presets import get_preset, has_small, preset_names, read_config_file

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Supermasks in Superposition: learn many tasks with binary masks on a frozen random network.")
presets_app = typer.Typer(help="The paper's experiments as presets (TOML files shipped with supsup).")
app.add_typer(presets_app, name="presets")
console = Console()
errors = Console(stderr=True)
invocation: list[str] = []  # the arguments of the running command (recorded in results.json)
rank_label = ""  # " (rank r)" on the ranks other than 0 of a torchrun job


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops the way it does on Ctrl-C."""


def fail(message: str, code: int = 1, label: str = "error") -> typer.Exit:
    """Print ``error: message`` as one line on stderr; returns the exit to raise."""
    errors.print(Text.assemble((f"{label}{rank_label}: ", "bold red"), message), soft_wrap=True, highlight=False)
    return typer.Exit(code)


def usage(message: str) -> typer.Exit:
    return fail(message, 2)


def _choices(name: str, values) -> type[Enum]:
    """A CLI choice type whose values are the library's own constants (one source of truth)."""
    return Enum(name, {v: v for v in values}, type=str)


Model = _choices("Model", MODELS)
Scenario = _choices("Scenario", (*SCENARIOS, "NNs"))
Method = _choices("Method", METHODS)
Objective = _choices("Objective", OBJECTIVES)
Granularity = _choices("Granularity", GRANULARITIES)
Optimizer = _choices("Optimizer", OPTIMIZERS)

DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Data root (default: $SUPSUP_DATA or ~/.cache/supsup).")]
Device = Annotated[Optional[str], typer.Option("--device", help="torch device, e.g. cpu or cuda.")]


def _value(v):
    return v.value if isinstance(v, Enum) else v


def _flag_changes(**flags) -> dict:
    """The config changes that command-line flags ask for, as a nested table (flags not given left out)."""
    sections = {"train": ("batches_per_task", "tasks_at_once", "lr", "optimizer", "batch_size"),
                "inference": ("method", "objective", "granularity", "steps"),
                "nns": ("train_seconds", "eval_seconds")}
    changes: dict = {}
    for key, value in flags.items():
        if value is None:
            continue
        section = next((name for name, keys in sections.items() if key in keys), None)
        target = changes.setdefault(section, {}) if section else changes
        target[key] = _value(value)
    return changes


def apply_changes(config: RunConfig, settings: list[str], flags: dict) -> RunConfig:
    """``config`` with the ``--set`` settings, then the flags, merged in; validated together (``ValueError``
    naming the field). Evaluation points past a new task count are dropped (the end is always evaluated)."""
    changes: dict = {}
    for setting in settings:
        changes = merge(changes, parse_setting(setting))
    changes = merge(changes, _flag_changes(**flags))
    data = merge(config.to_dict(), changes)
    if isinstance(data.get("eval_at"), list) and isinstance(data.get("tasks"), int) and "eval_at" not in changes:
        data["eval_at"] = [n for n in data["eval_at"] if not isinstance(n, int) or n <= data["tasks"]]
    return RunConfig.from_dict(data)


@contextmanager
def _clear_errors():
    """Bad input (data, checkpoint, settings, files) ends the command with its message, not a traceback."""
    import torch

    from supsup.checkpoint import CheckpointError
    from supsup.data.sources import DataError
    from supsup.distributed import DistributedError
    from supsup.rundir import RunError

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise fail(f"out of memory: {str(err).splitlines()[0]}; use fewer --tasks-at-once or a smaller model") from err
    except (DataError, CheckpointError, RunError, DistributedError, ValueError, IndexError, ImportError) as err:
        raise fail(str(err)) from err
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        raise fail(f"cannot use{where}: {err.strerror or err}") from err


def _logs(live: bool = True):
    """A progress bar on a terminal, plain lines otherwise."""
    from supsup.loggers import LineLog, ProgressBar

    return ProgressBar(console) if live and console.is_terminal else LineLog(console)


def print_results(results: dict) -> None:
    """The final table (per task, accuracy with the task given and inferred, and the means) and the metrics."""
    from supsup.tables import fmt, results_table

    config = RunConfig.from_dict(results["config"])
    console.print(config.summary(), highlight=False, soft_wrap=True)
    console.print(results_table(results))
    m = results.get("metrics")
    if m:
        console.print(f"average accuracy {fmt(m['average_accuracy'])}, forgetting {fmt(m['forgetting'])}, "
                      f"backward transfer {fmt(m['backward_transfer'])}"
                      + (f", task inference {fmt(m['task_inference_accuracy'])}"
                         if m.get("task_inference_accuracy") is not None else ""), highlight=False, soft_wrap=True)
    if config.scenario == "NNs":
        console.print(f"NNs: {results['num_masks']} masks allocated for {results['num_hidden_tasks']} hidden tasks "
                      f"(decision log: nns_decisions.json)")
    if "mixed_stream" in results:
        m = results["mixed_stream"]
        console.print(f"mixed stream ({m['samples']} samples of all tasks shuffled): accuracy with tasks given "
                      f"{m['accuracy_given']:.4f}, per-sample task inference {m['task_inference_accuracy']:.4f}, "
                      f"accuracy with tasks inferred {m['accuracy_inferred']:.4f}")
    if "bytes_per_task" in results:
        extra = f" ({results['bits_per_weight']:.3f} bits per weight)" if "bits_per_weight" in results else ""
        floats = results["bytes_per_task"] - results.get("mask_bytes_per_task", results["bytes_per_task"])
        extra += f", plus {floats:,} bytes of per-task floats (BatchNorm statistics, biases)" if floats else ""
        console.print(f"masks stored: {results.get('mask_bytes_per_task', results['bytes_per_task']):,} bytes per "
                      f"task{extra}")
    elif "bytes_stored" in results:
        console.print(f"stored: {results['bytes_stored']:,} bytes for {len(results['tasks'])} tasks")
    if "seconds" in results:
        console.print(f"time: {results['seconds']:.1f} s")


def _check_options(config: RunConfig, given: dict) -> None:
    """Options that the resolved config would silently ignore are usage errors."""
    inference = [k for k in ("inference", "objective", "granularity", "steps") if given.get(k) is not None]
    if config.scenario == "GG" and inference:
        raise usage(f"--{inference[0]} has no effect in scenario GG (the task is given at test time): drop it, or "
                    f"choose --scenario GNu or GNs")
    if given.get("steps") is not None and config.inference.method != "gradient":
        raise usage("--steps only applies to --inference gradient")
    if given.get("tasks_at_once") is not None and (config.scenario == "NNs" or config.method != "supsup"):
        where = "scenario NNs (there are no task boundaries)" if config.scenario == "NNs" else \
            f"method {config.method} (it learns one task at a time)"
        raise usage(f"--tasks-at-once has no effect in {where}")
    for flag in ("train_seconds", "eval_seconds"):
        if given.get(flag) is not None and config.scenario != "NNs":
            raise usage(f"--{flag.replace('_', '-')} only applies to scenario NNs")


def _join(config: RunConfig):
    """This process's place in a torchrun job (``supsup.distributed.World``; one process without torchrun).
    Only rank 0 prints, except errors, which every rank prints with its rank."""
    from supsup import distributed

    global rank_label
    world = distributed.init(config.device)
    console.quiet = not world.writes
    rank_label = "" if world.writes else f" (rank {world.rank})"
    return world


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _interrupted(out: Path, err: KeyboardInterrupt) -> typer.Exit:
    from supsup.checks import why_not_resumable
    from supsup.rundir import RunDirectory, RunError

    code = 143 if isinstance(err, Terminated) else 130
    what = "terminated" if code == 143 else "interrupted"
    try:
        results = RunDirectory(out).read_results()
        config = RunConfig.from_dict(results["config"])
    except (RunError, ValueError):
        return fail(f"nothing was saved in {out}; start again with --force --out {out}", code, what)
    if why_not_resumable(config) is not None:
        return fail(f"{why_not_resumable(config)}; start again with --force --out {out}", code, what)
    done, total = results["tasks_done"], results["config"]["tasks"]
    return fail(f"{done} of {total} tasks are saved in {out}; resume with: supsup run --resume {out}", code, what)


def _load(source: str, small: bool) -> RunConfig:
    """A preset by name, or a config file (``.toml``, or a run's ``results.json``)."""
    path = Path(source)
    if path.suffix in (".toml", ".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        return read_config_file(path, small)
    return get_preset(source, small=small)


@app.command()
def run(
    preset: Annotated[Optional[str], typer.Argument(
        help="A preset name (see `supsup presets`), a config file FILE.toml, or a run's results.json.")] = None,
    settings: Annotated[list[str], typer.Option(
        "--set", help="Change any setting: section.key=value, e.g. --set train.lr=1e-3 (repeatable).")] = [],
    tasks: Annotated[Optional[int], typer.Option(help="Number of tasks.")] = None,
    batches_per_task: Annotated[Optional[int], typer.Option(help="Training batches per task.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help="Optimiser.")] = None,
    model: Annotated[Optional[Model], typer.Option(help="Network.")] = None,
    output_size: Annotated[Optional[int], typer.Option(help="Outputs (classes + superfluous neurons).")] = None,
    scenario: Annotated[Optional[Scenario], typer.Option(
        help="GG (task given), GNs or GNu (task inferred), NNs (no task ids at all).")] = None,
    inference: Annotated[Optional[Method], typer.Option("--inference", help="Task-inference method.")] = None,
    objective: Annotated[Optional[Objective], typer.Option(help="Task-inference objective.")] = None,
    granularity: Annotated[Optional[Granularity], typer.Option(help="One inference per image, batch or sample.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps of the gradient inference method.")] = None,
    tasks_at_once: Annotated[Optional[int], typer.Option(help="Tasks trained together as one batched computation.")] = None,
    train_seconds: Annotated[Optional[float], typer.Option(
        help="NNs: end the stream at the first hidden-task boundary after this many seconds of training.")] = None,
    eval_seconds: Annotated[Optional[float], typer.Option(
        help="NNs: evaluate an evenly spaced subset of the streamed tasks that fits this many seconds.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, scores, permutations and batch order.")] = None,
    small: Annotated[bool, typer.Option("--small", help="Use the preset's scaled-down CPU form.")] = False,
    device: Device = None,
    data_root: DataRoot = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/PRESET-TIME); must be "
                                                              "empty or absent.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory after its "
                                                                    "last finished task.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the run files in a non-empty --out.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log TensorBoard scalars into "
                                                                    "RUN/tensorboard (supsup[tensorboard]).")] = False,
) -> None:
    """Train and evaluate a preset or a config file into a run directory.

    The run directory holds results.json, metrics.csv, accuracy_matrix.csv and, for SupSup, model.safetensors (a
    checkpoint after every task group, so an interrupted run can be resumed)."""
    from supsup import distributed, kernels
    from supsup.checks import check_run
    from supsup.experiment import run as run_experiment
    from supsup.rundir import RunDirectory, RunError

    given = dict(tasks=tasks, batches_per_task=batches_per_task, batch_size=batch_size, lr=lr, optimizer=optimizer,
                 model=model, output_size=output_size, scenario=scenario, method=inference, objective=objective,
                 granularity=granularity, steps=steps, tasks_at_once=tasks_at_once, train_seconds=train_seconds,
                 eval_seconds=eval_seconds, seed=seed)
    if resume is not None:
        changed = [k for k, v in given.items() if v is not None] + (["small"] if small else []) + \
            (["out"] if out is not None else []) + (["force"] if force else []) + (["set"] if settings else [])
        if preset is not None or changed:
            what = "a preset" if preset is not None else f"--{changed[0].replace('_', '-')}"
            raise usage(f"--resume continues a run with its own settings ({resume}/results.json): {what} cannot "
                        f"be given with it (only --device, --data-root and --tensorboard)")
        try:
            config = RunDirectory(resume).config()
        except RunError as err:
            raise fail(str(err)) from err
        if device is not None:
            config.device = device
        out = resume
    else:
        if preset is None:
            raise usage("give a preset (see `supsup presets`), a config file, or --resume RUN_DIR")
        try:
            config = apply_changes(_load(preset, small), settings, {**given, "device": device})
        except (KeyError, ValueError) as err:
            raise usage(str(err.args[0] if err.args else err)) from err
        except OSError as err:
            raise fail(f"cannot read {preset}: {err.strerror or err}") from err
        _check_options(config, {**given, "inference": inference})
        out = out or Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _clear_errors():
        world = _join(config)  # first: it makes this rank's GPU the current device
        out = world.broadcast_object(out, "agreeing on the run directory")
        check_run(config)
        backend = kernels.describe(config.device)
    t = config.train
    console.print(f"[bold]{config.summary()}[/bold]\n{t.batches_per_task} batches of {t.batch_size} per task, "
                  f"{t.optimizer} lr {t.lr:g}, device {config.device}, seed {config.seed} → {out}"
                  + (" (resumed)" if resume is not None else ""), highlight=False, soft_wrap=True)
    console.print(f"kernels: {backend['backend']}" + (f" ({backend['reason']})" if "reason" in backend else ""),
                  highlight=False)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with _clear_errors():
            results = run_experiment(config, out, data_root, _logs(), resume=resume is not None, force=force,
                                     tensorboard=tensorboard, command=shlex.join(["supsup", *invocation]),
                                     world=world)
    except KeyboardInterrupt as err:
        raise _interrupted(out, err) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.close(world)
    console.print(f"data: {results['data_source']}")
    print_results(results)
    console.print(f"saved the run in {out}/; figures: supsup report {out}")


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
    """Re-evaluate a saved run from its checkpoint, optionally with other inference settings.

    The checkpoint, results.json and the rebuilt data are checked to belong together first."""
    from supsup.experiment import reevaluate
    from supsup.files import write_json
    from supsup.rundir import RunDirectory, RunError

    directory = RunDirectory(run_dir)
    try:
        config = directory.config()
    except RunError as err:
        raise fail(str(err)) from err
    try:
        config = apply_changes(config, [], dict(scenario=scenario, method=inference, objective=objective,
                                                granularity=granularity, steps=steps, device=device,
                                                mixed_per_task=mixed_per_task))
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
    with _clear_errors():
        log = _logs()
        try:
            results = reevaluate(run_dir, config, data_root, log)
        finally:
            log.close()
    print_results(results)
    with _clear_errors():
        write_json(target, results)
    console.print(f"saved {target}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several overlay: H vs G, methods; runs that "
                                                    "differ only in seed are shown as mean ± std).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for report.md and the figures (default: "
                                                              "RUN/report for one run, else report/).")] = None,
) -> None:
    """Figures (PNG and SVG) of finished runs beside the paper's numbers, and a report.md that embeds them."""
    from supsup.report import write_report

    target = out or (runs[0] / "report" if len(runs) == 1 else Path("report"))
    with _clear_errors():
        written = write_report(runs, target)
    console.print(f"wrote {target / 'report.md'} with {len(written)} figures ({', '.join(written)})", soft_wrap=True)


@presets_app.callback(invoke_without_command=True)
def presets(ctx: typer.Context) -> None:
    """List the presets; `supsup presets show NAME` prints one as TOML, to copy, edit and run."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.padding import Padding

    from supsup.tables import make_table

    rows = []
    for name in preset_names():
        small = f"{get_preset(name, small=True).tasks} tasks" if has_small(name) else "—"
        rows.append((name, small, get_preset(name).summary()))
    head = "presets (--small: the scaled-down CPU form; `supsup presets show NAME` prints one as TOML)"
    if console.width >= 120:
        table = make_table(["name", "--small", "what it runs"], rows, title=head)
        table.columns[0].no_wrap = table.columns[1].no_wrap = True
        console.print(table)
        return
    console.print(head, soft_wrap=False)  # narrow: a list, every name whole on its own line
    for name, small, what in rows:
        console.print(Text(name, style="bold"), no_wrap=True, overflow="ignore", crop=False)
        console.print(Padding(Text(what + (f"; --small: {small}" if small != "—" else "")), (0, 0, 0, 4)),
                      highlight=False)


@presets_app.command("show")
def show_preset(
    name: Annotated[str, typer.Argument(help="A preset name (see `supsup presets`).")],
    small: Annotated[bool, typer.Option("--small", help="Show the scaled-down CPU form.")] = False,
) -> None:
    """Print a preset as TOML: every setting, resolved. Save it, edit it and run it with `supsup run FILE.toml`."""
    try:
        config = get_preset(name, small=small)
    except (KeyError, ValueError) as err:
        raise usage(str(err.args[0] if err.args else err)) from err
    sys.stdout.write(f"# {config.summary()}\n# supsup run FILE.toml runs an edited copy of this file.\n")
    sys.stdout.write(config.to_toml())


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


def _version(value: bool) -> None:
    if value:
        from supsup import __version__

        console.print(f"supsup {__version__}")
        raise typer.Exit()


@app.callback()
def _main(_: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False) -> None:
    """Supermasks in Superposition: learn many tasks with binary masks on a frozen random network."""


def main(argv: list[str] | None = None) -> int:
    """The console entry point: runs the command and returns its exit status. A usage error (typer's
    parser errors included) prints one line and returns 2."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    invocation[:] = argv
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
