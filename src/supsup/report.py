"""``supsup report RUN [RUN ...]``: figures of finished runs (PNG and SVG, matplotlib's Agg renderer) beside the
paper's numbers (``paper.py``), and a ``report.md`` that embeds them with the command that made each run.

Figures: average accuracy against tasks learned (several runs overlay; runs that differ only in their seed are
drawn as mean ± std), per-task accuracy with the task given and inferred, the accuracy matrix, the
task-inference confusion matrix, NNs mask allocations along the stream, and bytes stored against tasks.
``figures(runs)`` builds them without writing anything (the tests read the plotted data back from them).
"""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from supsup.config import RunConfig
from supsup.files import write_atomic
from supsup.methods import headline
from supsup.paper import CURVES
from supsup.rundir import RunDirectory, RunError
from supsup.tables import fmt, make_table, markdown

IGNORED = ("seed", "device", "paper")  # config fields that do not make runs different experiments


@dataclass
class Run:
    path: Path
    results: dict
    config: RunConfig
    decisions: dict | None

    @property
    def command(self) -> str:
        return self.results.get("command") or f"supsup run {self.path / 'results.json'}"

    @property
    def headline(self) -> str:
        """The schedule's average the run is judged by: with the task given (GG) or inferred."""
        return f"average_{headline(self.config)}"


def load_run(path: str | Path) -> Run:
    directory = RunDirectory(path)
    results = directory.read_results()
    if results["status"] != "complete":
        raise RunError(f"the run in {directory.path} is {results['status']}: finish it (supsup run --resume "
                       f"{directory.path}) before reporting on it")
    try:
        config = RunConfig.from_dict(results["config"])
    except ValueError as err:
        raise RunError(f"{directory.results}: {err}") from err
    decisions = json.loads(directory.decisions.read_text()) if directory.decisions.is_file() else None
    return Run(directory.path, results, config, decisions)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in IGNORED:
            out[f"{prefix}{key}"] = value
    return out


