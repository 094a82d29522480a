"""The bring-your-own-model examples run end to end on real MNIST in small form, and learn."""

import json

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def test_the_transformer_example_learns_tasks_in_sequence_and_infers_them(tmp_path, data_root, capsys):
    from supsup.examples.transformer import main

    assert main(["--tasks", "2", "--batches", "40", "--test-samples", "300",
                 "--data-root", str(data_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MultiheadAttention  converted" in out and "inferred per batch" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["task"] for r in results["tasks"]] == [0, 1]
    mean = results["mean"]
    assert mean["accuracy_given"] > 0.4  # chance is 0.1
    assert mean["task_inference_batch"] > 0.5  # chance is 0.5 for 2 tasks: One-Shot from 128 images does better
    assert results["bytes_per_task"] > results["mask_bytes_per_task"]  # per-task biases and affines counted


def test_the_pretrained_example_compares_kept_and_seeded_weights(tmp_path, data_root, capsys):
    from supsup.examples.pretrained import main

    assert main(["--batches", "15", "--pretrain-batches", "40", "--test-samples", "1000",
                 "--data-root", str(data_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bias frozen, kept" in out and "bias dropped" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dense_accuracy_0_4"] > 0.8
    rows = {(r["split"], r["weights"]): r for r in results["rows"]}
    assert set(rows) == {(s, w) for s in ("5x2", "2x5") for w in ("kept", "kept+b", "seeded")}
    assert all(r["accuracy"] > 0.55 for (s, _), r in rows.items() if s == "5x2")  # chance is 0.5
    # masks over the pretrained network start from it: digits 0-4 (task 0 of 2x5) are classified at once
    assert rows["2x5", "kept"]["per_task"][0] > 0.8
    assert rows["2x5", "kept+b"]["bytes_per_task"] == rows["2x5", "kept"]["bytes_per_task"] + 4 * (16 + 32 + 64 + 10)
