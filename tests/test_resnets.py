import math

import pytest
import torch
from torch import nn

from supsup.architectures import build_model
from supsup.density import er_density, masked_shapes
from supsup.layers import MultitaskBatchNorm, SupermaskConv2d, SupermaskLinear
from supsup.model import SupermaskModel
from supsup.resnets import gem_resnet18, resnet50


def test_reduced_resnet18_has_the_papers_1_090_940_bias_free_weights():
    net = gem_resnet18(output_size=5)
    assert sum(math.prod(s) for s in masked_shapes(net)) == 1_090_940
    assert all(getattr(m, "bias", None) is None for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks × 2, three 1×1 shortcuts
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_first_conv_takes_grey_28x28_images():
    net = gem_resnet18(output_size=2, in_channels=1, nf=4)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 2)


def test_resnet50_has_23_48M_masked_weights_with_a_2048_to_10_fc():
    with torch.device("meta"):
        net = resnet50(output_size=10)
    shapes = masked_shapes(net)
    assert sum(math.prod(s) for s in shapes) == 23_475_392
    assert shapes[-1] == (10, 2048, 1, 1) and shapes[0] == (64, 3, 7, 7)
    assert len(shapes) == 54  # 53 convs (4 of them shortcuts) + fc


def test_tiny_resnet50_runs_masked():
    model = build_model("resnet50", output_size=3, num_classes=3, seed=0, rule="topk", density=er_density(4), width=4)
    model.begin_tasks(1)
    assert model(torch.randn(2, 3, 32, 32), 0).shape == (2, 3)


def test_every_conv_and_the_fc_are_masked_and_bn_is_per_task():
    model = build_model("gem_resnet18", output_size=5, num_classes=5, seed=0, rule="topk", density=er_density(4), nf=4)
    assert sum(isinstance(m, SupermaskConv2d) for m in model.modules()) == 20
    assert isinstance(model.net.fc, SupermaskLinear)
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for m in model.modules())
    assert sum(isinstance(m, MultitaskBatchNorm) for m in model.modules()) == 20


class UserResNet(nn.Module):
    """What a user might write: plain Conv2d/BatchNorm2d/Linear and a residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def test_a_user_written_residual_net_becomes_a_supermask_model():
    model = SupermaskModel(UserResNet(), seed=0, rule="topk", density=er_density(2))
    assert len(model.mask_layers()) == 4 and len(model.norm_layers()) == 3
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(2):
        model.begin_tasks(1)
        opt = torch.optim.Adam(model.score_parameters(), lr=0.1)
        model.train()
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x, model.training_tasks[0]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.end_tasks()
    model.eval()
    assert model.num_tasks == 2
    assert not torch.equal(model(x, 0), model(x, 1))  # each task has its own masks and BN statistics
    with pytest.raises(IndexError):
        model(x, 2)
