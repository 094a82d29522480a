"""What a run logs: a line per task off a terminal, metrics.csv always, TensorBoard scalars when asked, and the
running loss on the progress bar."""

import csv
import io

import pytest
import torch
from rich.console import Console

from supsup.cli import main
from supsup.loggers import ProgressBar

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 contended threads are slower than 1


@pytest.fixture(scope="module")
def logged(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("logged") / "run"
    capture = io.StringIO()
    import supsup.cli

    previous, supsup.cli.console = supsup.cli.console, Console(file=capture, width=200)  # not a terminal
    try:
        assert main(["run", "demo", "--tasks", "2", "--batches-per-task", "20", "--output-size", "30", "--tensorboard",
                     "--data-root", str(data_root), "--out", str(out)]) == 0
    finally:
        supsup.cli.console = previous
    return out, capture.getvalue()


def scalars_csv(out):
    return [(int(n), name, float(v)) for n, name, v in list(csv.reader((out / "metrics.csv").open()))[1:]]


def test_off_a_terminal_a_line_per_task(logged):
    _, printed = logged
    assert "after 1 task: train/loss" in printed and "after 2 tasks: train/loss" in printed
    assert "\r" not in printed  # no progress bar redraws in a log file


def test_metrics_csv_holds_every_scalar(logged):
    out, _ = logged
    rows = scalars_csv(out)
    names = {name for _, name, _ in rows}
    assert {"train/loss", "train/seconds", "bytes/stored", "eval/average_accuracy_inferred",
            "metrics/average_accuracy"} <= names
    assert [n for n, name, _ in rows if name == "train/loss"] == [1, 2]
    assert all(0 < v < 5 for _, name, v in rows if name == "train/loss")


def test_tensorboard_event_file_holds_the_same_scalars(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    csv_rows = scalars_csv(out)
    for tag in ("train/loss", "eval/average_accuracy_inferred", "bytes/stored"):
        logged_events = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        expected = [(n, v) for n, name, v in csv_rows if name == tag]
        assert [s for s, _ in logged_events] == [n for n, _ in expected]
        assert [v for _, v in logged_events] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32


def test_progress_bar_shows_the_running_loss():
    capture = io.StringIO()
    bar = ProgressBar(Console(file=capture, width=120, force_terminal=True), every=1)
    bar.stage("training 1 tasks", 10)
    for _ in range(10):
        bar.advance(1, torch.tensor(0.5))
    bar.progress.refresh()
    text = capture.getvalue()
    bar.close()
    assert "loss 0.5000" in text and "training 1 tasks" in text
