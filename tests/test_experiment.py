"""A run's lifecycle, end to end in real processes on real MNIST: a checkpoint after every task,
resume after a kill gives the masks and figures of an uninterrupted run, and SIGINT / SIGTERM stop
cleanly with what is finished saved and the command that resumes it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

RUN = ["run", "demo", "--tasks", "3", "--batches-per-task", "150", "--output-size", "30", "--seed", "4"]
TIMEOUT = 240


def supsup(data_root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "SUPSUP_DATA": str(data_root), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "supsup", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def wait_for_saved_tasks(run_dir: Path, count: int) -> None:
    """Until results.json says ``count`` tasks are saved (it is rewritten right after each checkpoint)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            if json.loads((run_dir / "results.json").read_text())["tasks_done"] >= count:
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir} never saved {count} tasks")


def masks(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model.safetensors"))


def figures(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    keys = ("tasks", "average_accuracy", "average_accuracy_inferred", "average_task_inference_accuracy", "schedule",
            "accuracy_matrix", "metrics", "confusion")
    logged = [line for line in (run_dir / "metrics.csv").read_text().splitlines() if "seconds" not in line]
    return {**{k: results[k] for k in keys}, "metrics.csv": logged,
            "accuracy_matrix.csv": (run_dir / "accuracy_matrix.csv").read_text()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, err = finish(supsup(data_root, *RUN, "--out", str(out)))
    assert code == 0, err
    return out


@pytest.mark.slow
def test_resume_after_a_kill_mid_task_gives_the_masks_and_figures_of_an_uninterrupted_run(
        tmp_path, data_root, uninterrupted):
    out = tmp_path / "run"
    process = supsup(data_root, *RUN, "--out", str(out))
    wait_for_saved_tasks(out, 1)
    time.sleep(0.3)  # into task 2
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "running" and 1 <= saved["tasks_done"] < 3  # killed mid-run, nothing said
    assert load_file(str(out / "model.safetensors"))["net.1.bank.packed"].shape[0] == saved["tasks_done"]

    code, stdout, err = finish(supsup(data_root, "run", "--resume", str(out)))
    assert code == 0, err
    assert "(resumed)" in stdout
    resumed, reference = masks(out), masks(uninterrupted)
    assert sorted(resumed) == sorted(reference)
    for key in reference:
        assert resumed[key].equal(reference[key]), key  # identical mask bytes and BN statistics
    assert figures(out) == figures(uninterrupted)  # identical accuracies, to the last digit
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["sessions"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_matrix.csv", "metrics.csv", "model.safetensors",
                                                     "results.json", "task_confusion.csv"]  # nothing stale


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_keeps_what_is_finished_and_says_how_to_resume(tmp_path, data_root, sig, code, word):
    out = tmp_path / "run"
    process = supsup(data_root, *RUN, "--out", str(out))
    wait_for_saved_tasks(out, 1)
    process.send_signal(sig)
    returncode, _, err = finish(process)
    assert returncode == code, err
    assert "Traceback" not in err
    results = json.loads((out / "results.json").read_text())
    done = results["tasks_done"]
    assert results["status"] == "interrupted" and done >= 1
    assert f"{word}: {done} of 3 tasks are saved in {out}; resume with: supsup run --resume {out}" in \
        " ".join(err.split())
    assert results["checkpoint"]["tasks"] == done
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