def group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by experiment (configs equal but for the seed), labelled by the settings in which experiments differ."""
    experiments: list[list[Run]] = []
    for r in runs:
        for members in experiments:
            if _flat(members[0].results["config"]) == _flat(r.results["config"]):
                members.append(r)
                break
        else:
            experiments.append([r])
    flats = [_flat(members[0].results["config"]) for members in experiments]
    differing = [k for k in flats[0] if any(f.get(k) != flats[0][k] for f in flats)]
    if "preset" in differing:  # another preset is another experiment: its name says enough
        differing = ["preset"]
    labels = {}
    for members, flat in zip(experiments, flats):
        label = ", ".join(flat[k] if k == "preset" else f"{k.split('.')[-1]} {flat[k]}" for k in differing[:3]) or \
            f"{members[0].config.preset} (this run)"
        labels[label + (f" ({len(members)} seeds)" if len(members) > 1 else "")] = members
    return labels


def _axes(title: str, xlabel: str, ylabel: str, integer: str = "x", size=(6.4, 4.0)):
    """A figure with one axes; the axes named in ``integer`` (task counts, task ids) get integer ticks."""
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for name in integer:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _byte_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB = 10^9 bytes"), (1e6, "MB = 10^6 bytes"), (1e3, "kB = 10^3 bytes")):
        if largest >= scale:
            return scale, unit
    return 1.0, "bytes"


def accuracy_figure(groups: dict[str, list[Run]]) -> Figure:
    """Average accuracy over the tasks learned so far, at each evaluation; the paper's curves dashed."""
    scenarios = {r.config.scenario == "GG" for members in groups.values() for r in members}
    given = {frozenset({True}): "task given", frozenset({False}): "task inferred"}.get(
        frozenset(scenarios), "GG: task given, else inferred")
    fig, ax = _axes("Average accuracy over all tasks learned so far", "tasks learned",
                    f"average accuracy ({given}, fraction)")
    for label, members in groups.items():
        x = [s["num_tasks"] for s in members[0].results["schedule"]]
        ys = np.array([[s[r.headline] for s in r.results["schedule"]] for r in members])
        mean = ys.mean(0)
        (line,) = ax.plot(x, mean, marker="o", label=label)
        line.set_gid(f"run:{label}")
        if len(members) > 1:
            ax.fill_between(x, mean - ys.std(0), mean + ys.std(0), alpha=0.25, color=line.get_color())
    shown, reach = set(), max(r.config.tasks for members in groups.values() for r in members)
    for members in groups.values():
        for curve in CURVES.get(members[0].config.preset, ()):
            if curve.label not in shown:  # the paper's points up to the run's length (its first one at least)
                shown.add(curve.label)
                keep = [i for i, n in enumerate(curve.tasks) if n <= max(reach, curve.tasks[0])]
                (line,) = ax.plot([curve.tasks[i] for i in keep], [curve.accuracy[i] for i in keep], linestyle="--",
                                  marker="x", color="0.2" if len(shown) == 1 else "0.6", label=curve.label)
                line.set_gid(f"paper:{curve.label}")
    low, high = ax.get_ylim()
    if high - low < 0.03:  # a few tenths of a point should not fill the whole height
        middle = (low + high) / 2
        ax.set_ylim(middle - 0.015, middle + 0.015)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def per_task_figure(run: Run) -> Figure:
    """Each task's accuracy at the end of the run, with the task given and (where inferred) inferred."""
    rows = run.results["tasks"]
    fig, ax = _axes("Accuracy of each task at the end of the run", "task", "accuracy (fraction)")
    tasks = [r["task"] for r in rows]
    for key, label, style in (("accuracy", "task given", "o"), ("accuracy_inferred", "task inferred", "x")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            (line,) = ax.plot(tasks, [np.nan if v is None else v for v in values], marker=style, linestyle="none",
                              markersize=7 if len(tasks) < 60 else 2, fillstyle="none" if key == "accuracy" else "full",
                              label=label if run.config.method != "hopsupsup" else
                              {"accuracy": "true mask", "accuracy_inferred": "recovered mask"}[key])
            line.set_gid(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def matrix_figure(run: Run) -> Figure:
    """``R[i][j]``: accuracy on task j (columns) after the tasks of row i were learned (rows)."""
    m = run.results["accuracy_matrix"]
    learned, rows = m["tasks_learned"], m["accuracy"]
    width = run.config.tasks
    values = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        values[i, : len(row)] = [np.nan if v is None else v for v in row]
    fig, ax = _axes("Accuracy on task j after learning i tasks", "task j", "tasks learned i", integer="x")
    low, high = np.nanmin(values), np.nanmax(values)
    if high - low < 0.1:  # a colour scale of at least 10 points, so that noise does not look like forgetting
        low, high = max(0.0, (low + high) / 2 - 0.05), min(1.0, (low + high) / 2 + 0.05)
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", origin="upper", vmin=low,
                      vmax=high, extent=(-0.5, width - 0.5, len(rows) - 0.5, -0.5))
    ax.set_yticks(range(len(rows)), [str(n) for n in learned])
    if values.size <= 150:
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if v < (low + high) / 2 else "black")
    fig.colorbar(image, ax=ax, label="accuracy (fraction)")
    return fig


def confusion_figure(run: Run) -> Figure:
    """Share of each task's test images classified with each inferred task (or, in NNs, mask)."""
    table = run.results["confusion"]
    size = 1 + max(max(int(t) for t in table), max(int(i) for row in table.values() for i in row))
    counts = np.zeros((1 + max(int(t) for t in table), size))
    for t, row in table.items():
        for i, n in row.items():
            counts[int(t), int(i)] = n
    shares = counts / counts.sum(1, keepdims=True).clip(min=1)
    what = {"NNs": "mask"}.get(run.config.scenario, "task whose mask is nearest the recovered one"
                                  if run.config.method == "hopsupsup" else "inferred task")
    fig, ax = _axes("Task inference: where each task's test images go", what, "task of the images", integer="xy")
    image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the task's test images")
    return fig


