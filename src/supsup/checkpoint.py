"""Checkpoints: the model's ``state_dict()`` as safetensors (packed masks, per-task BatchNorm statistics,
layer seeds, scores of tasks in training) plus JSON metadata in the same file's header. No pickle.
Seeded base weights are not stored: they are regenerated from the seed, and a fingerprint of their signs guards
against a changed random generator. Kept base weights (``weights="keep"``) are fingerprinted by their sha256 in
``state_dict()``; ``save_checkpoint(..., base_weights=True)`` also stores them once (as ``base.<module>.weight``
/ ``.bias``), and loading puts them into the model before the masks.

Nothing in a file is trusted before it is checked. Loading reads the header only, validates every field
(a ``CheckpointError`` names the field), checks every size against bounds, against the tensor shapes in
the file and against the memory available, and builds the architecture on the meta device to compare its
shapes: all before any allocation. Then it reads the tensors and verifies the sha256 of each.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from supsup.files import write_atomic
from supsup.layers import MASK_RULES
from supsup.masks import pack_bits, packed_size
from supsup.model import SupermaskModel

FORMAT_VERSION = 2
METADATA_KEY = "supsup"

#: Bounds on what a checkpoint may describe (far above the paper's largest models and runs).
MAX_LAYERS = 10_000
MAX_LAYER_WEIGHTS = 1 << 34
MAX_TASKS = 100_000_000
MAX_CLASSES = 1_000_000
MAX_SEED = (1 << 63) - 1

_HEX16, _HEX64 = re.compile(r"[0-9a-f]{16}"), re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, of another format version, or does not fit the model."""


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the packed sign bits of a frozen weight."""
    bits = pack_bits((weight.detach().reshape(-1) > 0).cpu())
    return hashlib.sha256(bits.numpy().tobytes()).hexdigest()[:16]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (C order, little endian)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def describe(model: SupermaskModel) -> dict:
    """JSON metadata that, with the tensors, rebuilds ``model`` exactly."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        "format_version": FORMAT_VERSION,
        "architecture": model.architecture,
        "seed": model.seed,
        "rule": model.rule,
        "num_classes": model.num_classes,
        "num_tasks": model.num_tasks,
        "training_tasks": model.training_tasks,
        "bytes_per_task": model.bytes_per_task(),
        "layers": [
            {"name": names[id(layer)], "shape": list(layer.weight.shape), "density": layer.density,
             "weights": "keep" if layer.kept else "seed", "weight_fingerprint": weight_fingerprint(layer.weight)}
            for layer in model.mask_layers()
        ],
    }


def _kept_modules(model: SupermaskModel) -> dict[str, torch.nn.Module]:
    """Modules holding kept (user-given) base tensors, by qualified name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "kept", False)}


def base_tensors(model: SupermaskModel) -> dict[str, torch.Tensor]:
    """The kept base weights and frozen biases/affines, as ``base.<module>.weight`` / ``.bias``."""
    out = {}
    for name, module in _kept_modules(model).items():
        for attr in ("weight", "bias"):
            value = getattr(module, attr, None)
            if isinstance(value, torch.Tensor):
                out[f"base.{name}.{attr}"] = value.detach().cpu().contiguous()
    return out


def checkpoint_bytes(model: SupermaskModel, extra: dict | None = None, base_weights: bool = False) -> bytes:
    """The checkpoint file's bytes: every tensor of ``model.state_dict()`` (and with ``base_weights`` the kept
    base tensors), and the metadata with the sha256 of each tensor. Tasks in training are included."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if base_weights:
        tensors.update(base_tensors(model))
    meta = describe(model)
    meta["tensors"] = {k: tensor_sha256(v) for k, v in tensors.items()}
    if extra:
        meta["extra"] = extra
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta)})


