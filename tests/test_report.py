"""``supsup report`` on small real runs: the figures plot exactly what results.json holds (read back from the
matplotlib objects), the paper's curve is beside the run's, seeds become mean ± std, and report.md embeds it all."""

import json

import numpy as np
import pytest

from supsup.cli import main
from supsup.paper import CURVES
from supsup.report import figures, load_run

SMALL = ["--tasks", "2", "--batches-per-task", "30", "--output-size", "30", "--set", "eval_at=[1, 2]"]

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 contended threads are slower than 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("report")
    made = {}
    for name, extra in (("h3", ["--seed", "3"]), ("h4", ["--seed", "4"]), ("g3", ["--seed", "3", "--objective", "g"]),
                        ("nns", None)):
        argv = ["run", "demo", *SMALL, *extra] if extra else \
            ["run", "nns-permuted-mnist", "--tasks", "2", "--batches-per-task", "100", "--set", "nns.check_every=50"]
        assert main([*argv, "--data-root", str(data_root), "--out", str(root / name)]) == 0
        made[name] = root / name
    return made


def results(path):
    return json.loads((path / "results.json").read_text())


def lines(fig):
    return {line.get_gid(): line for line in fig.axes[0].get_lines() if line.get_gid()}


def test_accuracy_figure_plots_the_schedule_the_paper_beside_it_and_seeds_as_mean_and_std(runs):
    made = figures([load_run(runs[n]) for n in ("h3", "h4", "g3")])
    plotted = lines(made["accuracy"])
    h = [results(runs[n])["schedule"] for n in ("h3", "h4")]
    g = results(runs["g3"])["schedule"]
    h_line = next(line for gid, line in plotted.items() if gid.startswith("run:") and "2 seeds" in gid)
    g_line = next(line for gid, line in plotted.items() if gid.startswith("run:") and "objective g" in gid)
    assert list(h_line.get_xdata()) == [1, 2]
    expected = np.mean([[s["average_accuracy_inferred"] for s in run] for run in h], axis=0)
    assert np.allclose(h_line.get_ydata(), expected)
    assert list(g_line.get_ydata()) == [s["average_accuracy_inferred"] for s in g]
    band = made["accuracy"].axes[0].collections[0].get_paths()[0].vertices[:, 1]  # mean ± std of the two seeds
    spread = np.std([[s["average_accuracy_inferred"] for s in run] for run in h], axis=0)
    assert np.isclose(band.max(), (expected + spread).max()) and np.isclose(band.min(), (expected - spread).min())
    paper = plotted[f"paper:{CURVES['demo'][0].label}"]
    assert tuple(paper.get_ydata()) == CURVES["demo"][0].accuracy[:1]  # up to the run's length: the first point


def test_per_run_figures_hold_the_runs_numbers(runs):
    run = load_run(runs["h3"])
    data = results(runs["h3"])
    made = figures([run])
    per_task = lines(made["per-task"])
    assert list(per_task["accuracy"].get_ydata()) == [t["accuracy"] for t in data["tasks"]]
    assert list(per_task["accuracy_inferred"].get_ydata()) == [t["accuracy_inferred"] for t in data["tasks"]]
    matrix = np.asarray(made["accuracy-matrix"].axes[0].images[0].get_array().filled(np.nan))
    expected = np.array([row + [None] * (2 - len(row)) for row in data["accuracy_matrix"]["accuracy"]], dtype=float)
    assert np.array_equal(matrix, expected, equal_nan=True)
    shares = made["task-inference"].axes[0].images[0].get_array()
    counts = data["confusion"]
    for t, row in counts.items():
        for i, n in row.items():
            assert np.isclose(shares[int(t), int(i)], n / sum(row.values()))
    stored = lines(made["bytes"])
    (line,) = stored.values()
    assert list(line.get_xdata()) == data["progress"]["tasks_learned"]
    assert np.allclose(line.get_ydata(), np.array(data["progress"]["bytes_stored"]) / 1e3)  # in kB
    assert "kB" in made["bytes"].axes[0].get_ylabel()


def test_nns_allocations_follow_the_decision_log(runs):
    made = figures([load_run(runs["nns"])])
    decisions = json.loads((runs["nns"] / "nns_decisions.json").read_text())
    allocated = lines(made["nns-allocations"])["allocated"]
    new = [d["batch"] for d in decisions["decisions"] if d["decision"] in ("first", "new")]
    assert list(allocated.get_xdata())[:-1] == new and list(allocated.get_ydata())[-1] == len(new)
    assert "task-inference" in made and "accuracy" not in made


def test_report_writes_png_svg_and_a_markdown_page_that_embeds_them(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs["h3"]), str(runs["g3"]), "--out", str(out)]) == 0
    page = (out / "report.md").read_text()
    for stem in ("accuracy", "1-per-task", "2-per-task", "1-accuracy-matrix", "bytes"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
        assert f"![{stem}]({stem}.png)" in page
    assert results(runs["h3"])["command"].startswith("supsup run demo --tasks 2") and \
        results(runs["h3"])["command"] in page
    assert "| 1 " in page and "objective g" in page  # the runs table, labelled by what differs
