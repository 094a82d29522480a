"""The paper's networks as ordinary ``nn.Module`` s, and a registry that rebuilds them from a
JSON description (what checkpoints store instead of weights)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from supsup.model import SupermaskModel

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn
    return wrap


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@register("fc1024")
def fc1024(output_size: int = 10, input_size: int = 784) -> nn.Module:
    """FC 1024-1024: 784-1024-1024-s, ReLU, bias-free (2,363,392 weights at s = 500)."""
    return _mlp([input_size, 1024, 1024, output_size])


@register("lenet")
def lenet(output_size: int = 10, input_size: int = 784) -> nn.Module:
    """LeNet 300-100: 784-300-100-s, ReLU, bias-free (315,200 weights at s = 500)."""
    return _mlp([input_size, 300, 100, output_size])


def build_model(name: str, *, output_size: int, seed: int, num_classes: int = 10, rule: str = "threshold",
                density: float | None = None, **kwargs) -> SupermaskModel:
    """A ``SupermaskModel`` of a registered architecture; ``output_size - num_classes`` outputs are
    the superfluous neurons used by the G objective."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    if output_size < num_classes:
        raise ValueError(f"output size {output_size} is smaller than the {num_classes} classes")
    net = ARCHITECTURES[name](output_size=output_size, **kwargs)
    architecture = {"name": name, "output_size": output_size, **kwargs}
    return SupermaskModel(net, seed=seed, rule=rule, density=density, architecture=architecture,
                          num_classes=num_classes)


from supsup import resnets as _resnets  # noqa: E402,F401  (registers gem_resnet18, resnet50)
