"""``nn.MultiheadAttention`` with supermask projections, as ``convert_to_supermask`` makes it.

``nn.MultiheadAttention`` keeps its q/k/v projection as a raw ``in_proj_weight [3E, E]``; here it is a
``SupermaskLinear(E, 3E)`` (``in_proj``) and ``out_proj`` a ``SupermaskLinear(E, E)``; attention itself is
``F.scaled_dot_product_attention``. The call matches ``nn.MultiheadAttention`` (so
``nn.TransformerEncoderLayer`` uses it unchanged), and ``in_proj_bias = None`` keeps that layer off its fused
fast path, which would read the dense weights and bypass the masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supsup.layers import SupermaskLinear


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True: not attended) or a float mask as an additive float mask."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class SupermaskMultiheadAttention(nn.Module):
    """Multi-head attention over supermask projections; inputs ``[B, L, E]`` (``batch_first``) or ``[L, B, E]``.

    K stacked tasks and per-sample routes split the batch on dim 0 of the projections' inputs, which are
    always batch first here."""

    in_proj_bias = None  # read by nn.TransformerEncoderLayer: None keeps it off the fused fast path
    _qkv_same_embed_dim = True

    def __init__(self, embed_dim: int, num_heads: int, in_proj: SupermaskLinear, out_proj: SupermaskLinear,
                 dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj, self.out_proj = in_proj, out_proj

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, n, d]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; returns ``(output, weights or None)``."""
        if query.dim() != 3:
            raise ValueError(f"expected batched inputs [B, L, E] or [L, B, E], got {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e:2 * e]
            v = self.in_proj(value)[..., 2 * e:]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        b, length, source = q.shape[0], q.shape[2], k.shape[2]
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(b, self.num_heads, length, source)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(b, 1, 1, source)
            mask = padding if mask is None else mask + padding
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
            if causal:
                logits = logits.masked_fill(torch.ones(length, source, dtype=torch.bool, device=q.device)
                                            .triu(1), float("-inf"))
            if mask is not None:
                logits = logits + mask
            weights = F.dropout(logits.softmax(-1), p, self.training)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, e))
        return (out if self.batch_first else out.transpose(0, 1)), weights
