"""What a run reports while it runs. The run loop calls a ``RunLog``; the CLI picks the ones to use:

- ``ProgressBar`` on a terminal: a rich progress bar with the running training loss;
- ``LineLog`` otherwise (a pipe, a file, CI): one line when a stage starts and one per logged step (task group
  or evaluation), so a log file shows progress;
- ``TensorBoardLog`` with ``--tensorboard``: every scalar as a TensorBoard scalar (needs ``supsup[tensorboard]``).

Every scalar also goes to the run directory's ``metrics.csv`` (written by the run itself, whatever the logs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunLog:
    """Events of a run; every method does nothing here."""

    def stage(self, description: str, total: int) -> None:
        """A stage of ``total`` steps starts (training: batches of every task; evaluation: tasks or samples)."""

    def advance(self, steps: int, loss: torch.Tensor | None = None) -> None:
        """``steps`` steps done; ``loss``: the latest training loss (0-dim; read only when shown)."""

    def scalars(self, tasks_learned: int, values: dict[str, float]) -> None:
        """Scalars measured after ``tasks_learned`` tasks, e.g. ``train/loss`` or ``eval/average_accuracy``."""

    def close(self) -> None:
        """The run ended (completed, failed or interrupted)."""


class Logs(RunLog):
    """Several logs as one."""

    def __init__(self, *logs: RunLog):
        self.logs = [log for log in logs if log is not None]

    def add(self, log: RunLog) -> None:
        self.logs.append(log)

    def stage(self, description, total):
        for log in self.logs:
            log.stage(description, total)

    def advance(self, steps, loss=None):
        for log in self.logs:
            log.advance(steps, loss)

    def scalars(self, tasks_learned, values):
        for log in self.logs:
            log.scalars(tasks_learned, values)

    def close(self):
        for log in self.logs:
            log.close()


class ProgressBar(RunLog):
    """A rich progress bar per stage, with the running loss (an exponential mean over batches, read from the
    device every ``every`` advances so a GPU run is not synchronised at every batch)."""

    def __init__(self, console: Console, every: int = 20):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.progress.start()
        self.task, self.every, self.calls, self.loss = None, every, 0, None

    def stage(self, description, total):
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task, self.loss = self.progress.add_task(description, total=total, loss=""), None

    def advance(self, steps, loss=None):
        if self.task is None:
            return
        self.calls += 1
        shown = {}
        if loss is not None and self.calls % self.every == 0:
            value = float(loss)
            self.loss = value if self.loss is None else 0.9 * self.loss + 0.1 * value
            shown = {"loss": f"loss {self.loss:.4f}"}
        self.progress.update(self.task, advance=steps, **shown)

    def close(self):
        self.progress.stop()


class LineLog(RunLog):
    """Plain lines for output that is not a terminal."""

    def __init__(self, console: Console):
        self.console = console

    def stage(self, description, total):
        self.console.print(f"{description} ({total:,} steps)", highlight=False, soft_wrap=True)

    def scalars(self, tasks_learned, values):
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        self.console.print(f"  after {tasks_learned} task{'s' * (tasks_learned != 1)}: {shown}", highlight=False,
                           soft_wrap=True)


class TensorBoardLog(RunLog):
    """TensorBoard scalars in ``folder`` (step = tasks learned); a resumed run adds another event file."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch raises this when the tensorboard package is missing
            raise ImportError("--tensorboard needs the tensorboard package: pip install 'supsup[tensorboard]'") \
                from err
        self.writer = SummaryWriter(str(folder))

    def scalars(self, tasks_learned, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, tasks_learned)
        self.writer.flush()

    def close(self):
        self.writer.close()
