"""GPU kernels in Triton for bit-packed masks (imported only when Triton is installed).

``contract``: each program owns ``BT`` task rows and one split of the byte columns; it loads a
``[BT, BJ]`` tile of bytes, expands it to ``[BT, BJ, 8]`` bits in registers and reduces against the
matching ``[BJ, 8]`` tile of g. The splits write partial sums ``[n, S, k]`` that one torch ``sum``
finishes (deterministic; no atomics). ``superpose`` is the transpose: each program owns ``BJ`` byte
columns and one split of the task rows. Neither ever writes a float ``[k, P]`` tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _contract_kernel(packed_ptr, g_ptr, live_ptr, out_ptr, k, R, bytes_per_split, num_splits, num_col_blocks,
                     BT: tl.constexpr, BJ: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = tl.program_id(2)
    rows = pid_t * BT + tl.arange(0, BT)
    row_ok = rows < k
    row_off = rows.to(tl.int64) * R
    shifts = tl.arange(0, 8)
    g_base = g_ptr + r.to(tl.int64) * (8 * R)
    acc = tl.zeros([BT, BJ], dtype=tl.float32)
    col0 = pid_s * bytes_per_split
    for j in range(0, bytes_per_split, BJ):
        block = (col0 + j) // BJ
        live = tl.load(live_ptr + r * num_col_blocks + block, mask=block < num_col_blocks, other=0)
        if live != 0:  # skip column blocks where g is all zero (rows of dead ReLUs): exact
            cols = col0 + j + tl.arange(0, BJ)
            col_ok = cols < R
            p = tl.load(packed_ptr + row_off[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0)
            g = tl.load(g_base + cols[:, None] * 8 + shifts[None, :], mask=col_ok[:, None], other=0.0)  # [BJ, 8]
            bits = (p.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 1  # [BT, BJ, 8]
            acc += tl.sum(tl.where(bits != 0, g[None, :, :], 0.0), axis=2)
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + (r * num_splits + pid_s).to(tl.int64) * k + rows, out, mask=row_ok)


@triton.jit
def _contract_lut_kernel(packed_ptr, g_ptr, live_ptr, out_ptr, k, R, rows_per_split, num_col_blocks,
                         BT: tl.constexpr, BJ: tl.constexpr):
    """Byte look-up variant: per column block, a table [256, BJ] of every byte value's partial dot
    product with g, then one gather per byte instead of eight bit operations."""
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = tl.program_id(2)
    cols = pid_j * BJ + tl.arange(0, BJ)
    col_ok = cols < R
    shifts = tl.arange(0, 8)
    g = tl.load(g_ptr + r.to(tl.int64) * (8 * R) + cols[:, None] * 8 + shifts[None, :], mask=col_ok[:, None],
                other=0.0)  # [BJ, 8]
    value_bits = (tl.arange(0, 256)[:, None] >> shifts[None, :]) & 1  # [256, 8]
    table = tl.sum(tl.where(value_bits[:, None, :] != 0, g[None, :, :], 0.0), axis=2)  # [256, BJ]
    row0 = pid_s * rows_per_split
    out_base = out_ptr + (r * num_col_blocks + pid_j).to(tl.int64) * k
    live = tl.load(live_ptr + r * num_col_blocks + pid_j)
    if live != 0:  # the output was zeroed: an all-zero block of g has nothing to add
        for t in range(0, rows_per_split, BT):
            rows = row0 + t + tl.arange(0, BT)
            row_ok = rows < k
            p = tl.load(packed_ptr + rows.to(tl.int64)[:, None] * R + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0).to(tl.int32)
            vals = tl.gather(table, p, axis=0)  # [BT, BJ]: table[p[i, j], j]
            tl.store(out_base + rows, tl.sum(vals, axis=1), mask=row_ok)


@triton.jit
def _superpose_kernel(packed_ptr, alpha_ptr, out_ptr, k, R, rows_per_split, num_splits,
                      BT: tl.constexpr, BJ: tl.constexpr):
    pid_j = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = tl.program_id(2)
    cols = pid_j * BJ + tl.arange(0, BJ)
    col_ok = cols < R
    shifts = tl.arange(0, 8)
    acc = tl.zeros([BJ, 8], dtype=tl.float32)
    row0 = pid_s * rows_per_split
    for t in range(0, rows_per_split, BT):
        rows = row0 + t + tl.arange(0, BT)
        row_ok = rows < k
        p = tl.load(packed_ptr + rows.to(tl.int64)[:, None] * R + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        a = tl.load(alpha_ptr + r.to(tl.int64) * k + rows, mask=row_ok, other=0.0)  # [BT]
        bits = (p.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 1  # [BT, BJ, 8]
        acc += tl.sum(tl.where(bits != 0, a[:, None, None], 0.0), axis=0)
    offs = (r * num_splits + pid_s).to(tl.int64) * (8 * R) + cols[:, None] * 8 + shifts[None, :]
    tl.store(out_ptr + offs, acc, mask=col_ok[:, None])


def _live_blocks(gp: torch.Tensor, bytes_per_block: int) -> torch.Tensor:
    """``[n, ⌈R/BJ⌉] int8``: 1 where the block of ``8·BJ`` entries of g holds a nonzero (one pass over g)."""
    width = 8 * bytes_per_block
    padded = torch.nn.functional.pad(gp, (0, (-gp.shape[1]) % width))
    return padded.view(gp.shape[0], -1, width).ne(0).any(-1).to(torch.int8).contiguous()


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


#: Tiles (rows, bytes, warps); ``benchmarks/gpu_check.py`` times a few and may set the best.
CONTRACT_TILE = (32, 32, 4)
#: ``bits`` (expand bytes to bits in registers) or ``lut`` (a 256-entry table per byte column, gathered).
CONTRACT_VARIANT = "bits"
LUT_TILE = (128, 32, 4)
SUPERPOSE_TILE = (32, 32, 4)


def contract(packed: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[n, k] = g [n, P] · bits(packed [k, R])ᵀ`` (P <= 8R)."""
    packed = packed.contiguous()
    k, R = packed.shape
    n = g.shape[0]
    gp = torch.nn.functional.pad(g.float(), (0, 8 * R - g.shape[1])).contiguous()
    if CONTRACT_VARIANT == "lut":
        return _contract_lut(packed, gp, k, R, n)
    BT, BJ, warps = CONTRACT_TILE
    row_blocks = triton.cdiv(k, BT)
    col_blocks = triton.cdiv(R, BJ)
    splits = max(1, min(col_blocks, triton.cdiv(_target_programs(packed.device), row_blocks * n)))
    bytes_per_split = triton.cdiv(col_blocks, splits) * BJ
    splits = triton.cdiv(R, bytes_per_split)
    partial = torch.empty(n, splits, k, dtype=torch.float32, device=packed.device)
    if k:
        live = _live_blocks(gp, BJ)
        _contract_kernel[(row_blocks, splits, n)](packed, gp, live, partial, k, R, bytes_per_split, splits, col_blocks,
                                                    BT=BT, BJ=BJ, num_warps=warps)
    return partial.sum(1)


