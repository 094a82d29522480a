"""Score transfer (paper §3.2 "SupSup Transfer"): a new task starts from the mean of the real-valued
scores of every earlier task, S_t ← (1/t) Σ_{j<t} S_j, instead of a fresh random init.

Only one running sum per masked layer ``[*shape] float32`` and a count are kept, never every task's scores.
"""

from __future__ import annotations

import torch

from supsup.model import SupermaskModel


class RunningMeanScores:
    """Running sum of the trained scores per layer. Use ``init_scores`` / ``observe`` as the
    ``init_scores`` / ``before_freeze`` hooks of ``learners.train_task_group``."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.count = 0

    def init_scores(self, num_new: int) -> list[torch.Tensor] | None:
        """Starting scores ``[num_new, *shape]`` per layer (the running mean, repeated), or None before any
        task has been observed (then the model's seeded random init is used)."""
        if self.sums is None or self.count == 0:
            return None
        return [(s / self.count).unsqueeze(0).expand(num_new, *s.shape).clone() for s in self.sums]

    @torch.no_grad()
    def observe(self, model: SupermaskModel) -> None:
        """Add the scores of the tasks being trained (called before ``end_tasks``) to the running sums."""
        scores = [layer.scores for layer in model.mask_layers()]
        if any(s is None for s in scores):
            raise RuntimeError("no task is being trained: observe the scores before end_tasks")
        if self.sums is None:
            self.sums = [torch.zeros(s.shape[1:], dtype=torch.float32, device=s.device) for s in scores]
        for total, s in zip(self.sums, scores, strict=True):
            total += s.detach().sum(0).to(total)
        self.count += scores[0].shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums (``sum.{layer}``, float32) and the count (``count``, int64), for a checkpoint."""
        if self.sums is None:
            return {}
        return {**{f"sum.{i}": s for i, s in enumerate(self.sums)}, "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Restore what ``state_dict`` gave (an empty dict: nothing observed yet)."""
        layers = sorted(int(k.split(".")[1]) for k in state if k.startswith("sum."))
        self.sums = [state[f"sum.{i}"].to(device) for i in layers] or None
        self.count = int(state["count"]) if "count" in state else 0

    @property
    def nbytes(self) -> int:
        """Bytes the running sums occupy (float32, one per weight per layer)."""
        return 0 if self.sums is None else sum(s.numel() * s.element_size() for s in self.sums)
