"""Mask rules (scores -> binary mask with a straight-through gradient) and bit packing.

Two rules from the paper:
- threshold: M = [s >= 0], dL/ds = dL/dM (Mallya et al.; used for GNu/NNs).
- top-k:     M keeps the fraction ``density`` of weights with the largest |s|;
             dL/ds = dL/dM * sign(s) (Edge-Popup; used for GG).
A layer uses them through ``masked_weight`` (W ⊙ M and that gradient in one autograd node), or for the
threshold rule ``threshold_weight`` (the same without forming M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class _ThresholdSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _MaskedWeight(torch.autograd.Function):
    """``W ⊙ M`` for a given bool M, with the straight-through gradient to the scores s:
    dL/ds = dL/dW_eff ⊙ W (threshold rule) or dL/dW_eff ⊙ W ⊙ sign(s) (top-k rule, through |s|)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, signed: bool) -> torch.Tensor:
        from supsup import kernels  # kernels import this module

        ctx.save_for_backward(scores, weight)
        ctx.signed = signed
        return kernels.select(keep, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        grad_scores = grad * weight
        if ctx.signed:
            grad_scores = grad_scores.mul_(scores.sign())
        return grad_scores, None, None, None


class _ThresholdWeight(torch.autograd.Function):
    """``W ⊙ [s >= 0]`` in one pass (no bool mask formed), or ``formed``, that product already at hand;
    gradient dL/ds = dL/dW_eff ⊙ W, or dL/dW_eff itself with ``weight_grad`` (for a step that applies ⊙ W)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, formed: torch.Tensor | None,
                weight_grad: bool) -> torch.Tensor:
        from supsup import kernels  # kernels import this module

        ctx.weight_grad = weight_grad
        if not weight_grad:
            ctx.save_for_backward(weight)
        return formed.detach() if formed is not None else kernels.threshold_select(scores, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.weight_grad:
            return grad, None, None, None
        (weight,) = ctx.saved_tensors
        return grad * weight, None, None, None


def kept_count(numel: int, density: float) -> int:
    """Number of weights a top-k mask keeps: the reference's ``numel - int((1 - density) * numel)``."""
    return numel - int((1.0 - density) * numel)


def topk_keep(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask of the ``density`` fraction of largest ``|magnitudes|`` (one mask over the whole tensor)."""
    return topk_keep_many([magnitudes.unsqueeze(0)], [density])[0][0]


def topk_keep_many(scores: Sequence[torch.Tensor], densities: Sequence[float]) -> list[torch.Tensor]:
    """Bool top-k masks of many score tensors from one batched selection.

    ``scores[i]``: ``[K_i, *shape_i]``; each of its K_i rows keeps its own ``kept_count(numel(shape_i),
    densities[i])`` entries of largest |s| (sign ignored). The cut is ``|s| > c`` with c the (keep+1)-th
    largest |s| of the row, so ties at the cut are dropped. Returns bool masks shaped like ``scores``.
    On CUDA one Triton radix select finds every row's cut (four passes over all scores together, no host
    sync, safe inside a CUDA graph); elsewhere one ``kthvalue`` per tensor.
    """
    from supsup import kernels  # kernels import this module

    for density in densities:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
    rows = [s.detach().float().reshape(s.shape[0], -1) for s in scores]
    cutoffs = kernels.topk_cutoffs(rows, [kept_count(r.shape[1], d) for r, d in zip(rows, densities)])
    masks, first = [], 0
    for s, r in zip(scores, rows):
        masks.append((r.abs() > cutoffs[first : first + r.shape[0], None]).view(s.shape))
        first += r.shape[0]
    return masks


def threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    """``[s >= 0]`` as float, straight-through gradient (identity)."""
    return _ThresholdSTE.apply(scores)


def masked_weight(scores: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, rule: str) -> torch.Tensor:
    """Effective weights ``W ⊙ M`` ``[K, *shape]`` from ``weight [*shape]`` and the bool masks ``keep [K, *shape]``
    chosen from ``scores [K, *shape]`` by ``rule``; the gradient reaches the scores straight through M
    (× sign(s) for ``"topk"``, whose masks are chosen on |s|)."""
    return _MaskedWeight.apply(scores, weight, keep, rule == "topk")


def threshold_weight(scores: torch.Tensor, weight: torch.Tensor, formed: torch.Tensor | None = None,
                     weight_grad: bool = False) -> torch.Tensor:
    """``masked_weight(scores, weight, scores >= 0, "threshold")``, the same values and gradient, in one pass
    over the scores instead of three (compare, then select); ``scores [K, *shape]``, ``weight [*shape]``.

    ``formed``: ``W ⊙ [s >= 0]`` of these scores, computed already (by the fused step), returned as is.
    ``weight_grad``: the scores' gradient is dL/d(W ⊙ M), to which the fused step applies ⊙ W itself."""
    return _ThresholdWeight.apply(scores, weight, formed, weight_grad)


_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS_CACHE[device]


def packed_size(num_bits: int) -> int:
    """Bytes needed for ``num_bits`` bits: ⌈P/8⌉."""
    return math.ceil(num_bits / 8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``[..., P]`` bool -> ``[..., ⌈P/8⌉]`` uint8; bit i of byte j holds element 8j + i."""
    mask = mask.to(torch.bool)
    num_bits = mask.shape[-1]
    pad = packed_size(num_bits) * 8 - num_bits
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    grouped = mask.reshape(*mask.shape[:-1], packed_size(num_bits), 8).to(torch.uint8)
    return (grouped << _shifts(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, num_bits: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """``[..., ⌈P/8⌉]`` uint8 -> ``[..., P]`` of ``dtype`` (bool by default)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed masks must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(num_bits):
        raise ValueError(f"{num_bits} bits need {packed_size(num_bits)} bytes, got {packed.shape[-1]}")
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :num_bits]
    return bits.to(dtype)
