"""Bytes a continual learner stores, computed from the shapes and masks it actually keeps.

Two forms for supermasks:
- **bit-packed** (what ``MaskBank`` stores): ⌈P/8⌉ bytes per layer per task;
- **the paper's** ``scipy.sparse`` CSC with 16-bit integers. A mask ``[c_out, c_in, k_h, k_w]`` is viewed as
  the 2-D matrix ``[c_out, c_in·k_h·k_w]`` (``mask.reshape(c_out, -1)``: one column per input position of
  the kernel, row index = output channel < 2¹⁶ in every paper network). CSC bytes =
  nnz · index_bytes + (ncols + 1) · indptr_bytes; the data array of a binary mask is all ones and is not
  stored. ``CscConvention`` names the choice of integer widths.

The SplitImageNet byte table of the paper (Fig. 2 left) is rebuilt by ``splitimagenet_table`` from random
masks at the ER densities (a top-k mask's nnz is fixed by its density, so no training is needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from supsup.density import er_layer_density
from supsup.masks import kept_count, packed_size, topk_keep
from supsup.seeding import generator

FP32 = 4


@dataclass(frozen=True)
class CscConvention:
    """Integer widths of a CSC store of ``mask.reshape(c_out, -1)``."""

    index_bytes: int = 2   # row indices: 16-bit, as the paper says
    indptr_bytes: int = 4  # column pointers: scipy's default int32
    name: str = "CSC int16 indices, int32 indptr"


#: The conventions tried against the paper's numbers, most natural first.
CONVENTIONS = (
    CscConvention(2, 4, "CSC int16 indices, int32 indptr"),
    CscConvention(2, 2, "CSC int16 indices and indptr"),
    CscConvention(2, 0, "int16 indices only"),
)


def bitpacked_bytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of one task's masks bit-packed: Σ_layers ⌈P_l/8⌉."""
    return sum(packed_size(math.prod(s)) for s in shapes)


def csc_bytes(mask: torch.Tensor, convention: CscConvention = CscConvention()) -> int:
    """Exact CSC bytes of one layer's mask ``[c_out, ...]`` viewed as ``[c_out, Π rest]``."""
    matrix = mask.reshape(mask.shape[0], -1)
    if matrix.shape[0] > 1 << (8 * convention.index_bytes) and convention.index_bytes < 8:
        raise ValueError(f"{matrix.shape[0]} rows do not fit {8 * convention.index_bytes}-bit indices")
    nnz = int(matrix.count_nonzero())
    return nnz * convention.index_bytes + (matrix.shape[1] + 1) * convention.indptr_bytes


def er_random_masks(shapes: list[tuple[int, ...]], multiplier: float, seed: int = 0) -> list[torch.Tensor]:
    """One random bool mask per layer at its ER density (top-k of uniform scores): what a trained top-k
    mask looks like to a store, since its nnz is fixed by the density."""
    masks = []
    for i, shape in enumerate(shapes):
        scores = torch.rand(shape, generator=generator(seed, "storage-mask", i))
        masks.append(topk_keep(scores, er_layer_density(shape, multiplier)))
    return masks


def supsup_csc_bytes(shapes: list[tuple[int, ...]], multiplier: float, num_tasks: int,
                     convention: CscConvention = CscConvention(), seed: int = 0) -> int:
    """Bytes of ``num_tasks`` tasks' ER masks in CSC (every task's masks have the same nnz per layer)."""
    return num_tasks * sum(csc_bytes(m, convention) for m in er_random_masks(shapes, multiplier, seed))


