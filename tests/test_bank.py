"""The mask bank: one bit per weight, growable without loss, the running mean always current."""

import math

import pytest
import torch

from supsup import kernels
from supsup.architectures import build_model
from supsup.bank import MaskBank


def random_masks(n, shape, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) < 0.5


def test_bank_grows_past_its_initial_capacity_without_losing_a_mask():
    shape = (7, 13)  # 91 bits: not a multiple of 8
    bank = MaskBank(shape, capacity=2)
    masks = random_masks(37, shape)
    assert bank.add(masks[0]) == [0]
    assert bank.add(masks[1:5]) == [1, 2, 3, 4]
    for m in masks[5:]:
        bank.add(m)
    assert bank.num_tasks == 37 and bank.capacity >= 37
    for t in range(37):
        assert torch.equal(bank.mask(t), masks[t])
    assert torch.equal(bank.masks(torch.arange(37)), masks)
    assert torch.equal(bank.mask_sum, masks.reshape(37, -1).sum(0).float())
    assert torch.allclose(bank.mean_mask(), masks.float().mean(0))


def test_reserve_presizes_and_replace_keeps_the_running_sum():
    shape = (5, 8)
    bank = MaskBank(shape, capacity=1)
    bank.reserve(100)
    storage = bank._packed.data_ptr()
    masks = random_masks(100, shape, seed=1)
    bank.add(masks)
    assert bank._packed.data_ptr() == storage  # no copy after reserve
    new = ~masks[3]
    bank.replace(3, new)
    masks[3] = new
    assert torch.equal(bank.mask(3), new)
    assert torch.equal(bank.mask_sum, masks.reshape(100, -1).sum(0).float())


def test_load_packed_recounts_the_mean():
    shape = (3, 11)
    masks = random_masks(9, shape, seed=2)
    source = MaskBank(shape)
    source.add(masks)
    bank = MaskBank(shape)
    bank.load_packed(source.packed.clone())
    assert torch.equal(bank.mask_sum, source.mask_sum)
    assert torch.equal(bank.masks(torch.arange(9)), masks)


def test_memory_per_task_is_one_bit_per_weight_per_layer():
    shape = (300, 784)
    bank = MaskBank(shape, capacity=1)
    bank.add(random_masks(50, shape))
    assert bank.nbytes_per_task == math.ceil(300 * 784 / 8) == 29_400
    assert bank.packed.dtype == torch.uint8
    assert bank.packed.numel() * bank.packed.element_size() == 50 * bank.nbytes_per_task
    # growth by doubling: what is allocated stays within 2x of what is used, plus the fixed mean
    assert bank._packed.numel() <= 2 * 50 * bank.nbytes_per_task
    model = build_model("lenet", output_size=500, seed=0)
    sizes = [layer.weight.numel() for layer in model.mask_layers()]
    assert model.bytes_per_task() == sum(math.ceil(p / 8) for p in sizes) == 39_400


def test_superpose_and_contract_match_the_float_stack():
    shape = (6, 21)
    masks = random_masks(40, shape, seed=3)
    bank = MaskBank(shape)
    bank.add(masks)
    stack = masks.reshape(40, -1).float()
    alpha = torch.randn(40)
    g = torch.randn(shape)
    assert torch.allclose(bank.superpose(alpha).reshape(-1), alpha @ stack, atol=1e-5)
    assert torch.allclose(bank.contract(g), stack @ g.reshape(-1), atol=1e-5)
    many = torch.randn(3, *shape)
    assert torch.allclose(bank.contract(many), many.reshape(3, -1) @ stack.T, atol=1e-5)
    alphas = torch.randn(4, 40)
    assert torch.allclose(bank.superpose_many(alphas).reshape(4, -1), alphas @ stack, atol=1e-5)
    assert torch.equal(bank.masked_weight(5, g), g * masks[5])
    delta, x = torch.randn(2, 6), torch.randn(2, 21)
    want = ((delta[:, :, None] * x[:, None, :]) * g).reshape(2, -1) @ stack.T
    assert torch.allclose(bank.contract_factored(delta, x, g), want, atol=1e-5)


def test_bank_errors_say_what_was_expected():
    bank = MaskBank((4, 4))
    with pytest.raises(RuntimeError, match="empty"):
        bank.mean_mask()
    with pytest.raises(ValueError, match="does not match"):
        bank.add(torch.ones(3, 5, dtype=torch.bool))
    bank.add(torch.ones(4, 4))
    with pytest.raises(IndexError, match="not learned"):
        bank.mask(1)
    with pytest.raises(ValueError, match="alpha has 2 entries"):
        bank.superpose(torch.ones(2))
    with pytest.raises(ValueError, match="kernel backend"):
        with kernels.use_backend("fortran"):
            pass


def test_moving_a_bank_puts_its_masks_in_the_layout_of_the_device(monkeypatch):
    """Rows on a device without the CPU kernels (e.g. a GPU), tiles on the CPU: ``.to()`` converts (here a
    device without tiles is simulated by switching them off), and every mask survives both ways."""
    if not kernels.tiled("cpu"):
        pytest.skip("no native kernels: the CPU keeps rows too, nothing to convert")
    shape, masks = (9, 13), random_masks(21, (9, 13), seed=4)
    bank = MaskBank(shape)
    bank.add(masks)
    assert bank._packed.dim() == 3  # tiles
    monkeypatch.setattr(kernels, "tiled", lambda device: False)
    bank.to("cpu")
    assert bank._packed.dim() == 2 and torch.equal(bank.masks(torch.arange(21)), masks)
    monkeypatch.undo()
    bank.to("cpu")
    assert bank._packed.dim() == 3 and torch.equal(bank.masks(torch.arange(21)), masks)
    assert torch.equal(bank.mask_sum, masks.reshape(21, -1).sum(0).int())


def test_add_packed_appends_rows_as_packed_holds_them():
    shape = (5, 13)
    masks = random_masks(6, shape, seed=3)
    whole = MaskBank(shape, capacity=1)
    whole.add(masks)
    rows = MaskBank(shape, capacity=1)
    assert rows.add_packed(whole.packed[:4].clone()) == [0, 1, 2, 3]
    assert rows.add_packed(whole.packed[4:].clone()) == [4, 5]
    assert torch.equal(rows.packed, whole.packed) and torch.equal(rows.mask_sum, whole.mask_sum)
    with pytest.raises(ValueError, match="expected packed masks"):
        rows.add_packed(whole.packed.int())
