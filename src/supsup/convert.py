"""Turn an ordinary ``nn.Module`` into a supermask network, and say exactly what was done to each module.

Conversion is in place: the children of ``module`` are replaced (a bare layer passed as ``module`` is returned
converted, the original untouched); kept weights are copied, not shared. Everything that would be refused is
found before anything changes. What becomes of each module:

- ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any padding), ``nn.Embedding``, ``nn.MultiheadAttention``: supermask
  layers of the same shape ("converted"). ``weights="seed"``: the base weight is the paper's signed constant
  from ``(seed, layer index)``, nothing stored; ``weights="keep"``: masks over the module's own weights.
  Biases by ``bias``: ``"drop"`` (the paper), ``"frozen"`` (kept, or seeded with ``weights="seed"``; never
  trained) or ``"per-task"`` (a float vector per task, from the kept bias or zero).
- ``nn.BatchNorm1d/2d/3d``: per-task running statistics ("per-task"); ``nn.LayerNorm`` / ``nn.GroupNorm``: no
  statistics. Their affine: per task with ``norm_affine="per-task"``; otherwise frozen with ``weights="keep"``
  ("frozen"), dropped with ``weights="seed"``.
- modules named in ``leave`` (by type or qualified name): kept as they are, every parameter frozen ("frozen").
- modules without parameters (activations, pooling, dropout): "left alone".
- any other module holding trainable parameters: with ``strict=True`` (default) a ``ValueError`` lists each
  one; with ``strict=False`` it is frozen, as if in ``leave``.

After conversion no parameter of the network requires a gradient: the only trainable tensors are the scores
and per-task vectors that ``SupermaskModel.begin_tasks`` creates. Layer i (in traversal order) gets its weight
seed from ``(seed, i)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from supsup.attention import SupermaskMultiheadAttention
from supsup.layers import (MultitaskBatchNorm, SupermaskConv1d, SupermaskConv2d, SupermaskConv3d,
                           SupermaskEmbedding, SupermaskLayer, SupermaskLinear)
from supsup.norms import NormAffine
from supsup.pertask import PerTaskTensor
from supsup.seeding import derive_seed, generator

#: A layer-wise density: (qualified name, original module) -> fraction of weights kept.
DensityFn = Callable[[str, nn.Module], float]

WEIGHTS = ("seed", "keep")
BIASES = ("drop", "frozen", "per-task")
NORM_AFFINES = (False, "per-task")
ACTIONS = ("converted", "per-task", "frozen", "left alone")

_CONVS = {nn.Conv1d: SupermaskConv1d, nn.Conv2d: SupermaskConv2d, nn.Conv3d: SupermaskConv3d}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class ConversionRow:
    """One module: its qualified name, type, what conversion did, its parameter count before, and the bytes
    each task stores for it (mask bits and per-task floats)."""

    name: str
    kind: str
    action: str
    params: int
    bytes_per_task: int
    notes: str = ""


class ConversionReport(list):
    """The rows of a conversion (a list of ``ConversionRow``); ``table()`` renders them."""

    def row(self, name: str) -> ConversionRow:
        for r in self:
            if r.name == name:
                return r
        raise KeyError(f"no module {name!r} in the conversion report")

    def table(self, width: int = 80) -> str:
        """A plain-text table, ``width`` columns wide: long names are shortened from the left, notes that do
        not fit go on the next line."""
        heads = ("module", "type", "action", "params", "B/task")
        cells = [(r.name or "(root)", r.kind, r.action, f"{r.params:,}", f"{r.bytes_per_task:,}") for r in self]
        sizes = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
        sizes[0] = max(8, min(sizes[0], width - sum(sizes[1:]) - 2 * len(heads)))
        used = sum(sizes) + 2 * len(heads)

        def line(c, note: str = "") -> str:
            name = c[0] if len(c[0]) <= sizes[0] else "…" + c[0][-(sizes[0] - 1):]
            text = "  ".join([name.ljust(sizes[0]), c[1].ljust(sizes[1]), c[2].ljust(sizes[2]),
                              c[3].rjust(sizes[3]), c[4].rjust(sizes[4])])
            if not note:
                return text
            return f"{text}  {note}" if used + len(note) <= width else f"{text}\n{' ' * 4}{note}"

        total = sum(r.bytes_per_task for r in self)
        return "\n".join([line(heads, "notes"), "-" * min(width, used + 5),
                          *(line(c, r.notes) for c, r in zip(cells, self)),
                          f"{len(self)} modules; {total:,} bytes per task"])

    def __str__(self) -> str:
        return self.table()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matches(leave: Iterable, name: str, module: nn.Module) -> bool:
    return any((isinstance(item, str) and item == name) or (isinstance(item, type) and isinstance(module, item))
               for item in leave)


def convert_to_supermask(module: nn.Module, *, seed: int, rule: str = "threshold",
                         density: float | DensityFn | None = None, weights: str = "seed", bias: str = "drop",
                         norm_affine: bool | str = False, strict: bool = True,
                         leave: Iterable[type | str] = ()) -> tuple[nn.Module, ConversionReport]:
    """Convert ``module`` (in place; see the module docstring); returns ``(module, report)``.

    ``density`` is one float for every layer, or a function of (name, layer) for layer-wise budgets."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if bias not in BIASES:
        raise ValueError(f"bias must be one of {BIASES}, got {bias!r}")
    if norm_affine not in NORM_AFFINES:
        raise ValueError(f"norm_affine must be one of {NORM_AFFINES}, got {norm_affine!r}")
    leave = tuple(leave)
    problems = _problems(module, leave, strict)
    if problems:  # found before anything is changed
        raise ValueError("convert_to_supermask cannot convert these modules:\n  " + "\n  ".join(problems) +
                         "\npass their types or names in leave= to keep them frozen (strict=False freezes every "
                         "unknown module with trainable parameters)")
    keep = weights == "keep"
    counter = iter(range(1 << 30))
    report = ConversionReport()

    def layer_bias(layer: SupermaskLayer, original: torch.Tensor | None, out: int, what: str) -> tuple[int, str]:
        """Apply the bias policy to ``layer``; returns (per-task floats, note)."""
        if original is None:
            return 0, ""
        if bias == "drop":
            layer.set_bias(None)
            return 0, f"{what}bias dropped"
        if bias == "frozen":
            if keep:
                value = original.detach()
            else:
                bound = 1 / math.sqrt(layer.fan_in)
                value = torch.empty(out).uniform_(-bound, bound, generator=generator(layer.seed, "bias"))
            layer.set_bias(value)
            return 0, f"{what}bias frozen, {'kept' if keep else 'seeded'}"
        layer.set_bias(PerTaskTensor(original.detach() if keep else torch.zeros(out)))
        return out, f"{what}bias per task, from {'kept' if keep else 'zero'}"

    def masked(child: nn.Module, qualified: str, index: int) -> tuple[nn.Module, str, int, str] | None:
        """(new module, action, per-task floats, notes) for a module that gets masks, else None."""
        layer_density = density(qualified, child) if callable(density) else density
        layer_seed = derive_seed(seed, "layer", index)
        common = {"seed": layer_seed, "rule": rule, "density": layer_density}
        if isinstance(child, nn.Linear):
            new = SupermaskLinear(child.in_features, child.out_features, weight=child.weight if keep else None,
                                  **common)
            floats, note = layer_bias(new, child.bias, child.out_features, "")
            return new, "converted", floats, note
        if type(child) in _CONVS:
            new = _CONVS[type(child)](child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                      child.padding, child.dilation, child.groups, child.padding_mode,
                                      weight=child.weight if keep else None, **common)
            floats, note = layer_bias(new, child.bias, child.out_channels, "")
            return new, "converted", floats, note
        if isinstance(child, nn.Embedding):
            new = SupermaskEmbedding(child.num_embeddings, child.embedding_dim, child.padding_idx,
                                     weight=child.weight if keep else None, **common)
            return new, "converted", 0, ""
        if isinstance(child, nn.MultiheadAttention):
            return attention(child, qualified, index, common)
        return None

    def attention(child: nn.MultiheadAttention, qualified: str, index: int, common: dict):
        e = child.embed_dim
        in_proj = SupermaskLinear(e, 3 * e, weight=child.in_proj_weight if keep else None,
                                  **{**common, "seed": derive_seed(seed, "layer", index, "in_proj")})
        out_proj = SupermaskLinear(e, e, weight=child.out_proj.weight if keep else None,
                                   **{**common, "seed": derive_seed(seed, "layer", index, "out_proj")})
        floats_in, note_in = layer_bias(in_proj, child.in_proj_bias, 3 * e, "qkv ")
        floats_out, note_out = layer_bias(out_proj, child.out_proj.bias, e, "out ")
        new = SupermaskMultiheadAttention(e, child.num_heads, in_proj, out_proj, child.dropout, child.batch_first)
        return new, "converted", floats_in + floats_out, "; ".join(n for n in (note_in, note_out) if n)

    def affine(child: nn.Module, core: nn.Module, channels_first: bool, stats: bool):
        """Wrap the parameter-free ``core`` with ``child``'s affine by policy: (module, action, floats, note)."""
        has = child.weight is not None
        action = "per-task" if stats else "converted"
        if not has:
            return core, action, 0, ""
        if norm_affine == "per-task":
            w = child.weight.detach() if keep else torch.ones_like(child.weight)
            b = child.bias.detach() if (keep and child.bias is not None) else torch.zeros_like(child.weight)
            return (NormAffine(core, PerTaskTensor(w), PerTaskTensor(b), channels_first), "per-task", 2 * w.numel(),
                    f"affine per task, from {'kept' if keep else 'identity'}")
        if keep:
            return NormAffine(core, child.weight, child.bias, channels_first), action, 0, "affine frozen, kept"
        return core, action, 0, "affine dropped"

    def normalisation(child: nn.Module):
        if isinstance(child, _BATCHNORMS):
            core = MultitaskBatchNorm(child.num_features, child.eps, child.momentum or 0.1)
            new, action, floats, note = affine(child, core, True, True)
            note = "; ".join(n for n in ("stats per task", note) if n)
            return new, action, floats + 2 * child.num_features, note
        if isinstance(child, nn.LayerNorm) and child.elementwise_affine:
            core = nn.LayerNorm(child.normalized_shape, child.eps, elementwise_affine=False)
            return affine(child, core, False, False)
        if isinstance(child, nn.GroupNorm) and child.affine:
            return affine(child, nn.GroupNorm(child.num_groups, child.num_channels, child.eps, affine=False), True,
                          False)
        return None

    def freeze(child: nn.Module, qualified: str, why: str) -> None:
        child.requires_grad_(False)
        report.append(ConversionRow(qualified, type(child).__name__, "frozen", _params(child), 0, why))

    def visit(child: nn.Module, qualified: str, index: int) -> nn.Module | None:
        """Convert or record ``child``; returns its replacement, or None if it stays (and is recursed into)."""
        if _matches(leave, qualified, child):
            freeze(child, qualified, "left as is (leave=)")
            return child
        params = _params(child)
        done = masked(child, qualified, index)
        if done is not None:
            new, action, floats, note = done
            mask_bytes = sum(m.bank.nbytes_per_task for m in new.modules() if isinstance(m, SupermaskLayer))
            report.append(ConversionRow(qualified, type(child).__name__, action, params, mask_bytes + 4 * floats,
                                        note))
            return new
        done = normalisation(child)
        if done is not None:
            new, action, floats, note = done
            report.append(ConversionRow(qualified, type(child).__name__, action, params, 4 * floats, note))
            return new
        if any(p.requires_grad for p in child.parameters(recurse=False)):  # unknown; strict=False (else refused)
            freeze(child, qualified, "unknown type, frozen (strict=False)")
            return child
        if isinstance(child, nn.TransformerEncoder):
            child.use_nested_tensor = False  # its nested-tensor fast path reads dense attention weights
            report.append(ConversionRow(qualified, type(child).__name__, "left alone", 0, 0, "nested fast path off"))
        elif not any(True for _ in child.children()):
            report.append(ConversionRow(qualified, type(child).__name__, "left alone", params, 0,
                                        "frozen by its owner" if params else ""))
        return None

    def replace(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qualified = f"{prefix}{name}"
            new = visit(child, qualified, next(counter))
            if new is None:
                replace(child, qualified + ".")
            elif new is not child:
                setattr(parent, name, new)

    if _is_layer(module):
        root = visit(module, "", next(counter))
    else:
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:  # the root's own parameters: left (leave=) or unknown with strict=False
            for p in own:
                p.requires_grad_(False)
            report.append(ConversionRow("", type(module).__name__, "frozen", sum(p.numel() for p in own), 0,
                                        "own parameters frozen"))
        replace(module, "")
        root = module
    trainable = [name for name, p in root.named_parameters() if p.requires_grad]
    if trainable:  # a guarantee, checked: nothing outside the scores and per-task vectors ever trains
        raise RuntimeError(f"conversion left trainable parameters: {trainable[:10]}")
    return root, report


def _unsupported(module: nn.Module) -> str | None:
    """Why a module of a converted type cannot be converted, or None."""
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "nn.Embedding with max_norm or sparse=True is not supported"
    if isinstance(module, nn.MultiheadAttention) and (not module._qkv_same_embed_dim or module.bias_k is not None
                                                      or module.add_zero_attn):
        return "nn.MultiheadAttention with kdim/vdim other than embed_dim, add_bias_kv or add_zero_attn is not supported"
    return None


def _problems(module: nn.Module, leave: tuple, strict: bool) -> list[str]:
    """Each module conversion would refuse, as "name (type, why)": unsupported variants of converted types, and
    with ``strict`` every unknown module holding trainable parameters of its own."""
    problems = []

    def walk(m: nn.Module, name: str) -> None:
        if name and _matches(leave, name, m):
            return
        label = f"{name or '(root)'} ({type(m).__name__}"
        if _is_layer(m):
            why = _unsupported(m)
            if why:
                problems.append(f"{label}: {why})")
            return
        own = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
        if own and strict and not _matches(leave, name, m):
            problems.append(f"{label}, {own:,} trainable parameters)")
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(module, "")
    return problems


def _is_layer(module: nn.Module) -> bool:
    """A bare layer that conversion replaces as a whole (rather than converting its children)."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.MultiheadAttention, *_CONVS, *_BATCHNORMS,
                               nn.LayerNorm, nn.GroupNorm))

