"""Everything about a run that can be checked before any data is read or anything trained: the device, the
memory the masks of all tasks need, and whether a run can be resumed."""

from __future__ import annotations

import torch

from supsup.architectures import ARCHITECTURES
from supsup.config import RunConfig
from supsup.masks import packed_size
from supsup.methods import architecture_kwargs


def check_device(name: str) -> torch.device:
    """The torch device ``name``, or ``ValueError`` saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}: expected e.g. 'cpu', 'cuda' or 'cuda:1'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported: use cpu, cuda or mps")
    return device


def bytes_per_task(config: RunConfig) -> int:
    """Bytes of one task's masks for ``config``'s network (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        net = ARCHITECTURES[config.model](output_size=config.output_size, **architecture_kwargs(config))
    return sum(packed_size(m.weight.numel()) for m in net.modules() if isinstance(m, (torch.nn.Linear,
                                                                                      torch.nn.Conv2d)))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CPU: Linux ``MemAvailable``), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from supsup.checkpoint import _available_memory

    return _available_memory() if device.type == "cpu" else None


def check_run(config: RunConfig) -> torch.device:
    """Everything about a run that can be checked before any data is read or anything trained."""
    device = check_device(config.device)
    if config.method == "supsup":
        masks = bytes_per_task(config) * config.tasks
        free = available_memory(device)
        if free is not None and masks > free:
            raise ValueError(f"the masks of {config.tasks:,} tasks take {masks / 2**30:,.1f} GiB, more than the "
                             f"{free / 2**30:,.1f} GiB of memory available on {device}: ask for fewer --tasks")
    return device


def why_not_resumable(config: RunConfig) -> str | None:
    """Why a run of ``config`` cannot be resumed (None when it can)."""
    if config.scenario == "NNs":
        return ("scenario NNs runs cannot be resumed: the task-free learner keeps the float scores and optimiser "
                "state of every mask in memory, which the checkpoint does not hold")
    if config.method != "supsup":
        return (f"method {config.method} runs cannot be resumed: its state is not a SupermaskModel, so no "
                f"checkpoint is written (results.json is still rewritten after every task)")
    return None
