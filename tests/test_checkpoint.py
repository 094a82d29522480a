import json

import pytest
import torch
from safetensors.torch import save_file

from supsup import build_model
from supsup.checkpoint import CheckpointError, load_checkpoint, load_into, save_checkpoint, tensor_sha256
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


def test_saving_while_training_keeps_the_tasks_in_training(tmp_path):
    model = _trained(1)
    model.begin_tasks(1)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert loaded.num_tasks == 1 and loaded.training_tasks == [1]
    assert all(torch.equal(a, b) for a, b in zip(model.score_parameters(), loaded.score_parameters()))


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["supsup"])


def _rewrite(path, target, meta=None, tensors=None):
    """A copy of checkpoint ``path`` at ``target`` with edited metadata and/or tensors."""
    from safetensors.torch import load_file

    save_file(tensors if tensors is not None else load_file(str(path)), str(target),
              metadata={"supsup": json.dumps(meta if meta is not None else _metadata(path))})
    return target


def test_a_flipped_byte_in_a_mask_tensor_is_rejected(tmp_path):
    path = save_checkpoint(_trained(2), tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("layers"), "'layers' must be a list"),
    (lambda m: m.pop("seed"), "'seed' is missing"),
    (lambda m: m.update(seed=2 ** 70), "'seed' must be an integer in"),
    (lambda m: m.update(num_tasks=-1), "'num_tasks' must be an integer in"),
    (lambda m: m.update(rule="magic"), "'rule' must be one of"),
    (lambda m: m["architecture"].update(name="transformer-xxl"), "unknown architecture 'transformer-xxl'"),
    (lambda m: m["architecture"].update(output_size=10_000_000), "'architecture' builds layers of shapes"),
    (lambda m: m["architecture"].update(output_size="big"), "'architecture' does not build a lenet"),
    (lambda m: m["layers"][1].update(shape=[100]), r"tensor net.3.bank.packed has shape \[2, 3750\]"),
    (lambda m: m["layers"][0].update(density=7), r"'layers\[0\].density' must be null or a number"),
    (lambda m: m["layers"][0].pop("weight_fingerprint"), r"'layers\[0\].weight_fingerprint' must be 16 hex"),
    (lambda m: m.pop("tensors"), "'tensors' must map every tensor name"),
    (lambda m: m["tensors"].pop("net.1.bank.packed"), "do not match the metadata's list"),
])
def test_every_malformed_header_field_is_a_checkpoint_error_naming_it(tmp_path, edit, message):
    path = save_checkpoint(_trained(2), tmp_path / "m.safetensors")
    meta = _metadata(path)
    edit(meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_rewrite(path, tmp_path / "edited.safetensors", meta))


def test_sizes_are_checked_against_memory_before_anything_is_allocated(tmp_path):
    """A tiny file describing a consistent but enormous model (no tasks, so no mask bytes): refused from
    the header, before any weight is built."""
    path = save_checkpoint(build_model("lenet", output_size=30, seed=5), tmp_path / "m.safetensors")
    meta = _metadata(path)
    meta["architecture"]["input_size"] = 50_000_000  # layer 0: [300, 5e7] -> 60 GB of fp32 weights
    meta["layers"][0]["shape"] = [300, 50_000_000]
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["net.1.bank.packed"] = torch.zeros(0, 300 * 50_000_000 // 8, dtype=torch.uint8)
    meta["tensors"]["net.1.bank.packed"] = tensor_sha256(tensors["net.1.bank.packed"])
    target = _rewrite(path, tmp_path / "huge.safetensors", meta, tensors)
    assert target.stat().st_size < 10_000
    with pytest.raises(CheckpointError, match=r"needs about \d+\.\d GiB, more than the"):
        load_checkpoint(target)
