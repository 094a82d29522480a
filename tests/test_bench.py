"""The bench records what its figures need to be read: the machine, its load, each row's spread, One-Shot on
real MNIST images, and One-Shot as a ratio to a memcpy of the masks' bytes measured in the same run."""

import itertools
import json
from pathlib import Path

import pytest

from supsup import bench

TINY = {"train_counts": (1,), "fc_ks": [], "lenet_ks": [10], "kernel_k": 20, "reps": 3, "precisions": ("fp32",),
        "per_sample_batch": 16}


def test_a_tiny_run_records_machine_spread_images_and_the_memcpy_ratio(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("SUPSUP_DATA", str(data_root))
    results = bench.run_benchmarks("cpu", plan=TINY, json_path=tmp_path / "bench.json", retain_memory=False)
    meta = results["meta"]
    assert meta["cpu"] and meta["cpu_count"] >= 1 and len(meta["load_average"]) == 3 and meta["load_average_end"]
    assert isinstance(meta["cpu_flags"], list)
    assert meta["oneshot_images"].startswith("MNIST test images")
    (train,) = [r for r in results["rows"] if r["figure"] == "train"]
    (oneshot,) = [r for r in results["rows"] if r["figure"] == "oneshot"]
    assert train["spread"] >= 0 and train["reps"] == 3
    assert oneshot["mask_bytes"] == 10 * 39_400
    assert abs(oneshot["ratio_vs_memcpy"] - oneshot["ms"] / oneshot["memcpy_ms"]) < 1e-9
    (per_sample,) = [r for r in results["rows"] if r["figure"] == "per-sample"]
    assert per_sample["batch"] == 16 and per_sample["k"] == 50
    assert abs(per_sample["ratio_vs_forwards"] - per_sample["ms"] / per_sample["forwards_ms"]) < 1e-9
    if bench.kernels.backend_for(bench.torch.device("cpu")) == "native":  # the fused step, timed against torch's
        assert train["step"] == "fused" and train["unfused_ms_per_task_batch"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == results["rows"]
    table = bench.markdown_table(results)
    assert meta["cpu"] in table.splitlines()[0] and "memcpy of the masks" in table


def test_results_saved_before_these_fields_still_render():
    old = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-full-1thread.json"
    table = bench.markdown_table(json.loads(old.read_text()))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if "|" in line]
    assert ["One-Shot, one image", "lenet k=2,500", "29.398 ms"] in [row[:3] for row in rows]


@pytest.mark.parametrize("name", ["cpu-full-1thread-2026-12-02-evening.json", "cpu-full-1thread-2026-12-02-fused-2.json"])
def test_at_80_columns_every_row_prints_whole_lines_within_the_width(name):
    from rich.console import Console

    results = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name).read_text())
    console = Console(width=80, record=True, color_system=None)
    bench.print_table(results, console)
    blocks = console.export_text().split("\n\n")[1:]  # after the machine's lines, a block per row
    device = results["meta"]["device"].split(":")[0]
    assert len(blocks) == len(results["rows"])
    for block, row in zip(blocks, results["rows"]):
        title, *lines = block.strip("\n").splitlines()
        fields = list(itertools.takewhile(lambda line: line.startswith("  "), lines))
        if len(fields) < len(lines):  # only the footer (seconds, load, images) may follow, after the last row
            assert row is results["rows"][-1] and lines[len(fields)].startswith(f"{results['meta']['seconds']} s")
        cells = bench._cells(row, device)
        assert title == f"{cells[0]}, {cells[1]}"
        assert all(len(line) <= 80 for line in fields), block  # every field whole: nothing folded
        measured = cells[2].replace("**", "")
        assert f"  measured (± spread): {measured}" in fields
