"""Every method through ``supsup run`` on real data with tiny settings: the convolutional GG presets on
Fashion-MNIST (SupSup, Transfer and the five baselines), ABatchE, HopSupSup, and NNs with a time budget."""

import json

import pytest

from supsup.cli import main

TINY_CONV = ["--small", "--tasks", "2", "--batches-per-task", "6", "--batch-size", "16", "--set", "width=4"]

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 contended threads are slower than 1


def run(tmp_path, data_root, *argv):
    out = tmp_path / "run"
    assert main([*argv, "--data-root", str(data_root), "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("preset", ["split-fashion-mnist", "split-fashion-mnist-transfer",
                                    "split-fashion-mnist-upper-bound", "split-fashion-mnist-lower-bound",
                                    "split-fashion-mnist-separate-heads", "split-fashion-mnist-batche",
                                    "split-fashion-mnist-psp"])
def test_convolutional_gg_presets_run_on_fashion_mnist(preset, tmp_path, data_root):
    out, results = run(tmp_path, data_root, "run", preset, *TINY_CONV)
    assert results["status"] == "complete" and [t["task"] for t in results["tasks"]] == [0, 1]
    assert results["accuracy_matrix"]["tasks_learned"] == [1, 2]  # evaluated after every task
    assert all(0.4 <= t["accuracy"] <= 1 for t in results["tasks"])  # 2 classes: chance is 0.5
    assert results["bytes_stored"] > 0 and results["progress"]["tasks_learned"] == [1, 2]
    supsup = results["config"]["method"] == "supsup"
    assert (out / "model.safetensors").is_file() == supsup  # only SupSup's state is a checkpoint
    if supsup or results["config"]["method"] in ("upper-bound", "batche"):
        assert results["metrics"]["forgetting"] == 0  # frozen masks, per-task statistics: nothing forgotten


def test_abatche_infers_the_member_in_gnu(tmp_path, data_root):
    _, results = run(tmp_path, data_root, "run", "permuted-mnist-abatche", "--tasks", "2", "--batches-per-task",
                     "40")
    assert results["model"]["method"] == "ABatchE"
    for task in results["tasks"]:
        assert {"accuracy", "task_inference_accuracy", "accuracy_inferred", "inferred"} <= set(task)
    assert sum(sum(row.values()) for row in results["confusion"].values()) == 20_000  # every test image


def test_hopsupsup_recovers_masks_from_its_stores(tmp_path, data_root):
    _, results = run(tmp_path, data_root, "run", "hopsupsup-split-mnist", "--tasks", "2", "--batches-per-task", "20",
                     "--set", "width=256", "--set", "hopfield.holdout=512")
    assert results["model"]["store"]["bytes"] == results["bytes_stored"] == 2 * (256 * 256 + 256) * 4 + 2 * 8
    for task in results["tasks"]:
        assert task["recovery_batches"] == 8 and task["accuracy"] > 0.9  # 512 held-out images in batches of 64
        assert 0 <= task["accuracy_inferred"] <= 1 and task["hamming_true"] >= 0


def test_nns_stops_at_a_hidden_task_boundary_after_its_time_budget(tmp_path, data_root):
    _, results = run(tmp_path, data_root, "run", "nns-permuted-mnist", "--tasks", "5", "--batches-per-task", "30",
                     "--set", "nns.check_every=10", "--train-seconds", "0.001")
    assert results["num_hidden_tasks"] == 1 and results["evaluated_tasks"] == [0]  # one whole task, then time
    assert results["config"]["nns"]["train_seconds"] == 0.001


def test_supsup_transfer_resumed_after_an_interruption_equals_an_uninterrupted_run(tmp_path, data_root,
                                                                                    monkeypatch):
    from safetensors.torch import load_file

    from supsup import methods
    from supsup.experiment import run as run_experiment
    from supsup.presets import get_preset

    config = get_preset("split-fashion-mnist-transfer", small=True).replaced(
        {"tasks": 3, "width": 4, "eval_at": [2], "train": {"batches_per_task": 6, "batch_size": 16}})
    whole = run_experiment(config, tmp_path / "whole", data_root)
    train_group, calls = methods.SupSup.train_group, []

    def interrupted_in_task_3(self, on_batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train_group(self, on_batch)

    monkeypatch.setattr(methods.SupSup, "train_group", interrupted_in_task_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", data_root)
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["status"] == "interrupted" and cut["tasks_done"] == 2
    assert [p.name for p in (tmp_path / "cut").glob("transfer-*")] == ["transfer-2.safetensors"]
    monkeypatch.setattr(methods.SupSup, "train_group", train_group)
    resumed = run_experiment(config, tmp_path / "cut", data_root, resume=True)
    for key in ("tasks", "accuracy_matrix", "metrics", "schedule"):
        assert resumed[key] == whole[key], key
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)  # identical masks and BN statistics
    assert resumed["checkpoint"]["transfer"]["file"] == "transfer-3.safetensors"