def allocation_figure(run: Run) -> Figure:
    """Masks allocated along the NNs training stream, against one mask per hidden task."""
    per_task = run.config.train.batches_per_task
    marks = [d for d in run.decisions["decisions"] if d["decision"] in ("first", "new")]
    batches = [d["batch"] for d in marks] + [run.decisions["batches"]]
    counts = list(range(1, len(marks) + 1)) + [len(marks)]
    fig, ax = _axes("Masks allocated along the stream (no task ids given)", "training batches seen",
                    "masks allocated", integer="xy")
    (line,) = ax.step(batches, counts, where="post", label="allocated")
    line.set_gid("allocated")
    hidden = np.arange(0, run.decisions["batches"])
    ax.plot(hidden, hidden // per_task + 1, linestyle="--", color="0.4", label="one per hidden task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def bytes_figure(groups: dict[str, list[Run]]) -> Figure:
    """What each method stores, in MB, as tasks are learned."""
    largest = max(max(m[0].results["progress"]["bytes_stored"], default=0) for m in groups.values())
    scale, unit = _byte_unit(largest)
    fig, ax = _axes("Bytes stored against tasks learned", "tasks learned", f"stored ({unit})")
    for label, members in groups.items():
        progress = members[0].results["progress"]
        (line,) = ax.plot(progress["tasks_learned"], np.array(progress["bytes_stored"]) / scale, marker=".",
                          label=label)
        line.set_gid(f"run:{label}")
    ax.set_xlim(left=0)
    lows = [min(m[0].results["progress"]["bytes_stored"]) for m in groups.values() if m[0].results["progress"]["bytes_stored"]]
    if lows and largest > 100 * min(lows):  # runs that store orders of magnitude apart
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def figures(runs: list[Run]) -> dict[str, Figure]:
    """Every figure the runs have data for, by file stem (per-run figures are prefixed when there are several)."""
    groups = group(runs)
    out = {}
    if any(len(r.results["schedule"]) for r in runs) and runs[0].config.scenario != "NNs":
        out["accuracy"] = accuracy_figure(groups)
    for i, (label, members) in enumerate(groups.items()):
        r, prefix = members[0], "" if len(groups) == 1 else f"{i + 1}-"
        out[f"{prefix}per-task"] = per_task_figure(r)
        if len(r.results.get("accuracy_matrix", {}).get("tasks_learned", [])) > 1:
            out[f"{prefix}accuracy-matrix"] = matrix_figure(r)
        if r.results.get("confusion"):
            out[f"{prefix}task-inference"] = confusion_figure(r)
        if r.decisions is not None:
            out[f"{prefix}nns-allocations"] = allocation_figure(r)
    if any(r.results.get("progress", {}).get("tasks_learned") for r in runs):
        out["bytes"] = bytes_figure(groups)
    return out


def _runs_table(groups: dict[str, list[Run]]) -> str:
    rows = []
    for i, (label, members) in enumerate(groups.items()):
        finals = [r.results.get(r.headline) for r in members]
        finals = [v for v in finals if v is not None]
        mean = (f"{statistics.mean(finals):.4f}" + (f" ± {statistics.stdev(finals):.4f}" if len(finals) > 1 else "")
                if finals else "—")
        m = members[0].results.get("metrics") or {}
        rows.append((i + 1, label, members[0].config.summary(), mean, fmt(m.get("forgetting")),
                     fmt(m.get("backward_transfer")), f"{members[0].results.get('bytes_stored', 0):,}",
                     f"{sum(r.results['seconds'] for r in members) / len(members):.0f}"))
    return markdown(make_table(["#", "label", "what", "average accuracy", "forgetting", "backward transfer",
                                "bytes stored", "seconds"], rows))


CAPTIONS = {"accuracy": "Average accuracy over the tasks learned so far, at each evaluation of the run; the "
                        "paper's numbers dashed (read off its figures, ±0.002).",
            "per-task": "Each task's test accuracy at the end of the run.",
            "accuracy-matrix": "The accuracy matrix: accuracy on task j after learning i tasks.",
            "task-inference": "The task-inference confusion matrix: where each task's test images go.",
            "nns-allocations": "Masks allocated along the training stream; dashed: one mask per hidden task.",
            "bytes": "Bytes each run stores against the number of tasks learned."}


def write_report(paths: list[Path], out: Path) -> list[str]:
    """Load the runs, write every figure as PNG and SVG and ``report.md`` into ``out``; returns the figure stems."""
    runs = [load_run(p) for p in paths]
    groups = group(runs)
    out.mkdir(parents=True, exist_ok=True)
    made = figures(runs)
    lines = ["# supsup report", "", _runs_table(groups), "Made by:", ""]
    for i, (label, members) in enumerate(groups.items()):
        lines += [f"{i + 1}. {label}: " + "; ".join(f"`{r.command}`" for r in members)]
    lines.append("")
    for n, (stem, fig) in enumerate(made.items()):
        for suffix in ("png", "svg"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=suffix, dpi=110)
            write_atomic(out / f"{stem}.{suffix}", buffer.getvalue())
        kind = stem.split("-", 1)[1] if stem[0].isdigit() else stem
        made_by = f"Made by `{runs[0].command}`." if len(runs) == 1 else "The runs are numbered as in the table."
        lines += [f"![{stem}]({stem}.png)", "", f"**Figure {n + 1}.** {CAPTIONS[kind]} {made_by}", ""]
    write_atomic(out / "report.md", "\n".join(lines).encode())
    return list(made)
