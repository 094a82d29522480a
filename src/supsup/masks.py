"""Mask rules (scores -> binary mask with a straight-through gradient) and bit packing.

Two rules from the paper:
- threshold: M = [s >= 0], dL/ds = dL/dM (Mallya et al.; used for GNu/NNs).
- top-k:     M keeps the fraction ``density`` of weights with the largest |s|;
             dL/ds = dL/dM * sign(s) (Edge-Popup; used for GG).
"""

from __future__ import annotations

import math

import torch


class _ThresholdSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _TopKSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: float) -> torch.Tensor:
        return topk_keep(magnitudes, density).to(magnitudes.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def kept_count(numel: int, density: float) -> int:
    """Number of weights a top-k mask keeps: the reference's ``numel - int((1 - density) * numel)``."""
    return numel - int((1.0 - density) * numel)


def topk_keep(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask of the ``density`` fraction of largest entries, per leading slice.

    ``magnitudes``: ``[*shape]`` (one mask) or ``[K, *shape]`` with ``batched`` leading dim handled by
    the caller. Uses a selection (``kthvalue``, O(n)), not a full sort.
    """
    flat = magnitudes.reshape(-1)
    keep = kept_count(flat.numel(), density)
    if keep >= flat.numel():
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    cutoff = flat.kthvalue(flat.numel() - keep).values
    return magnitudes > cutoff


def threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    """``[s >= 0]`` as float, straight-through gradient (identity)."""
    return _ThresholdSTE.apply(scores)


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Top-``density`` fraction of ``|scores|`` as float; gradient flows through ``abs`` (× sign(s))."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return _TopKSTE.apply(scores.abs(), density)


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
