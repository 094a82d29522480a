import math

import pytest
import torch

from supsup.architectures import build_model
from supsup.density import er_density, masked_shapes
from supsup.resnets import gem_resnet18
from supsup.storage import (CscConvention, bitpacked_bytes, csc_bytes, resnet50_parameters, splitimagenet_table,
                            supsup_csc_bytes, supsup_csc_bytes_closed_form)


def test_csc_bytes_of_a_small_mask_by_hand():
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)  # viewed as [4, 18]: 18 columns
    mask[0, 0, 0, 0] = mask[3, 1, 2, 2] = mask[2, 1, 0, 1] = True
    assert csc_bytes(mask) == 3 * 2 + 19 * 4  # nnz int16 indices + (ncols + 1) int32 pointers
    assert csc_bytes(mask, CscConvention(2, 2)) == 3 * 2 + 19 * 2


def test_masks_cost_one_bit_per_weight_packed():
    model = build_model("gem_resnet18", output_size=5, num_classes=5, seed=0, rule="topk", density=er_density(4), nf=4)
    shapes = masked_shapes(gem_resnet18(5, nf=4))
    assert model.mask_bytes_per_task() == bitpacked_bytes(shapes) == sum(math.ceil(math.prod(s) / 8) for s in shapes)
    channels = sum(bn.num_features for bn in model.norm_layers())
    assert model.bytes_per_task() == model.mask_bytes_per_task() + 2 * channels * 4  # + BN mean/var in fp32


def test_closed_form_equals_counting_real_masks():
    shapes = masked_shapes(gem_resnet18(5))
    assert supsup_csc_bytes(shapes, 8, 3) == supsup_csc_bytes_closed_form(shapes, 8, 3)


def test_resnet50_has_the_papers_25_56M_parameters():
    assert resnet50_parameters(1000) == 25_557_032


def _rows(**kw):
    return {r["row"]: r for r in splitimagenet_table(**kw)}


def test_upper_bound_single_model_and_batche_rows_within_2_percent():
    rows = _rows()
    for name in ("Upper Bound", "Single Model", "BatchE (GG)"):
        assert abs(rows[name]["gap"]) < 0.02, rows[name]
    assert rows["Upper Bound"]["ours"] == 100 * 25_557_032 * 4


def test_supsup_rows_in_the_papers_csc_format():
    """ER m = 16 / 8 / 4 masks of ResNet-50 in CSC (int16 row indices of mask.reshape(c_out, -1), int32
    column pointers). The m = 8 row matches within 2%; no convention tried brings all three within 2%
    (see REPRODUCIBILITY.md): the gaps are pinned here so a change is noticed."""
    rows = _rows()
    assert rows["SupSup (GG) m=8"]["gap"] == pytest.approx(0.0159, abs=0.001)
    assert rows["SupSup (GG) m=16"]["gap"] == pytest.approx(-0.0720, abs=0.001)
    assert rows["SupSup (GG) m=4"]["gap"] == pytest.approx(-0.0395, abs=0.001)
    # the ordering of the paper's rows (bytes fall with the multiplier) holds
    assert rows["SupSup (GG) m=16"]["ours"] > rows["SupSup (GG) m=8"]["ours"] > rows["SupSup (GG) m=4"]["ours"]