def save_checkpoint(model: SupermaskModel, path: str | Path, extra: dict | None = None,
                    base_weights: bool = False) -> Path:
    """Write ``model``'s state to ``path`` (a ``.safetensors`` file) atomically. Returns the path.

    ``base_weights``: also store the kept base weights once (a model with ``weights="keep"`` then loads from
    the file alone, into a model of the same architecture whatever its weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, checkpoint_bytes(model, extra, base_weights))
    return path


# ------------------------------------------------------------------------------------------ checks
def _fail(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: metadata field '{field}' {problem}")


def _int(meta: dict, key: str, path: Path, low: int, high: int, field: str | None = None) -> int:
    field = field or key
    if key not in meta:
        raise _fail(path, field, "is missing")
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(path, field, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def _validate(meta, path: Path) -> dict:
    """Check every field's presence, type and range; returns ``meta``."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this supsup reads version "
                              f"{FORMAT_VERSION}")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _fail(path, "architecture", f"must be an object with a string 'name', got {arch!r}")
    for key, value in arch.items():
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise _fail(path, f"architecture.{key}", f"must be a number, string or boolean, got {value!r}")
    _int(meta, "seed", path, 0, MAX_SEED)
    if meta.get("rule") not in MASK_RULES:
        raise _fail(path, "rule", f"must be one of {MASK_RULES}, got {meta.get('rule')!r}")
    if meta.get("num_classes") is not None:
        _int(meta, "num_classes", path, 1, MAX_CLASSES)
    num_tasks = _int(meta, "num_tasks", path, 0, MAX_TASKS)
    training = meta.get("training_tasks")
    if not isinstance(training, list) or len(training) > MAX_TASKS or \
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= num_tasks + len(training)
                    for t in training):
        raise _fail(path, "training_tasks", f"must be a list of task ids, got {training!r:.100}")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise _fail(path, "layers", f"must be a list of 1 to {MAX_LAYERS} layers, got {layers!r:.100}")
    for i, info in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(info, dict):
            raise _fail(path, where, f"must be an object, got {info!r:.100}")
        if not isinstance(info.get("name"), str):
            raise _fail(path, f"{where}.name", f"must be a string, got {info.get('name')!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 6 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_LAYER_WEIGHTS for d in shape) \
                or math.prod(shape) > MAX_LAYER_WEIGHTS:
            raise _fail(path, f"{where}.shape", f"must be 1 to 6 positive sizes with at most {MAX_LAYER_WEIGHTS} "
                                                f"weights, got {shape!r:.100}")
        density = info.get("density")
        if density is not None and (not isinstance(density, (int, float)) or isinstance(density, bool)
                                    or not 0 < density <= 1):
            raise _fail(path, f"{where}.density", f"must be null or a number in (0, 1], got {density!r}")
        if info.get("weights", "seed") not in ("seed", "keep"):
            raise _fail(path, f"{where}.weights", f"must be 'seed' or 'keep', got {info.get('weights')!r}")
        if not isinstance(info.get("weight_fingerprint"), str) or not _HEX16.fullmatch(info["weight_fingerprint"]):
            raise _fail(path, f"{where}.weight_fingerprint", "must be 16 hex digits")
    tensors = meta.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in tensors.values()):
        raise _fail(path, "tensors", "must map every tensor name to its sha256 (64 hex digits)")
    if "extra" in meta and not isinstance(meta["extra"], dict):
        raise _fail(path, "extra", "must be an object")
    return meta


def read_metadata(path: str | Path) -> dict:
    """The validated JSON metadata of a checkpoint (reads the header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
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
    return _validate(meta, path)


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_sizes(meta: dict, path: Path) -> None:
    """The tensors in the file against the metadata, and the model's size against the memory available."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt tensor header: {err}") from err
    if set(shapes) != set(meta["tensors"]):
        missing, extra = set(meta["tensors"]) - set(shapes), set(shapes) - set(meta["tensors"])
        raise CheckpointError(f"{path}: the tensors in the file do not match the metadata's list "
                              f"(missing {sorted(missing)[:5]}, unlisted {sorted(extra)[:5]})")
    k, trained = meta["num_tasks"], len(meta["training_tasks"])
    for i, info in enumerate(meta["layers"]):
        key, weights = f"{info['name']}.bank.packed", math.prod(info["shape"])
        expected = [k, packed_size(weights)]
        if shapes.get(key) != expected:
            raise CheckpointError(f"{path}: tensor {key} has shape {shapes.get(key)}, but layers[{i}] "
                                  f"(shape {info['shape']}) and num_tasks {k} need {expected}")
        scores = shapes.get(f"{info['name']}.scores")
        if (scores or [0])[0] != trained or (scores is not None and scores[1:] != info["shape"]):
            raise CheckpointError(f"{path}: tensor {info['name']}.scores has shape {scores}, but "
                                  f"{trained} tasks in training of shape {info['shape']} need "
                                  f"{[trained, *info['shape']] if trained else 'none'}")
    weights = sum(math.prod(info["shape"]) for info in meta["layers"])
    need = 4 * weights * (1 + trained) + sum(math.prod(s) for s in shapes.values())
    available = _available_memory()
    if available is not None and need > available:
        raise CheckpointError(f"{path}: the model it describes needs about {need / 2**30:.1f} GiB, more than the "
                              f"{available / 2**30:.1f} GiB of memory available")


def _read_tensors(meta: dict, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each verified against its sha256 in the metadata."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: corrupt tensor data: {err}") from err
    for name, expected in meta["tensors"].items():
        if tensor_sha256(tensors[name]) != expected:
            raise CheckpointError(f"{path}: tensor {name} fails its checksum (the file is corrupt or was edited)")
    return tensors


