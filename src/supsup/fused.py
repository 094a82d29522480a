"""The fused training step for threshold supermasks on the CPU: RMSprop over the scores in one pass.

The unfused step reads and writes the scores' size about 18 times besides the matmuls: ``W ⊙ [s >= 0]``
in the forward, ``dL/dW_eff ⊙ W`` in the backward, and five elementwise passes of ``torch.optim.RMSprop``.
``ThresholdRMSprop`` does all of it in one pass (``kernels.native.rmsprop_threshold``): it reads the scores'
raw gradient ``dL/dW_eff`` (the layers leave it as ``scores.grad`` while it trains them: ``fused_step``),
the base weight, the scores and RMSprop's ``square_avg``, and writes the new scores, ``square_avg`` and the
next forward's ``W ⊙ [s >= 0]``.

The update is RMSprop's (``torch.optim.RMSprop``: no momentum, not centred) operation for operation with
the same float32 roundings, but with a correctly rounded square root: torch's CPU ``sqrt`` (MKL's) differs
from it in the last bit for about 0.6 % of inputs, so the scores drift apart from the unfused step's by a
few units in the last place (``tests/test_fused.py`` measures what that does to the masks).

Code that reads or changes the scores' gradients between the backward and the step (gradient clipping, for
one) sees dL/d(W ⊙ M), not dL/ds: use ``TrainConfig(fused_step=False)`` for that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from supsup import kernels
from supsup.kernels import native
from supsup.layers import SupermaskLayer


class ThresholdRMSprop(torch.optim.Optimizer):
    """``torch.optim.RMSprop(scores, lr, alpha, eps)`` for threshold-rule layers being trained, in one pass per
    layer. Its state (``step``, ``square_avg``) and param groups are RMSprop's; ``lr`` may be changed by a
    scheduler. While it exists the layers' scores hold ``dL/d(W ⊙ M)`` as their gradient (``fused_step``)."""

    def __init__(self, layers: list[SupermaskLayer], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8):
        if not applies_to(layers):
            raise ValueError("ThresholdRMSprop needs threshold-rule layers being trained, with float32 CPU scores "
                             "and weights, and the native kernels")
        self.layers = list(layers)
        super().__init__([layer.scores for layer in self.layers], {"lr": lr, "alpha": alpha, "eps": eps})
        if len(self.param_groups) != 1:
            raise ValueError("ThresholdRMSprop takes one group of scores")
        self._next_weights: dict[torch.Tensor, torch.Tensor] = {}  # scores -> W ⊙ [s >= 0], rewritten each step
        for layer in self.layers:
            layer.fused_step = True

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for layer, scores in zip(self.layers, group["params"]):
            if scores.grad is None:
                continue
            if layer.scores is not scores or not layer.fused_step:
                raise RuntimeError("the layer's scores changed since this optimiser was made: make a new one")
            state = self.state[scores]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["square_avg"] = torch.zeros_like(scores, memory_format=torch.preserve_format)
            state["step"] += 1
            weight = self._next_weights.get(scores)
            if weight is None:
                weight = self._next_weights[scores] = torch.empty_like(scores)
            native.rmsprop_threshold(scores, state["square_avg"], scores.grad.contiguous(), layer.weight,
                                     float(group["lr"]), group["alpha"], group["eps"], weight)
            for changed in (scores, weight):  # in place, outside torch: a graph that saved them must not use them
                torch.autograd.graph.increment_version(changed)
            layer.stepped(weight)
        return loss


def applies_to(layers: list[SupermaskLayer]) -> bool:
    """Whether ``ThresholdRMSprop`` can train these layers: each trains threshold scores ``[K, *shape]`` in CPU
    float32 over a float32 weight, and the native kernels are built."""
    return bool(layers) and all(
        layer.scores is not None and layer.rule == "threshold" and layer.scores.dtype == torch.float32
        and layer.scores.device.type == "cpu" and layer.weight.dtype == torch.float32
        and layer.scores.shape[1:] == layer.weight.shape for layer in layers) \
        and kernels.backend_for(torch.device("cpu")) == "native"