def supsup_csc_bytes_closed_form(shapes: list[tuple[int, ...]], multiplier: float, num_tasks: int,
                                 convention: CscConvention = CscConvention()) -> int:
    """Same as ``supsup_csc_bytes`` from the top-k counts alone (no mask is built)."""
    per_task = 0
    for s in shapes:
        n = math.prod(s)
        per_task += kept_count(n, er_layer_density(s, multiplier)) * convention.index_bytes
        per_task += (n // s[0] + 1) * convention.indptr_bytes
    return num_tasks * per_task


def batche_bytes(shapes: list[tuple[int, ...]], num_tasks: int, base_parameters: int) -> int:
    """BatchE: one fp32 base network plus per task a rank-one pair (s: c_out, r: c_in) for every layer."""
    per_task = sum(s[0] + s[1] for s in shapes)
    return base_parameters * FP32 + num_tasks * per_task * FP32


def dense_bytes(parameters: int, copies: int = 1) -> int:
    """``copies`` fp32 networks of ``parameters`` each (Upper Bound: one per task)."""
    return copies * parameters * FP32


# --------------------------------------------------------------------------- paper's SplitImageNet table
PAPER_SPLITIMAGENET = {  # bytes, paper Fig. 2 (left); "M" = 10^6
    "Upper Bound": 10222.81e6,
    "SupSup (GG) m=16": 195.18e6,
    "SupSup (GG) m=8": 100.98e6,
    "SupSup (GG) m=4": 65.50e6,
    "BatchE (GG)": 124.99e6,
    "Single Model": 102.23e6,
}


def resnet50_layer_shapes(num_classes: int = 10) -> list[tuple[int, int, int, int]]:
    """``(c_out, c_in, k_h, k_w)`` of every conv and the fc (as 1×1) of ResNet-50, in forward order."""
    from supsup.density import masked_shapes
    from supsup.resnets import resnet50

    with torch.device("meta"):
        return masked_shapes(resnet50(output_size=num_classes))


def resnet50_parameters(num_classes: int = 1000) -> int:
    """Parameters of a standard (torchvision) ResNet-50: conv + fc weights, fc bias, BN affine (γ, β).
    25,557,032 at 1000 classes, the paper's "25.56M"."""
    shapes = resnet50_layer_shapes(num_classes)
    bn_channels = sum(s[0] for s in shapes[:-1])
    return sum(math.prod(s) for s in shapes) + num_classes + 2 * bn_channels


def splitimagenet_table(num_tasks: int = 100, convention: CscConvention = CscConvention(),
                        mask_classes: int = 10) -> list[dict]:
    """Rows of the paper's SplitImageNet byte table next to ours (masks of a 2048→``mask_classes`` ResNet-50).

    Returns dicts: ``row``, ``paper`` (bytes), ``ours`` (bytes), ``gap`` (ours/paper − 1), ``how``."""
    shapes = resnet50_layer_shapes(mask_classes)
    base = resnet50_parameters(1000)
    rows = [("Upper Bound", dense_bytes(base, num_tasks), f"{num_tasks} × ResNet-50 fp32 ({base:,} parameters)"),
            ("Single Model", dense_bytes(base), f"one ResNet-50 fp32 ({base:,} parameters)")]
    for m in (16, 8, 4):
        rows.append((f"SupSup (GG) m={m}", supsup_csc_bytes_closed_form(shapes, m, num_tasks, convention),
                     f"{num_tasks} tasks of ER m={m} masks, {convention.name}"))
    rows.append(("BatchE (GG)", batche_bytes(resnet50_layer_shapes(1000), num_tasks, base),
                 f"ResNet-50 fp32 + {num_tasks} × rank-one (c_in + c_out) fp32 factors per layer"))
    return [{"row": name, "paper": PAPER_SPLITIMAGENET[name], "ours": ours,
             "gap": ours / PAPER_SPLITIMAGENET[name] - 1, "how": how} for name, ours, how in rows]


def implied_multiplier(target_bytes: float, shapes: list[tuple[int, ...]], num_tasks: int = 100,
                       convention: CscConvention = CscConvention()) -> float:
    """The (real) ER multiplier whose masks would cost ``target_bytes`` under ``convention`` (bisection)."""
    lo, hi = 1e-3, 1e3
    for _ in range(80):
        mid = (lo * hi) ** 0.5
        if supsup_csc_bytes_closed_form(shapes, mid, num_tasks, convention) < target_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def format_table(rows: list[dict]) -> str:
    """The byte table as Markdown (M = 10^6 bytes)."""
    from supsup.tables import make_table, markdown

    return markdown(make_table(["row", ("paper", "right"), ("ours", "right"), ("gap", "right"), "how"],
                               [(r["row"], f"{r['paper'] / 1e6:,.2f}M", f"{r['ours'] / 1e6:,.2f}M",
                                 f"{100 * r['gap']:+.2f}%", r["how"]) for r in rows]))


if __name__ == "__main__":  # python -m supsup.storage
    for conv in CONVENTIONS:
        for classes in (10, 1000):
            print(f"\n### {conv.name}; masks for a 2048→{classes} fc\n")
            print(format_table(splitimagenet_table(convention=conv, mask_classes=classes)))
            implied = [implied_multiplier(PAPER_SPLITIMAGENET[f"SupSup (GG) m={m}"], resnet50_layer_shapes(classes),
                                          convention=conv) for m in (16, 8, 4)]
            print("\nER multipliers that would give the paper's SupSup rows exactly:",
                  ", ".join(f"{x:.2f}" for x in implied))
