import json

import pytest
import torch
from safetensors.torch import save_file

from supsup import build_model
from supsup.checkpoint import CheckpointError, load_checkpoint, load_into, save_checkpoint
from supsup.inference import Inference, infer_tasks


def _trained(tasks=3, seed=5):
    model = build_model("lenet", output_size=30, seed=seed)
    for _ in range(tasks):
        model.begin_tasks(1)
        with torch.no_grad():  # move the scores so that masks differ from the initial ones
            for p in model.score_parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.end_tasks()
    return model


def test_round_trip_gives_identical_predictions_bit_for_bit(tmp_path):
    model = _trained()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    x = torch.randn(16, 784)
    for t in range(3):
        assert torch.equal(model(x, t), loaded(x, t))
    assert torch.equal(infer_tasks(model, x, Inference(granularity="sample")),
                       infer_tasks(loaded, x, Inference(granularity="sample")))
    assert loaded.bytes_per_task() == model.bytes_per_task() == (300 * 784 + 100 * 300 + 30 * 100) // 8
    # the file holds the masks at one bit per weight plus a small header
    assert path.stat().st_size < 3 * model.bytes_per_task() + 8192


def test_more_tasks_can_be_added_after_loading(tmp_path):
    model = _trained(2)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    model.begin_tasks(1), model.end_tasks()
    loaded.begin_tasks(1), loaded.end_tasks()
    x = torch.randn(4, 784)
    assert loaded.num_tasks == 3 and torch.equal(model(x, 2), loaded(x, 2))


def test_corrupt_missing_and_wrong_version_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a supsup checkpoint"):
        load_checkpoint(other)
    model = _trained(1)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["supsup"])
    meta["format_version"] = 99
    save_file(load_file(str(path)), str(tmp_path / "v99.safetensors"), metadata={"supsup": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "v99.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)


def test_loading_into_a_model_with_another_seed_is_refused(tmp_path):
    path = save_checkpoint(_trained(1, seed=5), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="seed 5"):
        load_into(build_model("lenet", output_size=30, seed=6), path)


def test_saving_while_training_is_refused(tmp_path):
    model = _trained(1)
    model.begin_tasks(1)
    with pytest.raises(CheckpointError, match="still being trained"):
        save_checkpoint(model, tmp_path / "m.safetensors")
