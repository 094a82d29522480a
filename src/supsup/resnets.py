"""Residual networks of the paper's GG experiments, as ordinary bias-free ``nn.Module`` s.

- ``gem_resnet18``: the reduced ResNet-18 of GEM used for SplitCIFAR100 (nf = 20, 1,090,940 weights
  at 5 outputs): conv3x3 → 4 stages × 2 BasicBlocks (widths nf·1/2/4/8, strides 1/2/2/2) → pool → fc.
- ``resnet50``: torchvision-style ResNet-50 (bottleneck, stride on the 3×3, "v1.5") used for SplitImageNet;
  23,475,392 weights with a 2048 → 10 fc.

Both use plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` so the same module serves as a dense
baseline (affine BN, trained weights) or, after ``convert_to_supermask``, as a SupSup model (frozen
signed-constant weights, per-task masks and per-task BN statistics). The pooling is adaptive, so any input
size works: CIFAR ``[B, 3, 32, 32]``, (Fashion-)MNIST ``[B, 1, 28, 28]`` with ``in_channels=1``, ImageNet 224².
"""

from __future__ import annotations

import torch
from torch import nn

from supsup.architectures import register


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with BN; a 1×1 conv + BN shortcut where the shape changes."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != width:
            self.shortcut = nn.Sequential(conv1x1(c_in, width, stride), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (carries the stride) → 1×1 expand ×4; 1×1 conv + BN shortcut on a shape change."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        out = width * self.expansion
        self.conv1, self.bn1 = conv1x1(c_in, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, out), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != out:
            self.shortcut = nn.Sequential(conv1x1(c_in, out, stride), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem → stages of blocks → adaptive average pool → bias-free fc. ``forward(x) -> [B, output_size]``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: list[int], widths: list[int],
                 strides: list[int], stem: nn.Module, stem_width: int, output_size: int):
        super().__init__()
        self.stem = stem
        stages, c_in = [], stem_width
        for count, width, stride in zip(blocks, widths, strides):
            layers = []
            for i in range(count):
                layers.append(block(c_in, width, stride if i == 0 else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, output_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register("gem_resnet18")
def gem_resnet18(output_size: int = 5, in_channels: int = 3, nf: int = 20) -> nn.Module:
    """Reduced ResNet-18 (GEM; the paper's SplitCIFAR100 model): nf = 20 gives 1,090,940 weights at 5 outputs."""
    stem = nn.Sequential(conv3x3(in_channels, nf), nn.BatchNorm2d(nf), nn.ReLU(inplace=True))
    return ResNet(BasicBlock, [2, 2, 2, 2], [nf, 2 * nf, 4 * nf, 8 * nf], [1, 2, 2, 2], stem, nf, output_size)


@register("resnet50")
def resnet50(output_size: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """ResNet-50 (torchvision layout, stride on the 3×3); ``width`` = 64 is the standard one."""
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
    return ResNet(Bottleneck, [3, 4, 6, 3], [width, 2 * width, 4 * width, 8 * width], [1, 2, 2, 2], stem, width,
                  output_size)
