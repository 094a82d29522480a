"""Supermask layers: a frozen random weight (only its seed is stored), the scores of the task(s)
being trained, and a bank of frozen masks. One forward serves every way of choosing masks.

How a forward picks masks is set by the owning model through ``layer.route``:
- ``int t``            : task t for the whole batch (trained: mask from scores; learned: from the bank);
- ``list[int]`` (K ids): the batch is K equal stacked chunks, chunk j uses task ids[j] (batched training);
- ``Superposition``    : W ⊙ Σ_i α_i M_i over the learned tasks, α shared ``[k]`` or per sample ``[B, k]``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from supsup.bank import MaskBank
from supsup.masks import masked_weight, threshold_weight, topk_keep_many
from supsup.seeding import generator

MASK_RULES = ("threshold", "topk")
#: Bytes of W ⊙ M_task each layer keeps for the learned tasks it used last (at least one task): per-sample task
#: ids over a mixed stream use every task in every batch, which would otherwise rebuild each task's weight.
TASK_WEIGHT_CACHE_BYTES = 64 << 20


@dataclass
class Superposition:
    """Mixing weights over the learned masks: ``alpha`` is ``[k]`` (shared) or ``[B, k]`` (per sample).

    ``uniform=True`` promises every row of ``alpha`` is 1/k, which lets the forward pass use the
    bank's running mean mask instead of reading every mask.
    """

    alpha: torch.Tensor
    uniform: bool = False

    @property
    def per_sample(self) -> bool:
        return self.alpha.dim() == 2


Route = Union[int, list, Superposition, None]


def signed_kaiming_constant(shape: tuple[int, ...], fan_in: int, seed: int) -> torch.Tensor:
    """±sqrt(2 / fan_in) with fair-coin signs from ``seed`` (the paper's signed Kaiming constant)."""
    signs = torch.randint(0, 2, shape, generator=generator(seed, "weight-signs"), dtype=torch.int8)
    return (signs.float() * 2 - 1) * math.sqrt(2.0 / fan_in)


def broadcast_frozen(value: torch.Tensor, y: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """A frozen per-channel tensor (a bias, a norm's affine) shaped to broadcast against ``y`` ``[B, ...]``: on
    dim 1 (channels first, ``[B, C, *spatial]``) or on the trailing dims (``[B, *, C]``)."""
    value = value.to(y.dtype)
    return value.view(-1, *([1] * (y.dim() - 2))) if channels_first else value


def base_sha256(*tensors: torch.Tensor | None) -> torch.Tensor:
    """sha256 of the tensors' float32 bytes (C order), as ``[32] uint8``: a kept base weight's fingerprint."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is not None:
            digest.update(t.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


class SupermaskLayer(nn.Module):
    """Base of masked layers. Subclasses implement ``_forward_with(x, weight)``,
    ``_stacked_forward(x, weights [K, *shape])`` and ``_multi_forward(x, weights [c, *shape]) -> [B, c, *out]``.

    The base weight is the seeded signed constant, or (``weight=`` given) the user's own weight, kept as a
    buffer and fingerprinted in ``state_dict()`` by ``base_sha256`` (loading against other weights is an
    error naming the layer). ``bias`` is None, a frozen tensor, or a per-task ``PerTaskTensor``.
    """

    weight: torch.Tensor
    channels_first = False  # where the output's channels are: dim 1 (conv) or the last dim

    def _init_supermask(self, shape: tuple[int, ...], fan_in: int, seed: int, rule: str, density: float | None,
                        weight: torch.Tensor | None = None):
        if rule not in MASK_RULES:
            raise ValueError(f"unknown mask rule {rule!r}; expected one of {MASK_RULES}")
        if rule == "topk" and (density is None or not 0 < density <= 1):
            raise ValueError(f"the topk rule needs a density in (0, 1], got {density}")
        self.seed, self.fan_in, self.rule, self.density = seed, fan_in, rule, density
        self.kept = weight is not None
        if weight is not None and tuple(weight.shape) != tuple(shape):
            raise ValueError(f"kept weight has shape {tuple(weight.shape)}, the layer needs {tuple(shape)}")
        base = weight.detach().float().clone() if weight is not None else signed_kaiming_constant(shape, fan_in, seed)
        self.register_buffer("weight", base, persistent=False)
        self.bias: torch.Tensor | nn.Module | None = None
        if self.kept:
            self.register_buffer("base_sha256", base_sha256(base))
        # state_dict: the seed (checked on load, so masks never land on other base weights), the bank's
        # packed masks, and, while tasks train, their scores [K, *shape] and ids [K]
        self.register_buffer("weight_seed", torch.tensor(seed, dtype=torch.int64))
        self.bank = MaskBank(shape)
        self.scores: nn.Parameter | None = None
        self.register_buffer("training_ids", torch.zeros(0, dtype=torch.int64))
        self.training_tasks: list[int] = []
        self.route: Route = None
        # top-k rule: bool masks [K, *shape] of the trained tasks, selected for all layers at once by the
        # owning model for the duration of one forward (None: the layer selects its own)
        self.training_keep: torch.Tensor | None = None
        # set by supsup.fused.ThresholdRMSprop while it trains the scores: their gradient is dL/d(W ⊙ M) (the
        # step applies ⊙ W), and the step leaves (scores, their version, W ⊙ [s >= 0]) for the next forward
        self.fused_step = False
        self._stepped: tuple[torch.Tensor, int, torch.Tensor] | None = None
        # (task, bank version, weight dtype, weight device) -> W ⊙ M_task of the learned tasks used last, oldest
        # first, within TASK_WEIGHT_CACHE_BYTES
        self._cached: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # (bank version, α₀, weight dtype, weight device) -> W ⊙ (mask_sum · α₀), the uniform superposition
        self._uniform_cached: tuple[tuple, torch.Tensor] | None = None

    def set_bias(self, bias: torch.Tensor | nn.Module | None) -> None:
        """A frozen bias ``[out]`` (a buffer, part of the kept weights' fingerprint) or a per-task module."""
        if isinstance(bias, torch.Tensor):
            del self.bias
            self.register_buffer("bias", bias.detach().float().clone(), persistent=False)
            if self.kept:
                self.base_changed()
        else:
            self.bias = bias

    def base_changed(self) -> None:
        """After the kept base weight or frozen bias changed in place (e.g. loaded from a checkpoint): fingerprint
        them again and drop every weight built from them."""
        self.base_sha256 = base_sha256(self.weight, self.bias if isinstance(self.bias, torch.Tensor) else None)
        self._cached.clear()
        self._uniform_cached = None

    # ------------------------------------------------------------- task life
    @property
    def num_learned(self) -> int:
        return self.bank.num_tasks

    def begin_tasks(self, task_ids: list[int], init_scores: torch.Tensor | None = None) -> None:
        """Create trainable scores ``[K, *shape]`` (Kaiming-uniform, seeded per task, unless given). Over kept
        weights with the threshold rule they start positive (their magnitudes): every weight kept, so a task
        starts from the given network, as in Piggyback.

        Ids at or past the bank's end are new tasks; a learned id is retrained and replaced on ``end_tasks``."""
        bound = 1.0 / math.sqrt(self.fan_in)
        if init_scores is None:
            rows = [torch.empty(self.weight.shape).uniform_(-bound, bound, generator=generator(self.seed, "scores", t))
                    for t in task_ids]
            init_scores = torch.stack(rows).abs() if self.kept and self.rule == "threshold" else torch.stack(rows)
        self.scores = nn.Parameter(init_scores.to(self.weight.device, torch.float32).clone())
        self._set_training(list(task_ids))

    def _set_training(self, task_ids: list[int]) -> None:
        self.fused_step, self._stepped = False, None
        self.training_tasks = task_ids
        self.training_ids = torch.tensor(task_ids, dtype=torch.int64, device=self.training_ids.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Adopt the saved tasks in training (scores and ids, any K) and refuse another base-weight seed."""
        digest = state_dict.get(prefix + "base_sha256")
        if self.kept and isinstance(digest, torch.Tensor) and not torch.equal(digest.cpu(), self.base_sha256.cpu()):
            error_msgs.append(f"{prefix[:-1] or 'layer'}: its masks were learned over other base weights (the kept "
                              f"weights' sha256 differs): load them into a model converted from the same weights")
            return
        seed = state_dict.get(prefix + "weight_seed")
        if seed is not None and int(seed) != self.seed:
            error_msgs.append(f"{prefix}weight_seed: saved with base-weight seed {int(seed)}, this layer's is "
                              f"{self.seed} (a model built with another seed)")
            return
        scores, ids = state_dict.get(prefix + "scores"), state_dict.get(prefix + "training_ids")
        if (scores is None) != (ids is None or ids.numel() == 0):
            error_msgs.append(f"{prefix}scores / {prefix}training_ids: scores and ids of the tasks in training "
                              f"must come together")
            return
        if scores is None:
            self.scores = None
            self.training_ids = self.training_ids.new_zeros(0)
        else:
            if tuple(scores.shape) != (ids.numel(), *self.weight.shape):
                error_msgs.append(f"{prefix}scores: expected [{ids.numel()}, {', '.join(map(str, self.weight.shape))}] "
                                  f"for {ids.numel()} tasks in training, got {list(scores.shape)}")
                return
            self.scores = nn.Parameter(torch.empty(scores.shape, device=self.weight.device))
            self.training_ids = self.training_ids.new_zeros(ids.numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.training_tasks = self.training_ids.tolist()
        self._cached.clear()

    def training_weights(self) -> torch.Tensor:
        """Effective weights ``W ⊙ M`` ``[K, *shape]`` of the tasks being trained; the gradient reaches the
        scores straight through the masks."""
        if self.scores is None:
            raise RuntimeError("no task is being trained: call begin_tasks first")
        if self.rule == "threshold":  # W ⊙ [s >= 0] in one pass, no mask formed; or the fused step's
            stepped = self._stepped
            current = stepped is not None and stepped[0] is self.scores and stepped[1] == self.scores._version
            return threshold_weight(self.scores, self.weight, stepped[2] if current else None, self.fused_step)
        keep = self.training_keep if self.training_keep is not None else \
            topk_keep_many([self.scores], [self.density])[0]
        return masked_weight(self.scores, self.weight, keep, self.rule)

    def stepped(self, weight: torch.Tensor) -> None:
        """``weight [K, *shape]`` is ``W ⊙ [s >= 0]`` of the scores as they are now (left by the fused step)."""
        self._stepped = (self.scores, self.scores._version, weight)

    @torch.no_grad()
    def final_masks(self) -> torch.Tensor:
        """``[K, *shape] bool``: the masks the tasks being trained would be frozen with now."""
        if self.rule == "threshold":
            return self.scores >= 0
        return topk_keep_many([self.scores], [self.density])[0]

    @torch.no_grad()
    def end_tasks(self) -> None:
        """Freeze the trained masks into the bank (1 bit per weight) and drop the float scores."""
        if self.scores is None:
            return
        learned = self.bank.num_tasks
        for task, mask in zip(self.training_tasks, self.final_masks()):
            if task < learned:
                self.bank.replace(task, mask)
            elif task == self.bank.num_tasks:
                self.bank.add(mask)
            else:
                raise RuntimeError(f"task {task} cannot be added after {self.bank.num_tasks} learned tasks")
        self.scores = None
        self._set_training([])
        self._cached.clear()

    # ------------------------------------------------------------------ masks
    def _task_weight(self, task: int) -> torch.Tensor:
        if task in self.training_tasks:
            weights = self.training_weights()
            return weights.squeeze(0) if weights.shape[0] == 1 else weights[self.training_tasks.index(task)]
        key = (task, self.bank.version, self.weight.dtype, self.weight.device)
        if key in self._cached:
            self._cached.move_to_end(key)
            return self._cached[key]
        if self._cached and next(iter(self._cached))[1:] != key[1:]:  # the bank, dtype or device changed
            self._cached.clear()
        effective = self.weight * self.bank.mask(task, self.weight.dtype)
        self._cached[key] = effective
        while len(self._cached) > max(1, TASK_WEIGHT_CACHE_BYTES // effective.nbytes):
            self._cached.popitem(last=False)
        return effective

    def uniform_weight(self, alpha0: torch.Tensor) -> torch.Tensor:
        """``W ⊙ (mask_sum · α₀)`` ``[*shape]`` for a 0-dim ``alpha0`` (1/k): the uniform superposition's weight
        as the shared-α path forms it, cached per (bank version, α₀, dtype, device)."""
        key = (self.bank.version, float(alpha0), self.weight.dtype, self.weight.device)
        if self._uniform_cached is None or self._uniform_cached[0] != key:
            mix = self.bank.mask_sum.view(self.bank.shape) * alpha0.detach()
            self._uniform_cached = (key, self.weight * mix.to(self.weight.dtype))
        return self._uniform_cached[1]

    def mean_weight(self) -> torch.Tensor:
        """``W ⊙ mean mask`` ``[*shape]`` in the weight's dtype: the uniform superposition's weight."""
        return self.weight * self.bank.mean_mask().to(self.weight.dtype)

    def _stacked_weights(self, tasks: list[int]) -> torch.Tensor:
        """``[K, *shape]`` effective weights of a list of tasks (trained or learned)."""
        if tasks == self.training_tasks:
            return self.training_weights()
        return torch.stack([self._task_weight(t) for t in tasks])

    def _check_task(self, task: int) -> None:
        if task in self.training_tasks:
            return
        if not isinstance(task, int) or not 0 <= task < self.bank.num_tasks:
            known = f"0..{self.bank.num_tasks - 1}" if self.bank.num_tasks else "none"
            raise IndexError(f"task {task!r} is neither learned (learned: {known}) nor being trained "
                             f"(training: {self.training_tasks})")

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._masked_forward(x)
        if self.bias is None:
            return y
        if isinstance(self.bias, torch.Tensor):
            return y + broadcast_frozen(self.bias, y, self.channels_first)
        return y + self.bias.broadcast_to(y, self.channels_first)

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None:
            raise RuntimeError("supermask layer called without a task: call it through SupermaskModel.forward")
        if isinstance(route, Superposition):
            if self.bank.num_tasks == 0:
                raise RuntimeError("superposition needs at least one learned task")
            if route.per_sample:
                return _PerSampleSuperpose.apply(x, route.alpha, self, route.uniform)
            mix = _Superpose.apply(route.alpha, self.bank, route.uniform)
            return self._forward_with(x, self.weight * mix.to(self.weight.dtype))
        if isinstance(route, list):
            for t in route:
                self._check_task(t)
            return self._stacked_forward(x, self._stacked_weights(route))
        self._check_task(route)
        return self._forward_with(x, self._task_weight(route))

    def _stacked_forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _multi_forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Superpose(torch.autograd.Function):
    """mix = Σ_i α_i M_i from the bank; ∂L/∂α = M @ ∂L/∂mix, straight from packed bits.

    With ``uniform`` the forward is the bank's running mean (no pass over the masks at all)."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, bank: MaskBank, uniform: bool) -> torch.Tensor:
        ctx.bank = bank
        if uniform:
            return bank.mask_sum.view(bank.shape) * alpha[0]
        return bank.superpose(alpha)

    @staticmethod
    def backward(ctx, grad_mix: torch.Tensor):
        return ctx.bank.contract(grad_mix.float()), None, None


#: Largest B·P (floats) for which per-sample superposition materialises per-sample weights ``[B, P]``.
PER_SAMPLE_WEIGHT_BUDGET = 1 << 25


class _PerSampleSuperpose(torch.autograd.Function):
    """y_b = f(x_b; W ⊙ Σ_i α_bi M_i) with α ``[B, k]``.

    A layer is linear in its weight, so ∂L/∂α_bi = ⟨M_i, W ⊙ G_b⟩ with G_b = ∂L/∂W_eff of sample b.
    When ``B · P`` fits ``PER_SAMPLE_WEIGHT_BUDGET``: the forward builds the B mixes with one
    superposition pass (the mean mask when ``uniform``) and runs the layer with per-sample weights
    (``_stacked_forward``, chunks of one sample); the backward gets all G_b from one autograd call and
    contracts them with the bits in one pass (``bank.contract``). Otherwise (large B · P) it falls back to
    chunks of unpacked tasks: y_b = Σ_i α_bi f(x_b; W ⊙ M_i), ∂L/∂α_bi = ⟨f(x_b; W ⊙ M_i), ∂L/∂y_b⟩,
    recomputed in the backward. Neither path keeps a float ``[k, P]`` tensor.
    """

    @staticmethod
    def _per_sample_weights(layer: SupermaskLayer, alpha: torch.Tensor, uniform: bool) -> torch.Tensor:
        bank = layer.bank
        if uniform:
            return layer.mean_weight().expand(alpha.shape[0], *bank.shape)
        return layer.weight * bank.superpose_many(alpha).to(layer.weight.dtype)

    @staticmethod
    def forward(ctx, x, alpha, layer: SupermaskLayer, uniform: bool):
        ctx.layer, ctx.uniform = layer, uniform
        ctx.save_for_backward(x, alpha)
        bank = layer.bank
        ctx.direct = x.shape[0] * bank.num_weights <= PER_SAMPLE_WEIGHT_BUDGET
        if uniform:
            return layer._forward_with(x, layer.mean_weight())
        if ctx.direct:
            return layer._stacked_forward(x, _PerSampleSuperpose._per_sample_weights(layer, alpha, False))
        out = None
        for start, weights in bank.iter_masks(weight=layer.weight):
            ys = layer._multi_forward(x, weights.view(-1, *bank.shape))  # [B, c, *out]
            a = alpha[:, start : start + weights.shape[0]].reshape(*alpha.shape[:1], -1, *([1] * (ys.dim() - 2)))
            part = (a * ys).sum(1)
            out = part if out is None else out + part
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, alpha = ctx.saved_tensors
        layer, bank = ctx.layer, ctx.layer.bank
        want_x = ctx.needs_input_grad[0]
        if ctx.direct:
            weights = _PerSampleSuperpose._per_sample_weights(layer, alpha, ctx.uniform).detach().requires_grad_(True)
            xr = x.detach().requires_grad_(want_x)
            with torch.enable_grad():
                y = layer._stacked_forward(xr, weights)
                grads = torch.autograd.grad(y, [weights, xr] if want_x else [weights], grad_out)
            grad_alpha = bank.contract(grads[0] * layer.weight)  # [B, k]
            return (grads[1] if want_x else None), grad_alpha, None, None
        grad_alpha = torch.empty_like(alpha)
        grad_x = torch.zeros_like(x) if want_x else None
        for start, weights in bank.iter_masks(weight=layer.weight):
            weights = weights.view(-1, *bank.shape)
            stop = start + weights.shape[0]
            with torch.enable_grad():
                xr = x.detach().requires_grad_(want_x and not ctx.uniform)
                ys = layer._multi_forward(xr, weights)  # [B, c, *out]
                g = grad_out.unsqueeze(1)
                grad_alpha[:, start:stop] = (ys.detach() * g).flatten(2).sum(-1)
                if xr.requires_grad:
                    a = alpha[:, start:stop].reshape(*alpha.shape[:1], -1, *([1] * (ys.dim() - 2)))
                    grad_x += torch.autograd.grad(ys, xr, a * g)[0]
        if want_x and ctx.uniform:
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = layer._forward_with(xr, layer.mean_weight())
                grad_x = torch.autograd.grad(y, xr, grad_out)[0]
        return grad_x, grad_alpha, None, None


class _UniformSuperposeLinear(torch.autograd.Function):
    """y = x W_mixᵀ for ``x [n, in]`` with ``W_mix = W ⊙ (mask_sum · α₀)`` (uniform α, cached by the layer).

    Backward: ∂L/∂x = δ W_mix and ∂L/∂α_bi = δ_bᵀ (W ⊙ M_i) x_b from the packed bits (``contract_factored``),
    ``[n, k]`` for per-sample α ``[n, k]``, summed over the n rows for shared α ``[k]``; no ``[out, in]``
    gradient of the weight is formed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, layer: "SupermaskLinear") -> torch.Tensor:
        weight = layer.uniform_weight(alpha.reshape(-1)[0])
        ctx.layer, ctx.weight_mix, ctx.shared = layer, weight, alpha.dim() == 1
        ctx.save_for_backward(x, alpha)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, alpha = ctx.saved_tensors
        grad_x = grad_out @ ctx.weight_mix if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = ctx.layer.bank.contract_factored(grad_out, x, ctx.layer.weight)
            grad_alpha = (grad_alpha.sum(0) if ctx.shared else grad_alpha).to(alpha.dtype)
        return grad_x, grad_alpha, None


class SupermaskLinear(SupermaskLayer):
    """``nn.Linear`` with a frozen base weight ``[out, in]`` and supermasks; inputs ``[B, *, in]``."""

    def __init__(self, in_features: int, out_features: int, *, seed: int, rule: str = "threshold",
                 density: float | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_supermask((out_features, in_features), in_features, seed, rule, density, weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rule={self.rule}, density={self.density}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")

    def _forward_with(self, x, weight):
        self._check_input(x)
        return F.linear(x, weight)

    def _masked_forward(self, x):
        """A uniform superposition of a ``MaskBank`` over 2-D float32 inputs, with α shared over one row or
        per sample (``[n, k]``, any n: no per-sample weights are formed), takes ``_UniformSuperposeLinear``;
        everything else the general path."""
        route, bank = self.route, self.bank
        if (isinstance(route, Superposition) and route.uniform and isinstance(bank, MaskBank)
                and bank.num_tasks > 0 and route.alpha.shape[-1] == bank.num_tasks and x.dim() == 2
                and x.shape[-1] == self.in_features and x.dtype == self.weight.dtype == torch.float32
                and (route.alpha.shape[0] == x.shape[0] if route.per_sample else x.shape[0] == 1)):
            return _UniformSuperposeLinear.apply(x, route.alpha, self)
        return super()._masked_forward(x)

    def _stacked_forward(self, x, weights):
        self._check_input(x)
        k = weights.shape[0]
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} cannot be split into {k} equal task chunks")
        xs = x.reshape(k, -1, self.in_features)  # chunk j: its samples' rows [b * prod(*), in]
        # [K, out, in] @ [K, in, b]: keeps the weight gradient contiguous (no per-step copies)
        return torch.bmm(weights, xs.transpose(1, 2)).transpose(1, 2).reshape(*x.shape[:-1], self.out_features)

    def _multi_forward(self, x, weights):
        self._check_input(x)
        c = weights.shape[0]
        y = (x @ weights.reshape(-1, self.in_features).T).view(*x.shape[:-1], c, self.out_features)
        return y.movedim(-2, 1)  # [B, c, *, out]


def conv_padding(padding, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` widths (last dim first) for a numeric, ``"valid"`` or ``"same"`` padding, as ``nn.Conv`` does."""
    if padding == "valid":
        padding = (0,) * len(kernel_size)
    widths: list[int] = []
    for i in reversed(range(len(kernel_size))):
        if padding == "same":
            total = dilation[i] * (kernel_size[i] - 1)
            widths += [total // 2, total - total // 2]
        else:
            widths += [padding[i], padding[i]]
    return widths


class SupermaskConvNd(SupermaskLayer):
    """``nn.Conv1d/2d/3d`` with a frozen base weight ``[out, in/groups, *kernel]``: every padding mode
    (zeros, reflect, replicate, circular), numeric or ``"same"``/``"valid"`` padding, stride, dilation, groups.
    A padding mode other than zeros is applied with ``F.pad``, then the convolution runs unpadded."""

    dims = 2
    channels_first = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", *, seed: int, rule: str = "threshold",
                 density: float | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        tup = nn.modules.utils._ntuple(self.dims)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding must be a number, a tuple, 'same' or 'valid'; got {padding!r}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tup(kernel_size), tup(stride), tup(dilation)
        if padding == "same" and any(s != 1 for s in self.stride):
            raise ValueError("padding='same' needs stride 1 (as in nn.Conv)")
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.padding_mode = padding_mode
        self._pad = conv_padding(self.padding, self.kernel_size, self.dilation)
        self._conv_fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_supermask(shape, in_channels // groups * math.prod(self.kernel_size), seed, rule, density, weight)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, padding_mode={self.padding_mode}, dilation={self.dilation}, "
                f"groups={self.groups}, rule={self.rule}, density={self.density}")

    def _conv(self, x, weight, groups):
        if x.dim() != self.dims + 2 or x.shape[1] * self.groups != self.in_channels * groups:
            raise ValueError(f"expected input [B, {self.in_channels}, <{self.dims} spatial dims>], got {tuple(x.shape)}")
        if self.padding_mode == "zeros":
            return self._conv_fn(x, weight, None, self.stride, self.padding, self.dilation, groups)
        x = F.pad(x, self._pad, mode=self.padding_mode)
        return self._conv_fn(x, weight, None, self.stride, 0, self.dilation, groups)

    def _forward_with(self, x, weight):
        return self._conv(x, weight, self.groups)

    def _stacked_forward(self, x, weights):
        """Chunk j of the batch with ``weights[j]``: one grouped convolution over the K stacked chunks."""
        k = weights.shape[0]
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} cannot be split into {k} equal task chunks")
        b = x.shape[0] // k
        grouped = x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, k * x.shape[1], *x.shape[2:])
        y = self._conv(grouped, weights.reshape(-1, *weights.shape[2:]), k * self.groups)
        return y.reshape(b, k, self.out_channels, *y.shape[2:]).transpose(0, 1).reshape(k * b, self.out_channels,
                                                                                      *y.shape[2:])

    def _multi_forward(self, x, weights):
        c = weights.shape[0]
        y = self._conv(x, weights.reshape(-1, *weights.shape[2:]), self.groups) if self.groups == 1 else \
            torch.stack([self._conv(x, w, self.groups) for w in weights], 1).flatten(1, 2)
        return y.view(x.shape[0], c, self.out_channels, *y.shape[2:])


class SupermaskConv1d(SupermaskConvNd):
    """``nn.Conv1d`` with supermasks; inputs ``[B, C, L]``."""

    dims = 1


class SupermaskConv2d(SupermaskConvNd):
    """``nn.Conv2d`` with supermasks; inputs ``[B, C, H, W]``."""

    dims = 2


class SupermaskConv3d(SupermaskConvNd):
    """``nn.Conv3d`` with supermasks; inputs ``[B, C, D, H, W]``."""

    dims = 3


class SupermaskEmbedding(SupermaskLayer):
    """``nn.Embedding`` with a masked base table ``[num_embeddings, dim]`` (masked like a Linear's weight);
    inputs are ids ``[B, *]``, outputs ``[B, *, dim]``. Seeded tables are ±1 (the scale of nn.Embedding's
    N(0, 1)); the ``padding_idx`` row is zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, seed: int,
                 rule: str = "threshold", density: float | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        self._init_supermask((num_embeddings, embedding_dim), 2, seed, rule, density, weight)
        if padding_idx is not None and weight is None:
            self.weight[padding_idx] = 0

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, rule={self.rule}, "
                f"density={self.density}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.int64, torch.int32) or x.dim() < 1:
            raise ValueError(f"expected integer ids [B, ...], got a {x.dtype} tensor of shape {tuple(x.shape)}")

    def _forward_with(self, x, weight):
        self._check_input(x)
        return F.embedding(x, weight, self.padding_idx)

    def _stacked_forward(self, x, weights):
        self._check_input(x)
        k = weights.shape[0]
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} cannot be split into {k} equal task chunks")
        chunk = torch.arange(k, device=x.device).repeat_interleave(x.shape[0] // k)
        offset = (chunk * self.num_embeddings).view(-1, *([1] * (x.dim() - 1)))
        return F.embedding(x + offset, weights.reshape(-1, self.embedding_dim))

    def _multi_forward(self, x, weights):
        self._check_input(x)
        c = weights.shape[0]
        table = weights.permute(1, 0, 2).reshape(self.num_embeddings, c * self.embedding_dim)
        return F.embedding(x, table).view(*x.shape, c, self.embedding_dim).movedim(-2, 1)  # [B, c, *, dim]


class MultitaskBatchNorm(nn.Module):
    """Non-affine BatchNorm with running statistics kept per task (``[T, C]``), growable.

    Follows the owning model's route:
    - a task id uses that task's statistics, stacked tasks each chunk's own. In train mode only the tasks
      in ``updating`` (set by the model: the tasks being trained) normalise with batch statistics and update
      their running ones; every other task is frozen and normalises with its stored statistics, in train
      and eval mode alike. ``updating=None`` (standalone use, e.g. the baselines) lets every task update.
    - a superposition with α over the k learned tasks uses the α-mixture of their statistics:
      mean = Σ α_i μ_i, var = Σ α_i (σ²_i + μ_i²) − mean², per sample for per-sample α. It needs no batch
      statistics (one image works) and one sample never affects another.
    ``state_dict()`` holds ``running_mean`` / ``running_var`` ``[T, C]``; loading grows the table to T.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.register_buffer("running_mean", torch.zeros(0, num_features))
        self.register_buffer("running_var", torch.ones(0, num_features))
        self.route: Route = None
        self.updating: set[int] | None = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, tasks={self.running_mean.shape[0]}, affine=False, per-task statistics"

    def ensure_tasks(self, num_tasks: int) -> None:
        have = self.running_mean.shape[0]
        if num_tasks > have:
            dev = self.running_mean.device
            self.running_mean = torch.cat([self.running_mean, torch.zeros(num_tasks - have, self.num_features, device=dev)])
            self.running_var = torch.cat([self.running_var, torch.ones(num_tasks - have, self.num_features, device=dev)])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Grow (or shrink) the table to the saved number of tasks, then copy as usual."""
        mean = state_dict.get(prefix + "running_mean")
        if isinstance(mean, torch.Tensor) and mean.dim() == 2 and mean.shape[1] == self.num_features:
            rows, dev = mean.shape[0], self.running_mean.device
            self.running_mean = torch.zeros(rows, self.num_features, device=dev)
            self.running_var = torch.ones(rows, self.num_features, device=dev)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _norm(self, x: torch.Tensor, task: int) -> torch.Tensor:
        if not 0 <= task < self.running_mean.shape[0]:
            raise IndexError(f"BatchNorm has statistics for tasks 0..{self.running_mean.shape[0] - 1}, not {task}")
        update = self.training and (self.updating is None or task in self.updating)
        return F.batch_norm(x, self.running_mean[task], self.running_var[task], None, None, update,
                            self.momentum, self.eps)

    def _superposed(self, x: torch.Tensor, route: Superposition) -> torch.Tensor:
        k = route.alpha.shape[-1]
        if k > self.running_mean.shape[0]:
            raise IndexError(f"BatchNorm has statistics for {self.running_mean.shape[0]} tasks, alpha mixes {k}")
        means, variances = self.running_mean[:k], self.running_var[:k]
        alpha = route.alpha.to(means.dtype)
        mean = alpha @ means  # [C] or [B, C]
        var = (alpha @ (variances + means * means) - mean * mean).clamp_min(0)
        shape = (-1 if route.per_sample else 1, self.num_features, *([1] * (x.dim() - 2)))
        return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if isinstance(route, Superposition):
            return self._superposed(x, route)
        if route is None:
            return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        if isinstance(route, list):
            chunks = x.chunk(len(route))
            return torch.cat([self._norm(c, t) for c, t in zip(chunks, route)])
        return self._norm(x, route)
