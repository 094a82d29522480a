"""Checkpoints: safetensors for tensors (packed masks, per-task BatchNorm statistics) plus JSON
metadata in the same file's header. No pickle. Base weights are not stored: they are regenerated
from the seed, and a fingerprint of their signs guards against a changed random generator.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from supsup.masks import pack_bits
from supsup.model import SupermaskModel

FORMAT_VERSION = 1
METADATA_KEY = "supsup"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, of another format version, or does not fit the model."""


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the packed sign bits of a frozen weight."""
    bits = pack_bits((weight.detach().reshape(-1) > 0).cpu())
    return hashlib.sha256(bits.numpy().tobytes()).hexdigest()[:16]


def describe(model: SupermaskModel) -> dict:
    """JSON metadata that, with the tensors, rebuilds ``model`` exactly."""
    return {
        "format_version": FORMAT_VERSION,
        "architecture": model.architecture,
        "seed": model.seed,
        "rule": model.rule,
        "num_classes": model.num_classes,
        "num_tasks": model.num_tasks,
        "bytes_per_task": model.bytes_per_task(),
        "layers": [
            {"index": i, "shape": list(layer.weight.shape), "density": layer.density,
             "weight_fingerprint": weight_fingerprint(layer.weight)}
            for i, layer in enumerate(model.mask_layers())
        ],
    }


def save_checkpoint(model: SupermaskModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model``'s learned tasks to ``path`` (a ``.safetensors`` file). Returns the path."""
    if model.training_tasks:
        raise CheckpointError(f"tasks {model.training_tasks} are still being trained: call end_tasks() first")
    tensors = {f"masks.{i}": layer.bank.packed.contiguous().cpu() for i, layer in enumerate(model.mask_layers())}
    for i, norm in enumerate(model.norm_layers()):
        tensors[f"norm.{i}.running_mean"] = norm.running_mean[: model.num_tasks].contiguous().cpu()
        tensors[f"norm.{i}.running_var"] = norm.running_var[: model.num_tasks].contiguous().cpu()
    meta = describe(model)
    if extra:
        meta["extra"] = extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint, validated for format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file but not a supsup checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt metadata: {err}") from err
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this supsup reads version "
                              f"{FORMAT_VERSION}")
    return meta


def load_into(model: SupermaskModel, path: str | Path) -> SupermaskModel:
    """Load a checkpoint's tasks into an already-built model of the same architecture and seed."""
    meta = read_metadata(path)
    layers = model.mask_layers()
    if len(meta["layers"]) != len(layers):
        raise CheckpointError(f"{path} has {len(meta['layers'])} masked layers, the model has {len(layers)}")
    if meta["seed"] != model.seed:
        raise CheckpointError(f"{path} was made with seed {meta['seed']}, the model has seed {model.seed}")
    try:
        tensors = load_file(str(path), device=str(layers[0].weight.device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt tensor data: {err}") from err
    for i, (layer, info) in enumerate(zip(layers, meta["layers"])):
        if list(layer.weight.shape) != info["shape"]:
            raise CheckpointError(f"{path}: layer {i} has shape {info['shape']}, the model's is "
                                  f"{list(layer.weight.shape)}")
        if weight_fingerprint(layer.weight) != info["weight_fingerprint"]:
            raise CheckpointError(f"{path}: layer {i}'s base weight regenerated from the seed differs from the "
                                  f"saved one (a different torch random generator?)")
        if f"masks.{i}" not in tensors:
            raise CheckpointError(f"{path}: tensor masks.{i} is missing")
        layer.density = info["density"]
        layer.bank.load_packed(tensors[f"masks.{i}"])
    for i, norm in enumerate(model.norm_layers()):
        norm.ensure_tasks(meta["num_tasks"])
        norm.running_mean[: meta["num_tasks"]] = tensors[f"norm.{i}.running_mean"]
        norm.running_var[: meta["num_tasks"]] = tensors[f"norm.{i}.running_var"]
    return model


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> SupermaskModel:
    """Rebuild a model of a registered architecture from a checkpoint."""
    from supsup.architectures import build_model

    meta = read_metadata(path)
    arch = dict(meta["architecture"])
    name = arch.pop("name")
    if name == "custom":
        raise CheckpointError(f"{path} holds a custom network: build it yourself and call load_into(model, path)")
    model = build_model(name, seed=meta["seed"], rule=meta["rule"], num_classes=meta["num_classes"],
                        density=meta["layers"][0]["density"], **arch).to(device)
    return load_into(model, path)
