"""Task inference: which learned mask fits an input, when no task id is given.

All methods work on the same primitive: the gradient of an objective with respect to the mixing
weights α of the superposition f(x, W ⊙ Σ_i α_i M_i) (paper Eq. 2-4).

- objectives: ``entropy`` (H of the softmax output) and ``g`` (logsumexp over all outputs with the
  real outputs' gradient stopped, so only the superfluous neurons carry gradient; paper §3.6);
- methods: ``oneshot`` (argmin of ∂obj/∂α at α = 1/k), ``binary`` (⌈log2 k⌉ halvings keeping the
  half with the lowest gradient), ``gradient`` (several exponentiated-gradient steps on α);
- granularity: ``image`` (the batch's first image decides for the batch; the paper's default),
  ``batch`` (the objective averaged over the batch), ``sample`` (every sample gets its own task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from supsup.bank import ShardedMaskBank
from supsup.layers import Superposition
from supsup.model import SupermaskModel

OBJECTIVES = ("entropy", "g")
METHODS = ("oneshot", "binary", "gradient")
GRANULARITIES = ("image", "batch", "sample")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits): ``[B, s] -> [B]`` (nats)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def g_objective(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample G = logsumexp over all s outputs, the first ``num_classes`` with gradient stopped: ``[B]``."""
    if logits.shape[-1] <= num_classes:
        raise ValueError(f"the G objective needs superfluous outputs: {logits.shape[-1]} outputs for "
                         f"{num_classes} classes")
    real, extra = logits[..., :num_classes].detach(), logits[..., num_classes:]
    return torch.logsumexp(torch.cat([real, extra], dim=-1), dim=-1)


def objective_values(logits: torch.Tensor, objective: str, num_classes: int) -> torch.Tensor:
    if objective == "entropy":
        return entropy(logits)
    if objective == "g":
        return g_objective(logits, num_classes)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def alpha_gradient(model: SupermaskModel, x: torch.Tensor, alpha: torch.Tensor, objective: str = "entropy",
                   uniform: bool = False) -> torch.Tensor:
    """∂objective/∂α at ``alpha``. ``alpha [k]``: objective averaged over the batch -> ``[k]``;
    ``alpha [B, k]``: each sample's own objective -> ``[B, k]``.

    With sharded mask banks (every rank calls this with the same inputs) each rank's autograd pass gives
    its own tasks' entries, and one all-gather completes them: the same gradient on every rank."""
    alpha = alpha.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x, Superposition(alpha, uniform=uniform))
        values = objective_values(logits, objective, model.num_classes or 10)
        total = values.sum() if alpha.dim() == 2 else values.mean()
        (grad,) = torch.autograd.grad(total, alpha)
    bank = model.mask_layers()[0].bank if isinstance(model, SupermaskModel) else None  # (ABatchE: a baseline)
    return bank.gather(grad) if isinstance(bank, ShardedMaskBank) else grad


@dataclass
class Inference:
    """How to infer tasks. ``steps``/``step_size`` only matter for ``method='gradient'``."""

    method: str = "oneshot"
    objective: str = "entropy"
    granularity: str = "image"
    steps: int = 3
    step_size: float = 1.0

    def __post_init__(self):
        for value, allowed, what in ((self.method, METHODS, "method"), (self.objective, OBJECTIVES, "objective"),
                                     (self.granularity, GRANULARITIES, "granularity")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _oneshot(model, x, k, objective, per_sample):
    shape = (x.shape[0], k) if per_sample else (k,)
    alpha = torch.full(shape, 1.0 / k, device=x.device)
    return alpha_gradient(model, x, alpha, objective, uniform=True).argmin(-1)


def _binary(model, x, k, objective, per_sample):
    rows = x.shape[0] if per_sample else 1
    alive = torch.ones(rows, k, dtype=torch.bool, device=x.device)
    while bool((alive.sum(1) > 1).any()):
        count = alive.sum(1, keepdim=True)
        alpha = alive.float() / count
        grad = alpha_gradient(model, x, alpha if per_sample else alpha[0], objective, uniform=bool((count == k).all()))
        grad = grad.view(rows, k).masked_fill(~alive, float("inf"))
        keep = (count + 1) // 2  # ⌈n/2⌉ lowest gradients survive: strictly fewer each round for n >= 2
        ranks = grad.argsort(dim=1).argsort(dim=1)
        alive = alive & (ranks < keep)
    tasks = alive.float().argmax(1)
    return tasks if per_sample else tasks[0]


def _gradient(model, x, k, objective, per_sample, steps, step_size):
    shape = (x.shape[0], k) if per_sample else (k,)
    alpha = torch.full(shape, 1.0 / k, device=x.device)
    for step in range(steps):
        grad = alpha_gradient(model, x, alpha, objective, uniform=step == 0)
        scale = grad.std(dim=-1, keepdim=True).clamp_min(1e-12)
        alpha = torch.softmax(alpha.log() - step_size * grad / scale, dim=-1)  # renormalised to sum to 1
    return alpha.argmax(-1)


@torch.no_grad()
def infer_tasks(model: SupermaskModel, x: torch.Tensor, how: Inference = Inference()) -> torch.Tensor:
    """Inferred task ids: a 0-dim tensor for ``image``/``batch`` granularity, ``[B]`` for ``sample``.

    Only learned tasks compete (unlearned slots never win). ``x`` is a batch; with ``image``
    granularity only its first image is used. An empty batch gives ``[0]`` ids per sample and is an
    error otherwise; non-finite inputs are an error (they would make every gradient NaN and pick task 0).
    """
    k = model.num_tasks
    if k == 0:
        raise RuntimeError("no task is learned yet: nothing to infer")
    per_sample = how.granularity == "sample"
    if x.shape[0] == 0:
        if per_sample:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        raise ValueError(f"cannot infer a task from an empty batch (granularity {how.granularity!r})")
    if how.granularity == "image":
        x = x[:1]
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"input has NaN or infinite values (samples {bad[:10]}{' ...' if len(bad) > 10 else ''}): "
                         f"no task can be inferred from them")
    if k == 1:
        return torch.zeros(x.shape[0] if per_sample else (), dtype=torch.long, device=x.device)
    if how.method == "oneshot":
        return _oneshot(model, x, k, how.objective, per_sample)
    if how.method == "binary":
        return _binary(model, x, k, how.objective, per_sample)
    return _gradient(model, x, k, how.objective, per_sample, how.steps, how.step_size)
