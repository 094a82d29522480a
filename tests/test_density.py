import math

import pytest
import torch
from torch import nn

from supsup.architectures import build_model
from supsup.density import er_density, er_layer_density, masked_shapes, overall_density
from supsup.gg import paper_gg_config
from supsup.resnets import gem_resnet18, resnet50


def test_er_budget_of_one_layer():
    # 3×3 conv 40 → 80 at m = 4: 4 · 120 / (40 · 80 · 9)
    assert er_layer_density((80, 40, 3, 3), 4) == pytest.approx(4 * 120 / 28800)
    assert er_layer_density((5, 160, 1, 1), 4) == 0.5  # capped
    assert er_layer_density((5, 160), 1) == er_layer_density((5, 160, 1, 1), 1)  # a Linear is a 1×1 conv


def test_density_fn_sees_linear_as_1x1():
    fn = er_density(1)
    assert fn("fc", nn.Linear(160, 5, bias=False)) == fn("fc", nn.Conv2d(160, 5, 1, bias=False))


@pytest.mark.parametrize("m, percent", [(1, 0.26), (2, 0.53), (4, 1.03), (8, 2.0), (16, 3.9), (32, 7.5)])
def test_reduced_resnet18_overall_density_matches_the_spec_table(m, percent):
    got = 100 * overall_density(masked_shapes(gem_resnet18(5)), m)
    assert got == pytest.approx(percent, abs=0.005 if percent < 1.9 else 0.05)


@pytest.mark.parametrize("m, percent", [(4, 0.87), (8, 1.72), (16, 3.39), (32, 6.67)])
def test_resnet50_overall_density_matches_the_spec_table(m, percent):
    with torch.device("meta"):
        shapes = masked_shapes(resnet50(10))
    assert 100 * overall_density(shapes, m) == pytest.approx(percent, abs=0.005)


def test_topk_masks_keep_the_er_count_in_every_layer():
    model = build_model("gem_resnet18", output_size=5, num_classes=5, seed=0, rule="topk", density=er_density(8), nf=4)
    model.begin_tasks(1)
    for layer in model.mask_layers():
        n = layer.weight.numel()
        assert layer.density == er_layer_density(tuple(layer.weight.shape), 8)
        assert int(layer.training_weights().count_nonzero()) == n - int((1 - layer.density) * n)


def test_paper_gg_optimiser():
    cfg = paper_gg_config(batches_per_task=10)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.cosine) == ("adam", 1e-3, 1e-4, True)
    assert math.isclose(cfg.lr, 1e-3)
