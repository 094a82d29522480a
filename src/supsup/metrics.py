"""Continual-learning metrics from the accuracy matrix, and the task-inference confusion matrix.

The accuracy matrix ``R`` has one row per evaluation (at the run's schedule, the last after all T tasks):
``R[i][j]`` is the accuracy on task j after the tasks of row i were learned (``tasks_learned[i]`` of them),
``None`` for a task not learned yet (or not measured in that row). The accuracy is the scenario's: with the task given (GG), or with the task
inferred (GNs, GNu; a wrong task makes the batch wrong).

- **Average accuracy** ``A = (1/T) Σ_j R[last][j]`` (ACC in Lopez-Paz & Ranzato 2017, "Gradient Episodic
  Memory for Continual Learning"; A_T in Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning").
- **Forgetting** (Chaudhry et al. 2018, Eq. 3-4): for every task j learned before the last row,
  ``f_j = max over earlier rows l of R[l][j] − R[last][j]``; the measure is their mean. ``None`` with one row.
- **Backward transfer** (Lopez-Paz & Ranzato 2017, Eq. 2): ``BWT = mean over j < T of R[last][j] − R[j][j]``,
  where ``R[j][j]`` is task j's accuracy right after it was learned: the row with ``tasks_learned = j + 1``, or a
  partial row that measured only the task group just learned (tasks trained together, ``tasks_at_once``).
  Only tasks that have such a row count; ``None`` when no task has one. In scenario GG a run measures every
  new task right after it (a row holding only the tasks just learned), so BWT covers every task; with task
  inference only the evaluation schedule's rows exist (``eval_at``), and BWT is over the tasks they end on.
- **Task-inference confusion** ``C[j][i]``: test samples of task j classified with inferred task i (or, in
  scenario NNs, with mask i). Task-inference accuracy = ``Σ_j C[j][j] / Σ C``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

Row = list[float | None]


@dataclass
class AccuracyMatrix:
    """``values[i][j]``: accuracy on task j after ``tasks_learned[i]`` tasks (None before task j is learned)."""

    tasks_learned: list[int] = field(default_factory=list)
    values: list[Row] = field(default_factory=list)

    def add(self, tasks_learned: int, accuracies: list[float]) -> None:
        """Append the row measured after ``tasks_learned`` tasks (``accuracies`` of tasks 0..tasks_learned-1);
        a row for a task count already present replaces it."""
        if self.tasks_learned and self.tasks_learned[-1] == tasks_learned:
            self.tasks_learned.pop(), self.values.pop()
        self.tasks_learned.append(tasks_learned)
        self.values.append(list(accuracies))

    def rows(self, num_tasks: int) -> list[Row]:
        """Every row padded with None to ``num_tasks`` columns."""
        return [row + [None] * (num_tasks - len(row)) for row in self.values]

    def to_dict(self) -> dict:
        return {"tasks_learned": self.tasks_learned, "accuracy": self.values}

    @classmethod
    def from_dict(cls, data: dict) -> AccuracyMatrix:
        return cls(list(data["tasks_learned"]), [list(r) for r in data["accuracy"]])


def average_accuracy(m: AccuracyMatrix) -> float:
    last = m.values[-1]
    return sum(last) / len(last)


def forgetting(m: AccuracyMatrix) -> float | None:
    """Mean over tasks seen before the last row of (best earlier accuracy − final accuracy)."""
    last, earlier = m.values[-1], m.values[:-1]
    drops = []
    for j, final in enumerate(last):
        seen = [row[j] for row in earlier if j < len(row) and row[j] is not None]
        if seen:
            drops.append(max(seen) - final)
    return sum(drops) / len(drops) if drops else None


def backward_transfer(m: AccuracyMatrix) -> float | None:
    """Mean over j < T of (final accuracy − accuracy right after learning task j), where that row exists."""
    last = m.values[-1]
    right_after = {}
    for n, row in zip(m.tasks_learned, m.values):
        partial = any(v is None for v in row)  # a row of only the tasks just learned (a task group)
        right_after.update({j: v for j, v in enumerate(row) if v is not None and (partial or j == n - 1)})
    gains = [last[j] - right_after[j] for j in range(len(last) - 1) if j in right_after]
    return sum(gains) / len(gains) if gains else None


def summary(m: AccuracyMatrix) -> dict:
    """The three measures, for results.json."""
    return {"average_accuracy": average_accuracy(m), "forgetting": forgetting(m),
            "backward_transfer": backward_transfer(m)}


def confusion(rows: list[dict]) -> dict[int, dict[int, int]]:
    """``{true task: {inferred task: samples}}`` from per-task ``inferred`` counts (JSON keys are strings)."""
    return {int(r["task"]): {int(t): int(n) for t, n in r["inferred"].items()} for r in rows if "inferred" in r}


def inference_accuracy(table: dict[int, dict[int, int]]) -> float | None:
    """Σ_j C[j][j] / Σ C: the share of test samples classified with their own task."""
    total = sum(sum(row.values()) for row in table.values())
    return sum(row.get(j, 0) for j, row in table.items()) / total if total else None


def matrix_csv(m: AccuracyMatrix, num_tasks: int) -> str:
    """``tasks_learned,task_0,...,task_{T-1}``: one line per row, empty cells for tasks not learned yet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tasks_learned", *[f"task_{j}" for j in range(num_tasks)]])
    for n, row in zip(m.tasks_learned, m.rows(num_tasks)):
        writer.writerow([n, *["" if v is None else repr(v) for v in row]])
    return out.getvalue()


def confusion_csv(table: dict[int, dict[int, int]]) -> str:
    """``task,inferred,samples``: one line per non-zero cell of the confusion matrix."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "inferred", "samples"])
    for task in sorted(table):
        for inferred, n in sorted(table[task].items()):
            writer.writerow([task, inferred, n])
    return out.getvalue()


def scalars_csv(scalars: list[tuple[int, str, float]]) -> str:
    """``tasks_learned,name,value``: every scalar logged during a run (the same as its TensorBoard scalars)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tasks_learned", "name", "value"])
    writer.writerows([n, name, repr(value)] for n, name, value in scalars)
    return out.getvalue()
