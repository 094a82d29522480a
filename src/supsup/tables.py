"""Every table supsup prints or writes, made one way: a rich ``Table`` for the terminal, and the same table as
Markdown (rich's Markdown box) for files such as ``report.md`` and ``BENCHMARKS.md``.

``make_table`` builds one from column headers and rows; ``markdown`` renders it; ``results_table`` is a run's
per-task table (``supsup run``, ``supsup eval``, ``supsup report``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

Column = str | tuple[str, str]  # a header, or (header, justify: "left" | "right" | "center")


def make_table(columns: Sequence[Column], rows: Iterable[Sequence] = (), title: str | None = None,
               caption: str | None = None) -> Table:
    """A table with ``columns`` and ``rows`` (cells are turned into text); headers never wrap mid-word."""
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    for column in columns:
        header, justify = (column, "left") if isinstance(column, str) else column
        table.add_column(header, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    return table


def markdown(table: Table) -> str:
    """``table`` as a Markdown (GitHub) table, without its title and caption."""
    title, caption, style = table.title, table.caption, table.box
    table.title, table.caption, table.box = None, None, box.MARKDOWN
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, legacy_windows=False).print(table)
    table.title, table.caption, table.box = title, caption, style
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip()) + "\n"


def fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _per_task_columns(config: dict) -> list[tuple[str, str, str]]:
    """(header, key, justify) of a run's per-task table."""
    method, scenario = config.get("method", "supsup"), config["scenario"]
    if method == "hopsupsup":
        return [("accuracy (true mask)", "accuracy", "right"), ("accuracy (recovered)", "accuracy_inferred", "right"),
                ("exact in < 30 steps", "recovered_exactly", "right"), ("steps", "steps_to_exact", "right")]
    if scenario == "GG":
        return [("accuracy (task given)", "accuracy", "right")]
    if scenario == "NNs":
        return [("accuracy (masks inferred)", "accuracy_inferred", "right"), ("masks used", "inferred_masks", "left")]
    return [("accuracy (task given)", "accuracy", "right"), ("task inference", "task_inference_accuracy", "right"),
            ("accuracy (task inferred)", "accuracy_inferred", "right")]


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{m}: {n}" for m, n in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt(value) if value is None or isinstance(value, float) else str(value)


def results_table(results: dict, max_rows: int = 30) -> Table:
    """Per task: accuracy with the task given and inferred (as the method and scenario have them), and the mean."""
    config = results["config"]
    columns = _per_task_columns(config)
    rows = results["tasks"]
    shown = rows if len(rows) <= max_rows else rows[:10] + [None] + rows[-10:]
    body = [["…"] * (len(columns) + 1) if row is None else
            [str(row["task"]), *[_cell(row.get(key)) for _, key, _ in columns]] for row in shown]
    averages = {"accuracy": results.get("average_accuracy"),
                "task_inference_accuracy": results.get("average_task_inference_accuracy"),
                "accuracy_inferred": results.get("average_accuracy_inferred")}
    body.append(["mean", *[fmt(averages[key]) if key in averages else "" for _, key, _ in columns]])
    first = "hidden task" if config["scenario"] == "NNs" else "task"
    return make_table([(first, "right"), *[(header, justify) for header, _, justify in columns]], body)
