"""End-to-end: the ``supsup`` command on real MNIST with very few batches."""

import json

from typer.testing import CliRunner

from supsup.cli import app

runner = CliRunner()


def flat(output: str) -> str:
    """Output with rich's box drawing and line wrapping removed."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def test_run_then_eval_on_real_mnist(tmp_path, data_root):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "permuted-mnist", "--tasks", "2", "--batches-per-task", "30", "--model",
                                 "lenet", "--output-size", "30", "--seed", "3", "--data-root", str(data_root),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "task-inference" in result.output and "bytes per task" in result.output
    results = json.loads((out / "results.json").read_text())
    for key in ("config", "tasks", "average_accuracy", "average_accuracy_inferred", "bytes_per_task", "seconds"):
        assert key in results
    assert results["config"]["model"] == "lenet" and results["config"]["seed"] == 3
    assert [t["task"] for t in results["tasks"]] == [0, 1]
    for t in results["tasks"]:
        assert 0.5 < t["accuracy"] <= 1  # 30 batches already learn far above chance (0.1)
        assert 0 <= t["task_inference_accuracy"] <= 1 and t["accuracy_inferred"] <= t["accuracy"] + 1e-9
    assert results["bytes_per_task"] == (300 * 784 + 100 * 300 + 30 * 100) // 8
    assert (out / "model.safetensors").is_file()

    again = runner.invoke(app, ["eval", str(out), "--objective", "g", "--data-root", str(data_root)])
    assert again.exit_code == 0, again.output
    evaluated = json.loads((out / "eval-GNu-oneshot-g-image.json").read_text())
    # re-evaluation from the checkpoint reproduces the task-given accuracies exactly
    assert [t["accuracy"] for t in evaluated["tasks"]] == [t["accuracy"] for t in results["tasks"]]


def test_bad_preset_and_bad_values_are_clear_errors(tmp_path):
    result = runner.invoke(app, ["run", "no-such-preset", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown preset 'no-such-preset'" in flat(result.output)
    result = runner.invoke(app, ["run", "demo", "--tasks", "0", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "tasks must be >= 1" in flat(result.output)
    result = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "a run directory?" in flat(result.output)


def test_presets_lists_the_papers_experiments():
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for name in ("permuted-mnist", "rotated-mnist", "split-mnist", "permuted-mnist-2500"):
        assert name in result.output


def test_nns_scenario_allocates_one_mask_per_hidden_task(tmp_path, data_root):
    out = tmp_path / "nns"
    result = runner.invoke(app, ["run", "nns-permuted-mnist", "--tasks", "2", "--batches-per-task", "200",
                                 "--data-root", str(data_root), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["num_masks"] == 2 and results["average_accuracy_inferred"] > 0.8
    decisions = json.loads((out / "nns_decisions.json").read_text())["decisions"]
    assert [d["decision"] for d in decisions if d["decision"] in ("first", "new")] == ["first", "new"]


def test_impossible_settings_end_with_a_message_not_a_traceback(tmp_path, data_root):
    result = runner.invoke(app, ["run", "split-mnist", "--tasks", "7", "--data-root", str(data_root),
                                 "--out", str(tmp_path / "x")], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "SplitMNIST has at most 5 tasks" in result.output and "Traceback" not in result.output
