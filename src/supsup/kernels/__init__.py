"""Kernels on bit-packed masks (R = ⌈P/8⌉ bytes per mask, bit i of byte j = weight 8j + i).

Two storage layouts of k masks, both accepted by every operation:

- rows ``[k, R] uint8`` (row t = task t): the canonical form (``state_dict``, checkpoints) and the GPU's;
- tiles ``[C, k, 4] uint8``, C = ⌈R/4⌉ (a view of a ``[C, capacity, 4]`` buffer): dword column c of every
  task together, so the 32 weights of a column are contiguous over the tasks. The CPU kernels' layout:
  a column whose gradient is zero is skipped without reading its bits, and 16 tasks fill one vector.
  ``new_store``, ``tasks``, ``write_rows``, ``rows`` and ``relayout`` hide the difference from the bank.

Seven operations, each with one signature and several backends:

- ``contract(packed, g)``: ``[k] = M @ g`` for ``g [P]`` (or ``[n, k]`` for ``g [n, P]``): the α-gradient
  ∂L/∂α_i = ⟨M_i, ∂L/∂W_eff ⊙ W⟩, read straight from the bits;
- ``contract_factored(packed, delta, x, weight)``: ``[n, k]``, row r ``δ_rᵀ (W ⊙ M_i) x_r``: ``contract`` of
  ``g_r = (δ_r x_rᵀ) ⊙ W`` (a linear layer's α-gradient for one sample) without forming g;
- ``superpose(packed, alpha, P)``: ``[P] = Σ_i α_i M_i`` for ``alpha [k]`` (or ``[n, P]`` for ``[n, k]``);
- ``unpack(packed, P, weight=None)``: ``[c, P]`` float masks of a few rows, times ``weight`` if given;
- ``select(keep, weight)``: ``torch.where(keep, weight, 0.0)``, the effective weights of trained masks, and
  ``threshold_select(scores, weight)``: the same for ``keep = scores >= 0`` without forming keep;
- ``topk_cutoffs(rows, keeps)``: the cut of every top-k selection (training masks of all layers at once),
  by a batched radix select in Triton, or one ``kthvalue`` per tensor elsewhere.

Backends: ``triton`` (CUDA tensors, when Triton imports), ``native`` (CPU, a small C library built on
first use, see ``native.py``) and ``torch`` (any device: unpack chunks of rows to float and use a matmul;
the reference the others are tested against). ``SUPSUP_KERNELS=torch|native|triton`` or
``use_backend(...)`` forces one; otherwise the fastest available for the tensor's device is used.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from supsup.kernels import native
from supsup.masks import unpack_bits

BACKENDS = ("torch", "native", "triton")

#: Float elements one unpacked chunk may hold in the torch backend (64 MiB of float32).
CHUNK_ELEMENTS = 1 << 24

_forced: str | None = None
#: Why the Triton backend was switched off after a failure (compilation, driver), or None.
triton_failure: str | None = None


def _triton():
    from supsup.kernels import triton_kernels  # imports triton; may raise ImportError

    return triton_kernels


def triton_available() -> bool:
    if triton_failure is not None:
        return False
    try:
        _triton()
        return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    except ImportError:
        return False


def backend_for(device: torch.device) -> str:
    """The backend used for tensors on ``device``."""
    name = _forced or os.environ.get("SUPSUP_KERNELS") or None
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
        return name
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and native.available():
        return "native"
    return "torch"


def describe(device: torch.device | str) -> dict:
    """Which backend serves ``device`` and, when it is not the fastest one, why: for results files."""
    device = torch.device(device)
    name = backend_for(device)
    info = {"backend": name, "device": str(device)}
    if _forced or os.environ.get("SUPSUP_KERNELS"):
        info["reason"] = "forced (SUPSUP_KERNELS or use_backend)"
    elif device.type == "cpu" and name == "torch":
        info["reason"] = f"native kernels unavailable: {native.why_unavailable()}"
    elif device.type == "cuda" and name == "torch":
        info["reason"] = f"Triton unavailable: {triton_failure or 'triton does not import'}"
    return info


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside the block (None: automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


# ------------------------------------------------------------------------------ storage layouts
#: Tile buffers hold tasks in multiples of this (whole 64-byte vectors per column).
TILE_TASKS = 16


def tiled(device: torch.device | str) -> bool:
    """Whether masks on ``device`` are stored as tiles (the CPU kernels' layout) rather than rows."""
    return torch.device(device).type == "cpu" and native.available()


def _is_tiles(packed: torch.Tensor) -> bool:
    return packed.dim() == 3


def new_store(capacity: int, row_bytes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Zeroed room for ``capacity`` masks of ``row_bytes`` bytes, in the layout of ``device``: rows
    ``[capacity, R]``, or tiles ``[⌈R/4⌉, capacity', 4]``, capacity' = capacity rounded up to a multiple of
    TILE_TASKS from TILE_TASKS on (a column of a smaller bank is read whole, so it is not padded)."""
    device = torch.device(device or "cpu")
    if tiled(device):
        cap = max(capacity, 1) if capacity < TILE_TASKS else -(-capacity // TILE_TASKS) * TILE_TASKS
        return torch.zeros((row_bytes + 3) // 4, cap, 4, dtype=torch.uint8, device=device)
    return torch.zeros(max(capacity, 1), row_bytes, dtype=torch.uint8, device=device)


def store_capacity(store: torch.Tensor) -> int:
    return store.shape[1] if _is_tiles(store) else store.shape[0]


def num_masks(packed: torch.Tensor) -> int:
    return packed.shape[1] if _is_tiles(packed) else packed.shape[0]


def tasks(packed: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """The masks ``index`` (a slice: a view; a tensor of ids: a copy) of ``packed``, in its layout."""
    return packed[:, index] if _is_tiles(packed) else packed[index]


def write_rows(store: torch.Tensor, first: int, rows: torch.Tensor) -> None:
    """Store canonical ``rows [n, R] uint8`` as masks ``first .. first + n`` of ``store``."""
    if _is_tiles(store):
        native.write_tiles(store, first, rows)
    else:
        store[first : first + rows.shape[0]] = rows.to(store.device)


def rows(packed: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Canonical rows ``[k, R] uint8`` of ``packed`` (itself when it is rows; a copy of tiles)."""
    if not _is_tiles(packed):
        return packed
    return native.read_rows(packed, row_bytes) if packed.device.type == "cpu" else _torch_rows(packed, row_bytes)


def _torch_rows(tiles: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """``rows`` with torch operations: for tiles that moved to a GPU (``relayout``)."""
    dwords = tiles.contiguous().view(torch.int32).view(tiles.shape[:2])  # [C, k]
    return dwords.t().contiguous().view(torch.uint8)[:, :row_bytes].contiguous()


def relayout(store: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """``store`` (all its capacity) in the layout of the device it is on (after ``.to(device)``)."""
    if _is_tiles(store) == tiled(store.device):
        return store
    fresh = new_store(store_capacity(store), row_bytes, store.device)
    write_rows(fresh, 0, rows(store, row_bytes))
    return fresh


def _as_rows(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    return rows(packed, (num_bits + 7) // 8)


def _as_tiles(packed: torch.Tensor) -> torch.Tensor:
    if _is_tiles(packed):
        return packed
    store = new_store(packed.shape[0], packed.shape[1], packed.device)
    write_rows(store, 0, packed)
    return tasks(store, slice(0, packed.shape[0]))


# ------------------------------------------------------------------------------ torch reference
def chunk_rows(num_bits: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(num_bits, 1))


def _torch_unpack(packed, num_bits, weight, dtype):
    bits = unpack_bits(_as_rows(packed, num_bits), num_bits, dtype)
    return bits if weight is None else bits * weight.reshape(-1).to(dtype)


def _torch_contract(packed, g):
    num_bits = g.shape[-1]
    packed = _as_rows(packed, num_bits)
    out = torch.empty(g.shape[0], packed.shape[0], dtype=torch.float32, device=packed.device)
    for start in range(0, packed.shape[0], chunk_rows(num_bits)):
        chunk = unpack_bits(packed[start : start + chunk_rows(num_bits)], num_bits, torch.float32)
        out[:, start : start + chunk.shape[0]] = g @ chunk.T
    return out


def _torch_superpose(packed, alpha, num_bits):
    packed = _as_rows(packed, num_bits)
    mix = torch.zeros(alpha.shape[0], num_bits, dtype=torch.float32, device=packed.device)
    for start in range(0, packed.shape[0], chunk_rows(num_bits)):
        chunk = unpack_bits(packed[start : start + chunk_rows(num_bits)], num_bits, torch.float32)
        mix.addmm_(alpha[:, start : start + chunk.shape[0]], chunk)
    return mix


#: On the GPU, from this many right-hand sides (per-sample α of a batch) on, unpacking chunks once and
#: using a (tensor-core) matmul is expected to beat reading the bits once per right-hand side. On the CPU
#: the bit kernel stays faster even at 128 (measured: 524 ms vs 610 ms, LeNet k = 250, B = 128).
MATMUL_FROM_ROWS = 16


# ------------------------------------------------------------------------------ dispatch
def _run_triton(op: str, *args):
    """Run a Triton kernel chosen automatically; on a failure other than running out of memory, switch the
    Triton backend off for this process (with a warning) and return None so that the caller uses torch."""
    global triton_failure
    try:
        return getattr(_triton(), op)(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # compilation or launch failure: the torch path computes the same thing
        triton_failure = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"supsup: the Triton {op} kernel failed ({triton_failure[:300]}); using the torch path",
                      RuntimeWarning, stacklevel=3)
        return None


def _check(packed: torch.Tensor, num_bits: int) -> None:
    row_bytes = (num_bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() not in (2, 3) or (_is_tiles(packed) and packed.shape[2] != 4):
        raise ValueError(f"expected packed masks [k, R] or tiles [C, k, 4] uint8, got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    if _is_tiles(packed) and packed.shape[0] != (row_bytes + 3) // 4:
        raise ValueError(f"{num_bits} bits need {(row_bytes + 3) // 4} tile columns, got {packed.shape[0]}")
    if not _is_tiles(packed) and packed.shape[1] != row_bytes:
        raise ValueError(f"{num_bits} bits need {row_bytes} bytes per row, got {packed.shape[1]}")


def contract(packed: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``M @ g``: ``g [P] -> [k]``, ``g [n, P] -> [n, k]`` (float32), M the bits of ``packed [k, R]``."""
    single = g.dim() == 1
    g2 = g.reshape(1, -1) if single else g.reshape(g.shape[0], -1)
    _check(packed, g2.shape[1])
    g2 = g2.to(device=packed.device, dtype=torch.float32)
    name = backend_for(packed.device)
    if g2.shape[0] >= MATMUL_FROM_ROWS and _forced is None and name == "triton":
        out = _torch_contract(packed, g2)
    elif name == "native" and packed.device.type == "cpu":
        out = native.contract(_as_tiles(packed), g2)
    elif name == "triton" and (packed.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        packed = _as_rows(packed, g2.shape[1])
        out = _run_triton("contract", packed, g2) if _forced is None else _triton().contract(packed, g2)
        if out is None:
            out = _torch_contract(packed, g2)
    else:
        out = _torch_contract(packed, g2)
    return out[0] if single else out


def contract_factored(packed: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[n, k]``: row r is ``delta_r [out]ᵀ (W ⊙ M_i) x_r [in]`` for ``weight [out, in]``, ``delta [n, out]``,
    ``x [n, in]``: ``contract(packed, g)`` with ``g_r = (delta_r x_rᵀ) ⊙ W`` (the same float products; what
    autograd gives one sample of a linear layer), without forming the ``[n, P]`` tensor g on the CPU."""
    if weight.dim() != 2 or delta.shape != (x.shape[0], weight.shape[0]) or x.shape[1:] != weight.shape[1:]:
        raise ValueError(f"expected delta [n, {weight.shape[0]}] and x [n, {weight.shape[-1]}] for weight "
                         f"{tuple(weight.shape)}, got {tuple(delta.shape)} and {tuple(x.shape)}")
    _check(packed, weight.numel())
    if packed.device.type == "cpu" and backend_for(packed.device) == "native":
        return native.contract_factored(_as_tiles(packed), delta, x, weight)
    return contract(packed, ((delta[:, :, None] * x[:, None, :]) * weight).reshape(x.shape[0], -1))


def superpose(packed: torch.Tensor, alpha: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``Σ_i α_i M_i``: ``alpha [k] -> [P]``, ``alpha [n, k] -> [n, P]`` (float32)."""
    _check(packed, num_bits)
    single = alpha.dim() == 1
    a2 = alpha.reshape(1, -1) if single else alpha
    if a2.shape[1] != num_masks(packed):
        raise ValueError(f"alpha has {a2.shape[1]} entries per row for {num_masks(packed)} masks")
    a2 = a2.to(device=packed.device, dtype=torch.float32)
    name = backend_for(packed.device)
    if a2.shape[0] >= MATMUL_FROM_ROWS and _forced is None and name == "triton":
        out = _torch_superpose(packed, a2, num_bits)
    elif name == "native" and packed.device.type == "cpu":
        out = native.superpose(_as_tiles(packed), a2, num_bits)
    elif name == "triton" and (packed.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        packed = _as_rows(packed, num_bits)
        out = _run_triton("superpose", packed, a2, num_bits) if _forced is None else \
            _triton().superpose(packed, a2, num_bits)
        if out is None:
            out = _torch_superpose(packed, a2, num_bits)
    else:
        out = _torch_superpose(packed, a2, num_bits)
    return out[0] if single else out


def unpack(packed: torch.Tensor, num_bits: int, weight: torch.Tensor | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[c, P]`` masks of ``packed [c, R]`` as ``dtype``, times ``weight [P]`` when given."""
    _check(packed, num_bits)
    if dtype == torch.float32 and packed.device.type == "cpu" and backend_for(packed.device) == "native":
        return native.unpack(_as_tiles(packed), num_bits, weight)
    return _torch_unpack(packed, num_bits, weight, dtype)


def select(keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, weight, 0.0)``: bool ``keep [K, *shape]``, ``weight [*shape]`` -> ``[K, *shape]``.
    On the CPU one pass in C (``torch.where`` with a broadcast weight took 10 ms per million weights here)."""
    if weight.dtype == torch.float32 and keep.dtype == torch.bool and keep.shape[1:] == weight.shape \
            and keep.device.type == "cpu" and backend_for(keep.device) == "native":
        return native.select(keep, weight)
    return torch.where(keep, weight, 0.0)


def threshold_select(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.where(scores >= 0, weight, 0.0)``: ``scores [K, *shape]``, ``weight [*shape]`` -> ``[K, *shape]``.
    On the CPU one pass in C (``scores >= 0`` alone took 2.5x a copy of the scores here)."""
    if weight.dtype == scores.dtype == torch.float32 and scores.shape[1:] == weight.shape \
            and scores.device.type == "cpu" and backend_for(scores.device) == "native":
        return native.threshold_select(scores, weight)
    return torch.where(scores >= 0, weight, 0.0)


def _torch_topk_cutoffs(rows: list[torch.Tensor], keeps: list[int]) -> torch.Tensor:
    cutoffs = []
    for r, keep in zip(rows, keeps):
        n = r.shape[1]
        if keep >= n or keep <= 0:
            cutoffs.append(r.new_full((r.shape[0],), -math.inf if keep >= n else math.inf))
        else:
            cutoffs.append(r.abs().kthvalue(n - keep, dim=1).values)
    return torch.cat(cutoffs)


def topk_cutoffs(rows: list[torch.Tensor], keeps: list[int]) -> torch.Tensor:
    """Cuts of top-k selections: ``rows[i]`` is ``[K_i, n_i]`` float32 and each of its rows keeps ``keeps[i]``
    entries. Returns ``[Σ K_i]`` float32: row by row, the (keep+1)-th largest |x|, so ``|x| > cut`` keeps the
    ``keep`` largest (fewer when values tie at the cut); -inf where a row keeps everything, +inf where nothing.

    CUDA: one batched Triton radix select over all rows; elsewhere one ``kthvalue`` per tensor."""
    if len(rows) != len(keeps) or any(r.dim() != 2 or r.dtype != torch.float32 for r in rows):
        raise ValueError(f"expected float32 [K, n] tensors and one keep per tensor; got "
                         f"{[(tuple(r.shape), r.dtype) for r in rows]} and {len(keeps)} keeps")
    name = backend_for(rows[0].device)
    if name == "triton" and (rows[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        flat = torch.cat([r.reshape(-1) for r in rows])
        sizes = [r.shape[1] for r in rows for _ in range(r.shape[0])]
        per_row = [k for r, k in zip(rows, keeps) for _ in range(r.shape[0])]
        out = _run_triton("topk_cutoffs", flat, sizes, per_row) if _forced is None else \
            _triton().topk_cutoffs(flat, sizes, per_row)
        if out is not None:
            return out
    return _torch_topk_cutoffs(rows, keeps)


# ------------------------------------------------------------------------------ CPU allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def retain_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks below ``limit_bytes`` in the heap instead of unmapping them.

    A training step allocates and frees the same large tensors (masks, effective weights, gradients:
    ``K × P`` floats) every step; by default glibc serves blocks above 32 MiB with ``mmap`` and
    returns them on ``free``, so every step page-faults them in again (FC 1024-1024, 1 thread:
    about 15% of the step at K = 1, more when K tasks are batched). Process-wide; returns False
    where it does not apply (not glibc, or refused). Memory that was freed is reused, not leaked."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = int(min(limit_bytes, 2**31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