# ------------------------------------------------------------------------------------------ loading
def load_into(model: SupermaskModel, path: str | Path) -> SupermaskModel:
    """Load a checkpoint's state into an already-built model of the same architecture and seed."""
    path = Path(path)
    meta = read_metadata(path)
    _check_sizes(meta, path)
    layers = model.mask_layers()
    if len(meta["layers"]) != len(layers):
        raise CheckpointError(f"{path} has {len(meta['layers'])} masked layers, the model has {len(layers)}")
    if meta["seed"] != model.seed:
        raise CheckpointError(f"{path} was made with seed {meta['seed']}, the model has seed {model.seed}")
    for i, (layer, info) in enumerate(zip(layers, meta["layers"])):
        if list(layer.weight.shape) != info["shape"]:
            raise CheckpointError(f"{path}: layer {i} ({info['name']}) has shape {info['shape']}, the model's is "
                                  f"{list(layer.weight.shape)}")
        if ("keep" if layer.kept else "seed") != info.get("weights", "seed"):
            raise CheckpointError(f"{path}: layer {i} ({info['name']}) has weights={info.get('weights', 'seed')!r}, "
                                  f"the model's has weights={'keep' if layer.kept else 'seed'!r}")
    tensors = _read_tensors(meta, path)
    base = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("base.")]}
    if base:
        _put_base(model, base, path)
    for i, (layer, info) in enumerate(zip(layers, meta["layers"])):
        if weight_fingerprint(layer.weight) != info["weight_fingerprint"]:
            raise CheckpointError(f"{path}: layer {i} ({info['name']}): " + (
                "the model's kept base weights differ from those the masks were learned over" if layer.kept else
                "the base weight regenerated from the seed differs from the saved one (another torch random "
                "generator?)"))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the model: {err}") from err
    for layer, info in zip(layers, meta["layers"]):
        layer.density = info["density"]
    return model


@torch.no_grad()
def _put_base(model: SupermaskModel, base: dict[str, torch.Tensor], path: Path) -> None:
    """Copy stored kept base tensors into the model's kept modules and fingerprint them again."""
    kept = _kept_modules(model)
    for key, value in base.items():
        name, attr = key[len("base."):].rsplit(".", 1)
        target = getattr(kept.get(name), attr, None)
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            raise CheckpointError(f"{path}: stored base tensor {key} {list(value.shape)} has no place of that shape "
                                  f"in the model (a kept module {name} with a frozen {attr})")
        target.copy_(value)
    for module in kept.values():
        module.base_changed()


def _meta_shapes(name: str, arch: dict, path: Path) -> list[list[int]]:
    """Weight shapes of a registered architecture's Linear/Conv2d layers, built on the meta device
    (no memory is allocated, whatever sizes the metadata claims)."""
    from torch import nn

    from supsup.architectures import ARCHITECTURES

    try:
        with torch.device("meta"):
            net = ARCHITECTURES[name](**arch)
    except (TypeError, ValueError, RuntimeError) as err:
        raise _fail(path, "architecture", f"does not build a {name}: {err}") from err
    return [list(m.weight.shape) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> SupermaskModel:
    """Rebuild a model of a registered architecture from a checkpoint."""
    from supsup.architectures import ARCHITECTURES, build_model

    path = Path(path)
    meta = read_metadata(path)
    arch = dict(meta["architecture"])
    name = arch.pop("name")
    if name == "custom":
        raise CheckpointError(f"{path} holds a custom network: build it yourself and call load_into(model, path)")
    if name not in ARCHITECTURES:
        raise _fail(path, "architecture.name", f"names an unknown architecture {name!r}; known: "
                                               f"{sorted(ARCHITECTURES)}")
    _check_sizes(meta, path)
    shapes = _meta_shapes(name, arch, path)
    declared = [info["shape"] for info in meta["layers"]]
    if shapes != declared:
        raise _fail(path, "architecture", f"builds layers of shapes {shapes[:4]}{'...' if len(shapes) > 4 else ''}, "
                                          f"but 'layers' lists {declared[:4]}{'...' if len(declared) > 4 else ''}")
    densities = {info["name"]: info["density"] for info in meta["layers"]}  # per layer (Erdős–Rényi)
    classes = {} if meta["num_classes"] is None else {"num_classes": meta["num_classes"]}
    try:
        model = build_model(name, seed=meta["seed"], rule=meta["rule"],
                            density=lambda qualified, module: densities.get(f"net.{qualified}"), **classes, **arch)
    except (ValueError, TypeError) as err:
        raise _fail(path, "architecture", f"is invalid: {err}") from err
    return load_into(model.to(device), path)
