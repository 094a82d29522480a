"""Turn an ordinary ``nn.Module`` into a supermask network, in place of its layers.

Every ``nn.Linear`` and ``nn.Conv2d`` becomes a supermask layer with the same shape (biases are
dropped: SupSup's base network is bias-free); every ``nn.BatchNorm1d/2d`` becomes a non-affine
BatchNorm with per-task statistics. Layer i gets its weight seed from ``(seed, i)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from supsup.layers import MultitaskBatchNorm, SupermaskConv2d, SupermaskLinear
from supsup.seeding import derive_seed

#: A layer-wise density: (qualified name, original module) -> fraction of weights kept.
DensityFn = Callable[[str, nn.Module], float]


def convert_to_supermask(module: nn.Module, *, seed: int, rule: str = "threshold",
                         density: float | DensityFn | None = None) -> nn.Module:
    """Replace Linear/Conv2d/BatchNorm children of ``module`` (recursively, in place); returns it.

    ``density`` is one float for every layer, or a function of (name, layer) for layer-wise budgets.
    """
    counter = iter(range(1 << 30))

    def replace(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qualified = f"{prefix}{name}"
            new = _converted(child, qualified, next(counter))
            if new is not None:
                setattr(parent, name, new)
            else:
                replace(child, qualified + ".")

    def _converted(child: nn.Module, qualified: str, index: int) -> nn.Module | None:
        layer_density = density(qualified, child) if callable(density) else density
        layer_seed = derive_seed(seed, "layer", index)
        if isinstance(child, nn.Linear):
            return SupermaskLinear(child.in_features, child.out_features, seed=layer_seed, rule=rule,
                                   density=layer_density)
        if isinstance(child, nn.Conv2d):
            if child.padding_mode != "zeros" or isinstance(child.padding, str):
                raise ValueError(f"{qualified}: only numeric zero padding is supported, got {child.padding!r}")
            return SupermaskConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                   child.padding, child.dilation, child.groups, seed=layer_seed, rule=rule,
                                   density=layer_density)
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return MultitaskBatchNorm(child.num_features, child.eps, child.momentum or 0.1)
        return None

    if isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError("convert a container module (e.g. nn.Sequential), not a single layer")
    replace(module, "")
    return module
