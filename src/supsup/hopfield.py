"""HopSupSup (paper §3.5, spec §2.13): neuron masks stored in a constant-size Hopfield network.

Each task learns a binary mask over the *neurons* (outputs of non-affine BatchNorm layers) of a
frozen random network, BNNet 784-2048-2048-10 with Swish. After training, each layer's mask
m ∈ {0,1}^d is written into that layer's Hopfield matrix Ψ ∈ R^{d×d} as z = 2m − 1 and then
discarded. At test time, with no task id, a mask is recovered by SGD on the scores s of a mask
(m = [s ≥ 0], straight-through) that lowers a mix of the output entropy H and the Hopfield energy
E_Ψ(z) = −½ zᵀΨz: loss_b = (1 − b/B)·H + γ·(b/B)·Σ_layers E, one step per batch b = 1..B.

Storage: Ψ (d² float32) plus ``pattern_sum`` = Σ_j z_j (d float32) and a count per masked layer —
constant in the number of tasks. ``pattern_sum`` exists because recovery starts from the stored
patterns' majority vote (the reference computes it from the masks it keeps, which defeats the point);
the running sum gives the same start, s₀ = pattern_sum / count, at d floats per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from supsup.inference import entropy
from supsup.layers import signed_kaiming_constant
from supsup.masks import threshold_mask
from supsup.seeding import derive_seed, generator

RULES = ("storkey", "hebbian")
PROTOCOLS = ("held-out", "transductive")


class HopfieldStore(nn.Module):
    """Binary patterns in one ``[d, d]`` float32 matrix Ψ; its size never changes.

    ``rule="storkey"`` (the reference's simplified Storkey rule, the default): with z ∈ {−1,1}^d and
    h = Ψz, Ψ ← Ψ + (zzᵀ − I − zhᵀ − hzᵀ)/d. ``rule="hebbian"`` (the paper's text): Ψ ← Ψ + zzᵀ/d.
    """

    def __init__(self, d: int, rule: str = "storkey"):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown Hopfield rule {rule!r}; expected one of {RULES}")
        self.d, self.rule = d, rule
        self.register_buffer("psi", torch.zeros(d, d))
        self.register_buffer("pattern_sum", torch.zeros(d))
        self.count = 0

    def extra_repr(self) -> str:
        return f"d={self.d}, rule={self.rule}, patterns={self.count}, bytes={self.nbytes}"

    @property
    def nbytes(self) -> int:
        """Bytes held: Ψ ``[d, d]`` + ``pattern_sum`` ``[d]`` float32 + the count (8 bytes)."""
        return self.psi.numel() * self.psi.element_size() + self.pattern_sum.numel() * 4 + 8

    @torch.no_grad()
    def store(self, mask: torch.Tensor) -> None:
        """Write one mask ``[d]`` (bool/0-1) as the pattern z = 2m − 1."""
        if mask.shape != (self.d,):
            raise ValueError(f"expected a mask of shape [{self.d}], got {tuple(mask.shape)}")
        z = mask.to(self.psi.device, torch.float32) * 2 - 1
        if self.rule == "hebbian":
            self.psi += torch.outer(z, z) / self.d
        else:
            h = self.psi @ z
            update = torch.outer(z, z) - torch.outer(z, h) - torch.outer(h, z)
            update.diagonal().sub_(1.0)
            self.psi += update / self.d
        self.pattern_sum += z
        self.count += 1

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """E = −½ zᵀΨz for ``z [d]`` or ``[n, d]`` (one energy per row); differentiable in z."""
        return -0.5 * ((z @ self.psi) * z).sum(-1)

    def majority_scores(self) -> torch.Tensor:
        """Mean stored pattern ``[d]`` in [−1, 1]: its sign is the patterns' majority vote (ties: 1)."""
        if self.count == 0:
            raise RuntimeError("the Hopfield store is empty")
        return self.pattern_sum / self.count

    @torch.no_grad()
    def recall(self, mask: torch.Tensor, max_sweeps: int = 20, seed: int = 0) -> torch.Tensor:
        """Classic recall: asynchronous updates z_i ← sign((Ψz)_i) in a seeded random order until a
        sweep changes nothing. ``mask [d]`` bool in, bool out (the attractor reached)."""
        z = mask.to(self.psi.device, torch.float32) * 2 - 1
        field = self.psi @ z
        order = torch.randperm(self.d, generator=generator(seed, "hopfield-recall"))
        for _ in range(max_sweeps):
            changed = False
            for i in order.tolist():
                new = 1.0 if field[i] >= 0 else -1.0
                if new != z[i]:
                    field += (new - z[i]) * self.psi[:, i]
                    z[i] = new
                    changed = True
            if not changed:
                break
        return z > 0


class FrozenLinear(nn.Module):
    """Bias-free linear layer with a frozen signed-Kaiming-constant weight ``[out, in]`` from a seed."""

    def __init__(self, in_features: int, out_features: int, seed: int):
        super().__init__()
        self.register_buffer("weight", signed_kaiming_constant((out_features, in_features), in_features, seed),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class NeuronMaskBN(nn.Module):
    """Non-affine BatchNorm with batch statistics (also in eval) times a neuron mask: y = m ⊙ BN(x).

    The mask comes from ``scores [d]`` (m = [s ≥ 0], straight-through; training or recovery) when
    set, else from the fixed ``mask [d]``, else all ones."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.d, self.eps = d, eps
        self.scores: nn.Parameter | None = None
        self.mask: torch.Tensor | None = None

    def current_mask(self) -> torch.Tensor | None:
        if self.scores is not None:
            return threshold_mask(self.scores)
        return self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        mask = self.current_mask()
        return y if mask is None else y * mask


class BNNet(nn.Sequential):
    """784 → 2048 → BN·mask → Swish → 2048 → BN·mask → Swish → 10; every weight frozen and random."""

    def __init__(self, seed: int, width: int = 2048, input_size: int = 784, output_size: int = 10):
        layers: list[nn.Module] = []
        sizes = [input_size, width, width]
        for i in range(2):
            layers += [FrozenLinear(sizes[i], sizes[i + 1], derive_seed(seed, "bnnet", i)),
                       NeuronMaskBN(width), nn.SiLU()]
        layers.append(FrozenLinear(width, output_size, derive_seed(seed, "bnnet", 2)))
        super().__init__(nn.Flatten(), *layers)

    def mask_layers(self) -> list[NeuronMaskBN]:
        return [m for m in self if isinstance(m, NeuronMaskBN)]


class HopSupSup(nn.Module):
    """BNNet plus Hopfield stores; learned masks live only in the stores.

    ``joint=False`` (the reference): one ``[d, d]`` store per masked layer, each layer recalled on its
    own. ``joint=True``: one ``[L·d, L·d]`` store over all layers' masks concatenated (L² times the
    bytes, still constant in tasks), so every layer is pulled toward the same task's pattern."""

    def __init__(self, seed: int = 1, width: int = 2048, rule: str = "storkey", output_size: int = 10,
                 joint: bool = False):
        super().__init__()
        self.net = BNNet(seed, width, output_size=output_size)
        self.sizes = [layer.d for layer in self.net.mask_layers()]
        self.joint = joint
        dims = [sum(self.sizes)] if joint else self.sizes
        self.stores = nn.ModuleList([HopfieldStore(d, rule) for d in dims])

    @property
    def num_tasks(self) -> int:
        return self.stores[0].count

    @property
    def nbytes(self) -> int:
        """Bytes of all stores: constant in the number of tasks."""
        return sum(s.nbytes for s in self.stores)

    @property
    def mask_bits_per_task(self) -> int:
        return sum(self.sizes)

    def _to_stores(self, per_layer: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(list(per_layer))] if self.joint else list(per_layer)

    def _to_layers(self, per_store: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.cat(list(per_store)).split(self.sizes))

    def store(self, masks: Sequence[torch.Tensor]) -> None:
        """Write one task's masks (``[d]`` per layer) into the stores, and nowhere else."""
        for store, m in zip(self.stores, self._to_stores(masks), strict=True):
            store.store(m)

    def majority_scores(self) -> list[torch.Tensor]:
        """Per layer, the mean stored pattern ``[d]``: the recovery's start (its sign = majority vote)."""
        return self._to_layers([store.majority_scores() for store in self.stores])

    def energy(self, patterns: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_stores E_Ψ(z) for per-layer ``z [d]`` in {−1, 1} (differentiable)."""
        return sum(store.energy(z) for store, z in zip(self.stores, self._to_stores(patterns), strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def set_scores(self, scores: Sequence[torch.Tensor] | None) -> list[nn.Parameter]:
        """Train/recover masks from ``scores`` (one ``[d]`` per layer); ``None`` clears them."""
        params = []
        for layer, s in zip(self.net.mask_layers(), scores or [None] * len(self.sizes)):
            layer.scores = None if s is None else nn.Parameter(s.detach().clone().float())
            params.append(layer.scores)
        return params

    def set_masks(self, masks: Sequence[torch.Tensor] | None) -> None:
        """Use fixed masks (one ``[d]`` bool per layer), e.g. a recovered one; ``None``: all ones."""
        for layer, m in zip(self.net.mask_layers(), masks or [None] * len(self.sizes)):
            layer.scores, layer.mask = None, None if m is None else m.float()

    def current_masks(self) -> list[torch.Tensor]:
        return [layer.current_mask().detach() > 0 for layer in self.net.mask_layers()]


@dataclass
class HopfieldConfig:
    """A HopSupSup run (the ``[hopfield]`` section of a run config): the store, and how masks are recovered.

    ``protocol``: ``held-out`` recovers a task's mask on its ``holdout`` training images that were never trained
    on and scores it on the test set; ``transductive`` (the authors') recovers on the test set it scores."""

    rule: str = "storkey"
    joint: bool = False  # one store over all layers' masks instead of one per layer
    protocol: str = "held-out"
    holdout: int = 2048
    test_batch: int = 64  # images per recovery step (and per test batch)
    recovery_lr: float = 500.0
    gamma: float = 1.5e-3  # weight of the Hopfield energy in the recovery loss

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown Hopfield rule {self.rule!r}; expected one of {RULES}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        for name in ("holdout", "test_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class HopTrainConfig:
    """Per-task training (reference defaults): SGD 0.1, momentum 0.9, wd 1e-4, cosine, 1 epoch of 128.
    ``holdout`` training images per task are kept out of training, for recovery on unseen data."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 1
    batch_size: int = 128
    holdout: int = 2048
    max_batches: int | None = None  # cap on batches per epoch (CPU-time knob; None: the whole split)
    seed: int = 0


def split_train(stream, task: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of a task's training indices into (train, held-out)."""
    n = stream.size(task, "train")
    order = torch.randperm(n, generator=generator(seed, "hop-holdout", task)).to(stream.device)
    return order[holdout:], order[:holdout]


def train_task(model: HopSupSup, stream, task: int, cfg: HopTrainConfig = HopTrainConfig(),
               on_batch: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """Learn ``task``'s neuron masks (scores start at 0: all neurons on), store them in the Hopfield
    stores and return them (``[d]`` bool per layer) for diagnostics only; the model keeps no copy."""
    train_idx, _ = split_train(stream, task, cfg.holdout, cfg.seed)
    params = model.set_scores([torch.zeros(layer.d) for layer in model.net.mask_layers()])
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    per_epoch = train_idx.numel() // cfg.batch_size
    if cfg.max_batches is not None:
        per_epoch = min(per_epoch, cfg.max_batches)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, per_epoch * cfg.epochs)
    gen = generator(cfg.seed, "hop-batches", task)
    model.train()
    for _ in range(cfg.epochs):
        order = train_idx[torch.randperm(train_idx.numel(), generator=gen).to(train_idx.device)]
        for b in range(per_epoch):
            x, y = stream.batch(task, "train", order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_batch is not None:
                on_batch(b, loss.detach())
    masks = model.current_masks()
    model.set_masks(None)
    model.store(masks)
    model.eval()
    return masks


@dataclass
class RecoveryConfig:
    """Mask recovery at test time (reference): SGD lr 500, momentum 0.9, wd 1e-4, γ = 1.5e-3."""

    lr: float = 500.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gamma: float = 1.5e-3


@dataclass
class Recovery:
    """A recovered mask and its trajectory: ``history[b]`` = masks after step b (0 = majority start)."""

    masks: list[torch.Tensor]
    history: list[list[torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def recover(model: HopSupSup, batches: Iterable[torch.Tensor], cfg: RecoveryConfig = RecoveryConfig()) -> Recovery:
    """Recover a stored mask from unlabelled ``batches`` (one SGD step each), starting from the
    majority vote of the stored patterns: loss_b = (1 − b/B)·H(batch_b) + γ·(b/B)·Σ_layers E_Ψ(2m − 1)."""
    batches = list(batches)
    if model.num_tasks == 0:
        raise RuntimeError("no mask is stored: train a task first")
    params = model.set_scores(model.majority_scores())
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    result = Recovery(masks=[], history=[model.current_masks()])
    total = len(batches)
    model.eval()
    for b, x in enumerate(batches, start=1):
        t = b / total
        h = entropy(model(x)).mean()
        e = model.energy([2 * threshold_mask(s) - 1 for s in params])
        loss = (1 - t) * h + cfg.gamma * t * e
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.history.append(model.current_masks())
        result.losses.append(loss.item())
    result.masks = result.history[-1]
    model.set_masks(None)
    return result


def hamming(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> int:
    """Bits that differ between two per-layer mask lists."""
    return sum(int((x != y).sum()) for x, y in zip(a, b, strict=True))


def steps_to_recover(history: list[list[torch.Tensor]], true: list[list[torch.Tensor]], task: int) -> int | None:
    """First step from which the trajectory's mask stays nearer (Hamming) to ``true[task]`` than to
    every other task's mask; ``None`` if it does not end there."""
    first = None
    for step, masks in enumerate(history):
        distances = [hamming(masks, m) for m in true]
        others = [d for j, d in enumerate(distances) if j != task]
        if not others or distances[task] < min(others):
            first = step if first is None else first
        else:
            first = None
    return first


def steps_to_match(history: list[list[torch.Tensor]], target: list[torch.Tensor], tolerance: int = 0) -> int | None:
    """First step from which the trajectory stays within ``tolerance`` bits of ``target`` (0: exact);
    ``None`` if it does not end there."""
    first = None
    for step, masks in enumerate(history):
        first = (step if first is None else first) if hamming(masks, target) <= tolerance else None
    return first


@torch.no_grad()
def accuracy(model: HopSupSup, masks: Sequence[torch.Tensor] | None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Accuracy over ``(x, y)`` batches with fixed masks (BN uses each batch's statistics)."""
    model.set_masks(masks)
    model.eval()
    right = total = 0
    for x, y in batches:
        right += int((model(x).argmax(-1) == y).sum())
        total += y.numel()
    model.set_masks(None)
    return right / total
