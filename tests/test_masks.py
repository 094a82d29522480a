import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supsup.masks import (kept_count, masked_weight, pack_bits, packed_size, threshold_mask, threshold_weight,
                          topk_keep, topk_keep_many, unpack_bits)


def test_threshold_mask_is_scores_at_least_zero_with_identity_gradient():
    scores = torch.tensor([-0.5, 0.0, 0.3, -1e-6], requires_grad=True)
    mask = threshold_mask(scores)
    assert mask.tolist() == [0.0, 1.0, 1.0, 0.0]
    upstream = torch.tensor([1.0, -2.0, 3.0, 4.0])
    (mask * upstream).sum().backward()
    # straight-through: dL/ds = dL/dM, unchanged, also where the mask is 0
    assert scores.grad.tolist() == upstream.tolist()


def test_topk_gradient_is_upstream_times_weight_times_sign_of_scores():
    scores = torch.tensor([[-3.0, 0.5], [2.0, -0.1]], requires_grad=True)
    weight = torch.tensor([[0.5, -0.5], [0.5, 0.5]])
    keep = topk_keep(scores, density=0.5)
    assert keep.tolist() == [[True, False], [True, False]]  # the two largest |s|: -3 and 2
    effective = masked_weight(scores, weight, keep, "topk")
    assert effective.tolist() == [[0.5, 0.0], [0.5, 0.0]]
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (effective * upstream).sum().backward()
    # by hand: g * w * sign(s) = [[1*.5*-1, 2*-.5*1], [3*.5*1, 4*.5*-1]], also where the mask is 0
    assert scores.grad.tolist() == [[-0.5, -1.0], [1.5, -2.0]]


def test_threshold_weight_gradient_is_upstream_times_weight():
    scores = torch.tensor([-0.5, 0.0, 0.3], requires_grad=True)
    weight = torch.tensor([2.0, -2.0, 2.0])
    effective = masked_weight(scores, weight, scores >= 0, "threshold")
    assert effective.tolist() == [0.0, -2.0, 2.0]
    (effective * torch.tensor([1.0, 3.0, -1.0])).sum().backward()
    assert scores.grad.tolist() == [2.0, -6.0, -2.0]


def test_masked_weight_equals_torch_where_bit_for_bit_for_k_tasks():
    """W ⊙ M for K stacked masks over one weight (a C kernel on the CPU): the values of ``torch.where``,
    including +0.0 (not -0.0) where a negative weight is dropped."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(37, 29, generator=gen)
    scores = torch.randn(5, 37, 29, generator=gen)
    effective = masked_weight(scores, weight, scores >= 0, "threshold")
    want = torch.where(scores >= 0, weight, 0.0)
    assert torch.equal(effective, want) and torch.equal(effective.signbit(), want.signbit())


def test_threshold_weight_is_masked_weight_with_the_threshold_rule_in_values_and_gradient():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(37, 29, generator=gen)
    scores = torch.randn(3, 37, 29, generator=gen)
    scores[0, 0, :5] = torch.tensor([0.0, -0.0, float("nan"), 1e-30, -1e-30])
    upstream = torch.randn(3, 37, 29, generator=gen)
    a, b = scores.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    fused, reference = threshold_weight(a, weight), masked_weight(b, weight, b >= 0, "threshold")
    assert torch.equal(fused, reference) and torch.equal(fused.signbit(), reference.signbit())
    (fused * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.equal(a.grad, b.grad)


@settings(max_examples=30, deadline=None)
@given(numel=st.integers(1, 5000), density=st.floats(0.001, 1.0))
def test_topk_keeps_exactly_the_reference_count(numel, density):
    scores = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    mask = topk_keep(scores, density)
    kept = int(mask.sum())
    assert kept == kept_count(numel, density)
    if 0 < kept < numel:  # every kept |s| is above every dropped |s|
        assert scores.abs()[mask].min() > scores.abs()[~mask].max()


def test_topk_rejects_bad_density():
    for bad in (0.0, -0.1, 1.5):
        try:
            topk_keep(torch.randn(4), bad)
        except ValueError as err:
            assert "density" in str(err)
        else:
            raise AssertionError("bad density accepted")


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 4), bits=st.integers(1, 200), seed=st.integers(0, 10_000))
def test_bit_pack_round_trip_at_one_bit_per_weight(rows, bits, seed):
    mask = torch.rand(rows, bits, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(bits / 8))
    assert torch.equal(unpack_bits(packed, bits), mask)


def test_bit_order_is_little_endian_within_a_byte():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[0] = mask[9] = True
    assert pack_bits(mask).tolist() == [1, 2]
    assert packed_size(9) == 2


def test_unpack_rejects_wrong_sizes():
    try:
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 30)
    except ValueError as err:
        assert "30 bits need 4 bytes" in str(err)
    else:
        raise AssertionError


def brute_force_keep(row: torch.Tensor, density: float) -> torch.Tensor:
    """|s| above the (keep+1)-th largest |s| (all when keep = numel): the rule, by a full sort."""
    keep = kept_count(row.numel(), density)
    if keep >= row.numel():
        return torch.ones_like(row, dtype=torch.bool)
    return row.abs() > row.abs().sort(descending=True).values[keep]


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 700), st.floats(0.001, 1.0)), min_size=1, max_size=5),
       ties=st.booleans())
def test_topk_keep_many_equals_a_full_sort_per_row(layers, ties):
    gen = torch.Generator().manual_seed(len(layers))
    scores = [torch.randn(k, n, generator=gen) for k, n, _ in layers]
    if ties:  # quantised scores: many equal |s|, ±0.0 and sign flips at the cut
        scores = [(s * 2).round() / 2 for s in scores]
    masks = topk_keep_many(scores, [d for *_, d in layers])
    for s, m, (_, _, d) in zip(scores, masks, layers):
        assert m.shape == s.shape and m.dtype == torch.bool
        for row, mask in zip(s, m):
            assert torch.equal(mask, brute_force_keep(row, d))
