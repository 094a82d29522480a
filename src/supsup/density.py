"""Layer-wise density budgets for top-k supermasks (scenario GG).

Erdős–Rényi budget (Mocanu et al.), capped at 0.5 as in the paper:
    density_l = min(0.5, m · (c_in + c_out) / (c_in · c_out · k_h · k_w))
with m the ER multiplier ("higher means denser"). A Linear layer counts as a 1×1 conv. Every masked layer
gets a budget: the first conv, the shortcuts and the final layer too.
"""

from __future__ import annotations

import math

from torch import nn

from supsup.convert import DensityFn


def weight_shape(module: nn.Module) -> tuple[int, int, int, int]:
    """``(c_out, c_in, k_h, k_w)`` of a Conv2d (``c_in`` per group) or a Linear (as 1×1), of either the
    ordinary or the supermask layer."""
    from supsup.layers import SupermaskConv2d, SupermaskLinear

    if isinstance(module, (nn.Conv2d, SupermaskConv2d)):
        kh, kw = nn.modules.utils._pair(module.kernel_size)
        return module.out_channels, module.in_channels // module.groups, kh, kw
    if isinstance(module, (nn.Linear, SupermaskLinear)):
        return module.out_features, module.in_features, 1, 1
    raise TypeError(f"{type(module).__name__} is neither a Conv2d nor a Linear layer")


def er_layer_density(shape: tuple[int, ...], multiplier: float, cap: float = 0.5) -> float:
    """ER density of one layer with weight shape ``[c_out, c_in, k_h, k_w]`` (or ``[c_out, c_in]``)."""
    c_out, c_in = shape[0], shape[1]
    kernel = math.prod(shape[2:]) if len(shape) > 2 else 1
    return min(cap, multiplier * (c_in + c_out) / (c_in * c_out * kernel))


def er_density(multiplier: float, cap: float = 0.5) -> DensityFn:
    """A ``DensityFn`` (for ``convert_to_supermask`` / ``build_model(density=...)``) giving ER budgets."""
    if multiplier <= 0:
        raise ValueError(f"the ER multiplier must be positive, got {multiplier}")

    def density(name: str, module: nn.Module) -> float | None:
        try:
            shape = weight_shape(module)
        except TypeError:
            return None  # not a maskable layer (convert asks every child)
        return er_layer_density(shape, multiplier, cap)

    density.multiplier = multiplier  # type: ignore[attr-defined]
    return density


def masked_shapes(net: nn.Module) -> list[tuple[int, int, int, int]]:
    """``(c_out, c_in, k_h, k_w)`` of every Conv2d/Linear (ordinary or supermask) in ``net``, in order."""
    out = []
    for m in net.modules():
        try:
            out.append(weight_shape(m))
        except TypeError:
            continue
    return out


def overall_density(shapes: list[tuple[int, ...]], multiplier: float, cap: float = 0.5) -> float:
    """Fraction of all masked weights kept at ER multiplier ``m`` (exact top-k counts per layer)."""
    from supsup.masks import kept_count

    total = kept = 0
    for shape in shapes:
        n = math.prod(shape)
        total += n
        kept += kept_count(n, er_layer_density(shape, multiplier, cap))
    return kept / total