def superpose(packed: torch.Tensor, alpha: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``[n, P] = alpha [n, k] @ bits(packed [k, R])``."""
    packed = packed.contiguous()
    k, R = packed.shape
    n = alpha.shape[0]
    alpha = alpha.float().contiguous()
    BT, BJ, warps = SUPERPOSE_TILE
    col_blocks = triton.cdiv(R, BJ)
    row_blocks = triton.cdiv(max(k, 1), BT)
    splits = max(1, min(row_blocks, triton.cdiv(_target_programs(packed.device), col_blocks * n)))
    rows_per_split = triton.cdiv(row_blocks, splits) * BT
    splits = triton.cdiv(max(k, 1), rows_per_split)
    partial = torch.empty(n, splits, 8 * R, dtype=torch.float32, device=packed.device)
    if k:
        _superpose_kernel[(col_blocks, splits, n)](packed, alpha, partial, k, R, rows_per_split, splits, BT=BT, BJ=BJ,
                                                     num_warps=warps)
    else:
        partial.zero_()
    return partial.sum(1)[:, :num_bits]


def _contract_lut(packed: torch.Tensor, gp: torch.Tensor, k: int, R: int, n: int) -> torch.Tensor:
    BT, BJ, warps = LUT_TILE
    col_blocks = triton.cdiv(R, BJ)
    row_blocks = triton.cdiv(max(k, 1), BT)
    splits = max(1, min(row_blocks, triton.cdiv(_target_programs(packed.device), col_blocks * n)))
    rows_per_split = triton.cdiv(row_blocks, splits) * BT
    splits = triton.cdiv(max(k, 1), rows_per_split)
    partial = torch.zeros(n, col_blocks, k, dtype=torch.float32, device=packed.device)
    if k:
        live = _live_blocks(gp, BJ)
        _contract_lut_kernel[(col_blocks, splits, n)](packed, gp, live, partial, k, R, rows_per_split, col_blocks,
                                                      BT=BT, BJ=BJ, num_warps=warps)
    return partial.sum(1)


# ------------------------------------------------------------------------------ top-k cuts
#: Radix digits of 8 bits over the 32-bit pattern of |x| (sign bit 0), most significant first.
_SHIFTS = (24, 16, 8, 0)
_NBINS = 256
#: Entries per histogram program (one program never spans two segments).
TOPK_BLOCK = 4096


@triton.jit
def _radix_histogram_kernel(bits_ptr, tile_start_ptr, tile_stop_ptr, tile_segment_ptr, prefix_ptr, hist_ptr,
                            high_mask, SHIFT: tl.constexpr, NBINS: tl.constexpr, BLOCK: tl.constexpr):
    """One tile (at most BLOCK entries of one segment): histogram of the digit ``|x| >> SHIFT`` over the
    entries whose higher bits equal the segment's prefix so far, added into ``hist [S, NBINS]``."""
    t = tl.program_id(0)
    start = tl.load(tile_start_ptr + t)
    stop = tl.load(tile_stop_ptr + t)
    segment = tl.load(tile_segment_ptr + t)
    prefix = tl.load(prefix_ptr + segment)
    idx = start + tl.arange(0, BLOCK)
    ok = idx < stop
    bits = tl.load(bits_ptr + idx, mask=ok, other=0) & 0x7FFFFFFF  # |x| as ordered int32
    match = ok & ((bits & high_mask) == prefix)
    counts = tl.histogram(tl.where(match, (bits >> SHIFT) & (NBINS - 1), 0), NBINS)
    bins = tl.arange(0, NBINS)
    misses = BLOCK - tl.sum(match.to(tl.int32), axis=0)  # entries that went to bin 0 without matching
    tl.atomic_add(hist_ptr + segment * NBINS + bins, counts - tl.where(bins == 0, misses, 0))


@triton.jit
def _radix_digit_kernel(hist_ptr, need_ptr, prefix_ptr, all_ptr, none_ptr, cut_ptr, SHIFT: tl.constexpr,
                        NBINS: tl.constexpr, LAST: tl.constexpr):
    """One segment: the cut's digit = the largest bin whose count of entries at or above it reaches
    ``need``; then ``need`` -= entries above that bin, the digit joins ``prefix``, the histogram row is
    zeroed for the next digit, and after the last digit the cut is written as a float."""
    s = tl.program_id(0)
    bins = tl.arange(0, NBINS)
    row = hist_ptr + s * NBINS
    at_or_above = tl.cumsum(tl.load(row + (NBINS - 1 - bins)), axis=0)  # position i: bins >= NBINS-1-i
    need = tl.load(need_ptr + s)
    first = NBINS - tl.sum((at_or_above >= need).to(tl.int32), axis=0)  # first position reaching need
    digit = NBINS - 1 - first  # -1 only when the segment has fewer than need entries (keep all)
    above = tl.sum(tl.where(bins == first - 1, at_or_above, 0), axis=0)
    tl.store(need_ptr + s, need - above)
    prefix = tl.load(prefix_ptr + s) | (tl.maximum(digit, 0) << SHIFT)
    tl.store(prefix_ptr + s, prefix)
    tl.store(row + bins, tl.zeros([NBINS], dtype=tl.int32))
    if LAST:
        cut = prefix.to(tl.float32, bitcast=True)
        cut = tl.where(tl.load(none_ptr + s) != 0, float("inf"), cut)
        cut = tl.where(tl.load(all_ptr + s) != 0, float("-inf"), cut)
        tl.store(cut_ptr + s, cut)


_topk_plans: dict = {}


def _topk_plan(device: torch.device, sizes: list[int], keeps: list[int]) -> dict:
    """Tile table and per-segment constants, built once per (device, sizes, keeps)."""
    key = (device, TOPK_BLOCK, tuple(sizes), tuple(keeps))
    if key not in _topk_plans:
        starts, stops, segments, offset = [], [], [], 0
        for i, n in enumerate(sizes):
            for start in range(offset, offset + n, TOPK_BLOCK):
                starts.append(start)
                stops.append(min(start + TOPK_BLOCK, offset + n))
                segments.append(i)
            offset += n
        as_tensor = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        _topk_plans[key] = {"start": as_tensor(starts, torch.int64), "stop": as_tensor(stops, torch.int64),
                            "segment": as_tensor(segments, torch.int32),
                            "need": as_tensor([k + 1 for k in keeps], torch.int32),
                            "all": as_tensor([k >= n for k, n in zip(keeps, sizes)], torch.int8),
                            "none": as_tensor([k <= 0 for k in keeps], torch.int8)}
    return _topk_plans[key]


def topk_cutoffs(flat: torch.Tensor, sizes: list[int], keeps: list[int]) -> torch.Tensor:
    """``[S]`` cuts (the (keep+1)-th largest |x| per segment of ``flat``) by an exact radix select on the
    bit patterns of |x| (ordered like the values): per 8-bit digit, one histogram pass over all segments
    and one small kernel that picks each segment's digit. 8 launches, no sort, no host sync."""
    plan = _topk_plan(flat.device, sizes, keeps)
    bits = flat.contiguous().view(torch.int32)
    num_segments = len(sizes)
    prefix = torch.zeros(num_segments, dtype=torch.int32, device=flat.device)
    need = plan["need"].clone()
    hist = torch.zeros(num_segments, _NBINS, dtype=torch.int32, device=flat.device)
    cuts = torch.empty(num_segments, dtype=torch.float32, device=flat.device)
    for shift in _SHIFTS:
        high_mask = -(1 << (shift + 8)) if shift + 8 < 32 else 0  # bits above this digit
        _radix_histogram_kernel[(plan["start"].numel(),)](bits, plan["start"], plan["stop"], plan["segment"], prefix,
                                                          hist, high_mask, SHIFT=shift, NBINS=_NBINS,
                                                          BLOCK=TOPK_BLOCK, num_warps=8)
        _radix_digit_kernel[(num_segments,)](hist, need, prefix, plan["all"], plan["none"], cuts, SHIFT=shift,
                                             NBINS=_NBINS, LAST=shift == 0, num_warps=4)
    return cuts
