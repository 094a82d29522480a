"""Normalisations with the affine a conversion chose for them: none, frozen (kept from the user's module), or
per task (``PerTaskTensor``). The statistics part is ``MultitaskBatchNorm`` (per-task running statistics) for
BatchNorm, and a parameter-free ``nn.LayerNorm`` / ``nn.GroupNorm`` (no statistics to keep) otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from supsup.layers import base_sha256, broadcast_frozen
from supsup.pertask import PerTaskTensor


class NormAffine(nn.Module):
    """``norm(x) * weight + bias``. ``weight``/``bias``: a frozen tensor (a buffer, fingerprinted in
    ``state_dict()`` as ``base_sha256`` so a checkpoint never lands on other kept weights), a
    ``PerTaskTensor``, or None. ``channels_first``: the affine sits on dim 1 (BatchNorm, GroupNorm), else on
    the trailing dims (LayerNorm)."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor | PerTaskTensor | None,
                 bias: torch.Tensor | PerTaskTensor | None, channels_first: bool):
        super().__init__()
        self.norm, self.channels_first = norm, channels_first
        frozen = []
        for name, value in (("weight", weight), ("bias", bias)):
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value.detach().float().clone(), persistent=False)
                frozen.append(getattr(self, name))
            else:
                setattr(self, name, value)
        self.kept = bool(frozen)
        if frozen:
            self.register_buffer("base_sha256", base_sha256(*frozen))

    def base_changed(self) -> None:
        """After the frozen affine changed in place (e.g. loaded from a checkpoint): fingerprint it again."""
        self.base_sha256 = base_sha256(*(t for t in (self.weight, self.bias) if isinstance(t, torch.Tensor)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        digest = state_dict.get(prefix + "base_sha256")
        if self.kept and isinstance(digest, torch.Tensor) and not torch.equal(digest.cpu(), self.base_sha256.cpu()):
            error_msgs.append(f"{prefix[:-1]}: saved with another frozen affine (the kept weights' sha256 differs)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _shaped(self, value, y: torch.Tensor) -> torch.Tensor:
        if isinstance(value, PerTaskTensor):
            return value.broadcast_to(y, self.channels_first)
        return broadcast_frozen(value, y, self.channels_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.weight is not None:
            y = y * self._shaped(self.weight, y)
        if self.bias is not None:
            y = y + self._shaped(self.bias, y)
        return y
