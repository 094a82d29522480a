"""CPU kernels in C (``native.c``), compiled with the system C compiler on first use and loaded with ctypes.

No torch headers are involved, so a build takes well under a second; the shared library is cached under
``$SUPSUP_CACHE`` (default ``~/.cache/supsup``) keyed by the source, the compiler flags and the CPU's
feature flags (the build uses ``-march=native``). When no compiler works, ``available()`` is False and
the caller falls back to the pure-torch path. ``SUPSUP_NATIVE=0`` disables the library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("SUPSUP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "supsup")
    return Path(root) / "kernels"


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_text()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    key = hashlib.sha256("\0".join([source, compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"supsup_native_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
            os.replace(built, target)  # atomic: concurrent builders all end with a complete file
    lib = ctypes.CDLL(str(target))
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    for name, args, result in (("ss_contract", [ptr, i64, i64, i64, ptr, i64, ptr, i32], i32),
                               ("ss_contract_factored", [ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, ptr, i32],
                                i32),
                               ("ss_superpose", [ptr, i64, i64, i64, ptr, i64, ptr, i32], i32),
                               ("ss_unpack", [ptr, i64, i64, i64, i64, ptr, ptr, i32], i32),
                               ("ss_to_tiles", [ptr, i64, i64, ptr, i64, i64], None),
                               ("ss_to_rows", [ptr, i64, i64, i64, ptr], None),
                               ("ss_select", [ptr, i64, i64, ptr, ptr], None),
                               ("ss_threshold_select", [ptr, i64, i64, ptr, ptr], None),
                               ("ss_rmsprop_threshold", [ptr, ptr, ptr, ptr, i64, i64, f32, f32, f32, f32, ptr, i32],
                                None)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first call; None when it cannot be built."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("SUPSUP_NATIVE", "1") == "0":
                _error = "disabled by SUPSUP_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, read-only cache, odd platform: use torch instead
                    _error = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"supsup: the native CPU kernels could not be built ({_error[:300]}); using the "
                                  f"slower torch path. Install a C compiler (or set CC) to get them.",
                                  RuntimeWarning, stacklevel=2)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    library()
    return _error


def _threads(work_bytes: int) -> int:
    return 1 if work_bytes < THREADS_FROM_BYTES else max(1, torch.get_num_threads())


def _padded(vec: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., P]`` float32 contiguous, zero-padded to ``[..., length]``."""
    vec = vec.to(torch.float32)
    if vec.shape[-1] < length:
        vec = torch.nn.functional.pad(vec, (0, length - vec.shape[-1]))
    return vec.contiguous()


def _tiles(tiles: torch.Tensor) -> tuple[int, int, int, int]:
    """``(pointer, k, cap, C)`` of a tile view ``[C, k, 4] uint8`` (tasks at a stride of ``cap`` dwords)."""
    if tiles.dtype != torch.uint8 or tiles.dim() != 3 or tiles.shape[2] != 4 or tiles.device.type != "cpu" \
            or tiles.stride(2) != 1 or (tiles.shape[1] > 1 and tiles.stride(1) != 4) or tiles.stride(0) % 4 \
            or tiles.data_ptr() % 4:
        raise ValueError(f"expected mask tiles [C, k, 4] uint8 on the CPU with whole dwords, got {tuple(tiles.shape)} "
                         f"{tiles.dtype} strides {tiles.stride()} on {tiles.device}")
    C, k, _ = tiles.shape
    return tiles.data_ptr(), k, max(tiles.stride(0) // 4, k), C


#: Work (packed bytes × right-hand sides) below which one thread does it all: starting and joining
#: threads costs tens of µs, and on a busy machine a second thread may wait a whole time slice.
THREADS_FROM_BYTES = 1 << 21


def contract(tiles: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[n, k] = g [n, P] · bits(tiles [C, k, 4])ᵀ``, P <= 32C."""
    ptr, k, cap, C = _tiles(tiles)
    gp = _padded(g, 32 * C)
    out = torch.empty(g.shape[0], k, dtype=torch.float32)
    if k and library().ss_contract(ptr, k, cap, C, gp.data_ptr(), g.shape[0], out.data_ptr(),
                                   _threads(4 * k * C * g.shape[0])):
        raise MemoryError("ss_contract could not allocate its partial sums")
    return out


def contract_factored(tiles: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[n, k]``: row r is ``delta_r [out]ᵀ (W ⊙ M_t) x_r [in]`` for ``weight [out, in]``, i.e. ``contract`` of
    ``g_r = (delta_r x_rᵀ) ⊙ W`` (the same float products) without forming g."""
    ptr, k, cap, C = _tiles(tiles)
    delta, x = delta.to(torch.float32).contiguous(), x.to(torch.float32).contiguous()
    w = _padded(weight.reshape(-1), 32 * C)
    out = torch.empty(delta.shape[0], k, dtype=torch.float32)
    if k and library().ss_contract_factored(ptr, k, cap, C, delta.data_ptr(), x.data_ptr(), weight.shape[1],
                                            weight.numel(), w.data_ptr(), delta.shape[0], out.data_ptr(),
                                            _threads(4 * k * C * delta.shape[0])):
        raise MemoryError("ss_contract_factored could not allocate its partial sums")
    return out


def superpose(tiles: torch.Tensor, alpha: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``[n, P] = alpha [n, k] @ bits(tiles [C, k, 4])``."""
    ptr, k, cap, C = _tiles(tiles)
    alpha = alpha.to(torch.float32).contiguous()
    out = torch.empty(alpha.shape[0], 32 * C, dtype=torch.float32)
    if k:
        library().ss_superpose(ptr, k, cap, C, alpha.data_ptr(), alpha.shape[0], out.data_ptr(),
                               _threads(4 * k * C * alpha.shape[0]))
    else:
        out.zero_()
    return out[:, :num_bits]


def unpack(tiles: torch.Tensor, num_bits: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[k, P]`` float32: the bits of ``tiles [C, k, 4]``, times ``weight [P]`` when given."""
    ptr, k, cap, C = _tiles(tiles)
    w = None if weight is None else _padded(weight.reshape(-1), 32 * C)
    out = torch.empty(k, num_bits, dtype=torch.float32)
    if k:
        library().ss_unpack(ptr, k, cap, C, num_bits, None if w is None else w.data_ptr(), out.data_ptr(),
                            _threads(4 * k * num_bits))
    return out


def write_tiles(store: torch.Tensor, first: int, rows: torch.Tensor) -> None:
    """Write ``rows [n, R] uint8`` as tasks ``first ..`` of the tile buffer ``store [C, cap, 4]``."""
    ptr, _, cap, C = _tiles(store)
    rows = rows.to(device="cpu", dtype=torch.uint8).contiguous()
    if rows.dim() != 2 or (rows.shape[1] + 3) // 4 != C or first + rows.shape[0] > cap:
        raise ValueError(f"rows {tuple(rows.shape)} do not fit tasks {first}.. of tiles {tuple(store.shape)}")
    library().ss_to_tiles(rows.data_ptr(), rows.shape[0], rows.shape[1], ptr, cap, first)


def read_rows(tiles: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """The canonical rows ``[k, R] uint8`` of ``tiles [C, k, 4]``."""
    ptr, k, cap, C = _tiles(tiles)
    if (row_bytes + 3) // 4 != C:
        raise ValueError(f"{row_bytes} bytes per row do not match {C} tile columns")
    rows = torch.empty(k, row_bytes, dtype=torch.uint8)
    library().ss_to_rows(ptr, k, cap, row_bytes, rows.data_ptr())
    return rows


def threshold_select(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.where(scores >= 0, weight, 0.0)`` for float32 ``scores [K, *shape]``, ``weight [*shape]``, one pass."""
    scores, weight = scores.contiguous(), weight.contiguous()
    out = torch.empty(scores.shape, dtype=torch.float32)
    library().ss_threshold_select(scores.data_ptr(), scores.numel() // max(weight.numel(), 1), weight.numel(),
                                  weight.data_ptr(), out.data_ptr())
    return out


def rmsprop_threshold(scores: torch.Tensor, square_avg: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                      lr: float, alpha: float, eps: float, out: torch.Tensor) -> None:
    """One RMSprop step on threshold scores from ``grad = dL/d(W ⊙ M)`` (the scores' gradient is ``grad ⊙ W``),
    then ``out = W ⊙ [scores >= 0]``, in one pass: ``scores, square_avg, out`` (updated), ``grad [K, *shape]``
    and ``weight [*shape]``, all contiguous CPU float32."""
    tensors = (scores, square_avg, grad, out, weight)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors) \
            or any(t.shape != scores.shape for t in tensors[:4]) or scores.shape[1:] != weight.shape:
        raise ValueError(f"rmsprop_threshold needs contiguous CPU float32 [K, *shape] tensors and a [*shape] weight; "
                         f"got {[(tuple(t.shape), t.dtype) for t in tensors]}")
    library().ss_rmsprop_threshold(scores.data_ptr(), square_avg.data_ptr(), grad.data_ptr(), weight.data_ptr(),
                                   scores.shape[0], weight.numel(), alpha, 1 - alpha, eps, lr, out.data_ptr(),
                                   _threads(4 * scores.numel()))


def select(keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.where(keep, weight, 0.0)`` for bool ``keep [K, *shape]`` and float32 ``weight [*shape]``, one pass."""
    keep, weight = keep.contiguous(), weight.contiguous()
    out = torch.empty(keep.shape, dtype=torch.float32)
    library().ss_select(keep.data_ptr(), keep.numel() // max(weight.numel(), 1), weight.numel(), weight.data_ptr(),
                        out.data_ptr())
    return out
