"""End-to-end: the ``supsup`` command on real MNIST with very few batches, and a table of bad inputs, each
ending with one clear line, the right exit status, and no existing file changed."""

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from supsup.cli import app, main

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # 2 contended threads are slower than 1


def flat(output: str) -> str:
    """Output with rich's box drawing and line wrapping removed."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def supsup(capsys, *argv) -> tuple[int, str, str]:
    """Run the console entry point in-process; returns (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_then_eval_on_real_mnist(tmp_path, data_root):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "permuted-mnist", "--tasks", "2", "--batches-per-task", "30", "--model",
                                 "lenet", "--output-size", "30", "--seed", "3", "--data-root", str(data_root),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "task inference" in result.output and "bytes per task" in result.output
    assert "kernels: native" in result.output or "kernels: torch (" in result.output
    results = json.loads((out / "results.json").read_text())
    for key in ("config", "tasks", "average_accuracy", "average_accuracy_inferred", "bytes_per_task", "seconds"):
        assert key in results
    assert results["status"] == "complete" and results["kernels"]["backend"] in ("native", "torch")
    assert results["config"]["model"] == "lenet" and results["config"]["seed"] == 3
    assert results["checkpoint"]["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert [t["task"] for t in results["tasks"]] == [0, 1]
    for t in results["tasks"]:
        assert 0.5 < t["accuracy"] <= 1  # 30 batches already learn far above chance (0.1)
        assert 0 <= t["task_inference_accuracy"] <= 1 and t["accuracy_inferred"] <= t["accuracy"] + 1e-9
    assert results["bytes_per_task"] == (300 * 784 + 100 * 300 + 30 * 100) // 8

    again = runner.invoke(app, ["eval", str(out), "--objective", "g", "--data-root", str(data_root)])
    assert again.exit_code == 0, again.output
    evaluated = json.loads((out / "eval-GNu-oneshot-g-image.json").read_text())
    # re-evaluation from the checkpoint reproduces the task-given accuracies exactly
    assert [t["accuracy"] for t in evaluated["tasks"]] == [t["accuracy"] for t in results["tasks"]]


@pytest.mark.parametrize("columns", ["300", "80", "40"])
def test_presets_prints_every_name_whole_at_any_width(columns, capsys, monkeypatch):
    from supsup.presets import preset_names

    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = supsup(capsys, "presets")
    assert code == 0
    words = set(out.replace("│", " ").split())
    assert len(preset_names()) >= 30
    for name in preset_names():
        assert name in words, name  # printed whole, not cut or folded
    assert max(len(line) for line in out.splitlines()) <= int(columns)


def test_presets_show_prints_toml_that_runs_as_the_preset(capsys, tmp_path):
    import tomllib

    from supsup.presets import get_preset, read_config_file

    code, out, _ = supsup(capsys, "presets", "show", "rotated-mnist", "--small")
    assert code == 0
    assert tomllib.loads(out)["train"]["batches_per_task"] == 200
    (tmp_path / "mine.toml").write_text(out)
    config = read_config_file(tmp_path / "mine.toml")
    assert config.to_dict() == {**get_preset("rotated-mnist", small=True).to_dict(), "preset": "rotated-mnist"}


def test_version(capsys):
    from supsup import __version__

    code, out, _ = supsup(capsys, "--version")
    assert code == 0 and out.strip() == f"supsup {__version__}"


def test_what_a_run_says_follows_its_settings(tmp_path, data_root, capsys):
    code, out, _ = supsup(capsys, "run", "demo", "--tasks", "2", "--batches-per-task", "5", "--data-root", data_root,
                          "--out", tmp_path / "run")
    assert code == 0
    assert "2 PermutedMNIST tasks" in flat(out) and "5 PermutedMNIST" not in out
    assert "5 batches of 128 per task" in flat(out)


def test_a_runs_config_runs_again_to_identical_results(tmp_path, data_root, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, err = supsup(capsys, "run", "demo", *SMALL_RUN, "--set", "train.lr=2e-4", "--optimizer", "adam",
                          "--batch-size", "64", "--seed", "5", "--data-root", data_root, "--out", first)
    assert code == 0, err
    results = json.loads((first / "results.json").read_text())
    assert results["config"]["train"] == {**results["config"]["train"], "lr": 2e-4, "optimizer": "adam",
                                          "batch_size": 64}
    code, _, err = supsup(capsys, "run", first / "results.json", "--data-root", data_root, "--out", again)
    assert code == 0, err
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["config"] == results["config"]
    for key in ("tasks", "accuracy_matrix", "metrics", "schedule", "data"):
        assert rerun[key] == results[key], key
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(first / "model.safetensors")).keys()
    for key, tensor in load_file(str(first / "model.safetensors")).items():
        assert load_file(str(again / "model.safetensors"))[key].equal(tensor), key


def test_nns_scenario_allocates_one_mask_per_hidden_task(tmp_path, data_root):
    out = tmp_path / "nns"
    result = runner.invoke(app, ["run", "nns-permuted-mnist", "--tasks", "2", "--batches-per-task", "200",
                                 "--data-root", str(data_root), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["num_masks"] == 2 and results["average_accuracy_inferred"] > 0.8
    decisions = json.loads((out / "nns_decisions.json").read_text())["decisions"]
    assert [d["decision"] for d in decisions if d["decision"] in ("first", "new")] == ["first", "new"]
    again = runner.invoke(app, ["eval", str(out), "--data-root", str(data_root)])
    assert again.exit_code == 0, again.output
    evaluated = json.loads((out / "eval-NNs-oneshot-entropy-image.json").read_text())
    assert evaluated["average_accuracy_inferred"] == results["average_accuracy_inferred"]


# ------------------------------------------------------------------------------------------ bad inputs
SMALL_RUN = ["--tasks", "2", "--batches-per-task", "30", "--output-size", "30"]


@dataclass
class Paths:
    run: Path  # a finished run (seed 3), never to be changed by any case
    other: Path  # a finished run with seed 7
    work: Path  # this case's scratch folder
    data: Path

    @property
    def copy(self) -> Path:
        return self.work / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> tuple[Path, Path]:
    made = []
    for seed in (3, 7):
        out = tmp_path_factory.mktemp(f"seed{seed}") / "run"
        assert main(["run", "demo", *SMALL_RUN, "--seed", str(seed), "--data-root", str(data_root),
                     "--out", str(out)]) == 0
        made.append(out)
    return tuple(made)


def copy_run(p: Paths) -> None:
    shutil.copytree(p.run, p.copy)


def edit_results(edit: Callable[[dict], None]) -> Callable[[Paths], None]:
    def setup(p: Paths) -> None:
        copy_run(p)
        results = json.loads((p.copy / "results.json").read_text())
        edit(results)
        (p.copy / "results.json").write_text(json.dumps(results))
    return setup


def edit_checkpoint(edit_meta=None, edit_tensors=None) -> Callable[[Paths], None]:
    """A copy of the run whose checkpoint was edited and whose results.json was updated to its sha256, so
    that the checkpoint's own checks are the ones that must catch the edit."""
    def setup(p: Paths) -> None:
        from safetensors import safe_open

        copy_run(p)
        path = p.copy / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["supsup"])
        tensors = load_file(str(path))
        if edit_meta:
            edit_meta(meta)
        if edit_tensors:
            edit_tensors(tensors)
        save_file(tensors, str(path), metadata={"supsup": json.dumps(meta)})
        results = json.loads((p.copy / "results.json").read_text())
        results["checkpoint"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (p.copy / "results.json").write_text(json.dumps(results))
    return setup


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(tensors: dict) -> None:
    packed = tensors["net.1.bank.packed"]
    packed[:, :100] ^= 0xFF


def swap_checkpoint(p: Paths) -> None:
    copy_run(p)
    shutil.copy(p.other / "model.safetensors", p.copy / "model.safetensors")


def write(name: str, text: str) -> Callable[[Paths], None]:
    def setup(p: Paths) -> None:
        (p.work / name).write_text(text)
    return setup


def corrupt_data_root(p: Paths) -> None:
    (p.work / "data" / "mnist").mkdir(parents=True)
    for file in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        shutil.copy(p.data / "mnist" / file, p.work / "data" / "mnist" / file)
    (p.work / "data" / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 20)


def data_root_with(p: Paths, missing: str, put: Callable[[Path], None]) -> None:
    """A data root holding MNIST but ``missing``, and ``put(path of missing)`` in its place."""
    folder = p.work / "data" / "mnist"
    folder.mkdir(parents=True)
    for file in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        if file != missing:
            shutil.copy(p.data / "mnist" / file, folder / file)
    put(folder / missing)


@dataclass
class Case:
    name: str
    argv: Callable[[Paths], list]
    code: int
    message: str
    setup: Callable[[Paths], None] | None = None


def _data(p: Paths) -> list:
    return ["--data-root", p.data]


CASES = [
    # run: settings
    Case("unknown preset", lambda p: ["run", "nope", "--out", p.work / "o"], 2, "unknown preset 'nope'"),
    Case("no preset", lambda p: ["run", "--out", p.work / "o"], 2,
         "give a preset (see `supsup presets`), a config file, or --resume"),
    Case("zero tasks", lambda p: ["run", "demo", "--tasks", "0"], 2, "tasks must be >= 1, got 0"),
    Case("tasks not a number", lambda p: ["run", "demo", "--tasks", "x"], 2, "Invalid value for '--tasks'"),
    Case("zero batches", lambda p: ["run", "demo", "--batches-per-task", "0"], 2, "batches_per_task must be >= 1"),
    Case("zero tasks at once", lambda p: ["run", "demo", "--tasks-at-once", "0"], 2, "tasks_at_once must be >= 1"),
    Case("unknown model", lambda p: ["run", "demo", "--model", "resnet"], 2, "Invalid value for '--model'"),
    Case("unknown scenario", lambda p: ["run", "demo", "--scenario", "XX"], 2, "Invalid value for '--scenario'"),
    Case("unknown option", lambda p: ["run", "demo", "--bogus"], 2, "No such option: --bogus"),
    Case("huge seed", lambda p: ["run", "demo", "--seed", str(2 ** 70)], 2, "seed must be in [0, 2^63 - 1]"),
    Case("negative seed", lambda p: ["run", "demo", "--seed", "-1"], 2, "seed must be in [0, 2^63 - 1], got -1"),
    Case("output size below classes", lambda p: ["run", "demo", "--output-size", "5"], 2,
         "output_size 5 is smaller than the 10 classes"),
    Case("G without superfluous outputs", lambda p: ["run", "demo", "--objective", "g", "--output-size", "10"], 2,
         "the G objective needs superfluous outputs"),
    Case("GG ignores granularity", lambda p: ["run", "demo", "--scenario", "GG", "--granularity", "sample"], 2,
         "--granularity has no effect in scenario GG"),
    Case("GG ignores the method", lambda p: ["run", "demo", "--scenario", "GG", "--inference", "binary"], 2,
         "--inference has no effect in scenario GG"),
    Case("steps without gradient", lambda p: ["run", "demo", "--steps", "4"], 2,
         "--steps only applies to --inference gradient"),
    Case("NNs ignores tasks at once", lambda p: ["run", "nns-permuted-mnist", "--tasks-at-once", "2"], 2,
         "--tasks-at-once has no effect in scenario NNs"),
    Case("device nonsense", lambda p: ["run", "demo", "--device", "nonsense", "--out", p.work / "o"], 1,
         "unknown device 'nonsense'"),
    Case("device cuda without CUDA", lambda p: ["run", "demo", "--device", "cuda", "--out", p.work / "o"], 1,
         "CUDA is not available here"),
    Case("more tasks than memory", lambda p: ["run", "demo", "--tasks", "100000000000", "--out", p.work / "o"], 1,
         "the masks of 100,000,000,000 tasks take 3,203,749.7 GiB, more than the"),
    Case("too many SplitMNIST tasks", lambda p: ["run", "split-mnist", "--tasks", "7", "--out", p.work / "o",
                                                 *_data(p)], 2, "split-mnist has at most 5 tasks, got 7"),
    # run: the run directory
    Case("out is a file", lambda p: ["run", "demo", "--out", p.work / "f"], 1, "is a file, not a directory",
         write("f", "mine")),
    Case("out is a finished run", lambda p: ["run", "demo", "--out", p.run], 1,
         "is not empty (it holds accuracy_matrix.csv, metrics.csv, model.safetensors, results.json): pass --resume"),
    Case("out holds other files", lambda p: ["run", "demo", "--out", p.work], 1, "is not empty (it holds notes.txt)",
         write("notes.txt", "mine")),
    Case("out under a file", lambda p: ["run", "demo", "--out", p.work / "f" / "run"], 1, "cannot write into",
         write("f", "mine")),
    Case("resume with a preset", lambda p: ["run", "demo", "--resume", p.run], 2,
         "--resume continues a run with its own settings"),
    Case("resume with another setting", lambda p: ["run", "--resume", p.run, "--tasks", "9"], 2,
         "--tasks cannot be given with it (only --device, --data-root and --tensorboard)"),
    Case("resume a missing run", lambda p: ["run", "--resume", p.work / "nothing"], 1, "results.json not found"),
    Case("resume a complete run", lambda p: ["run", "--resume", p.run, *_data(p)], 1,
         "is complete: nothing to resume"),
    Case("resume with truncated results", lambda p: ["run", "--resume", p.copy, *_data(p)], 1,
         "results.json is not valid JSON", lambda p: (copy_run(p), truncate(p.copy / "results.json"))),
    Case("resume with a mixed-up checkpoint", lambda p: ["run", "--resume", p.copy, *_data(p)], 1,
         "model.safetensors and results.json configs differ: seed: 7 ≠ 3", lambda p: _running(p)),
    Case("resume with an unknown setting in results", lambda p: ["run", "--resume", p.copy, *_data(p)], 1,
         "config.colour is not a setting", edit_results(lambda r: r["config"].update(colour="red"))),
    Case("resume with a mistyped setting in results", lambda p: ["run", "--resume", p.copy, *_data(p)], 1,
         "config.tasks must be of type int, got 'five'", edit_results(lambda r: r["config"].update(tasks="five"))),
    # eval
    Case("eval a missing run", lambda p: ["eval", p.work / "nothing"], 1, "results.json not found"),
    Case("eval a baseline run", lambda p: ["eval", p.copy, *_data(p)], 1,
         "holds a run of method upper-bound, which keeps no checkpoint to re-evaluate",
         edit_results(lambda r: r["config"].update(method="upper-bound", scenario="GG"))),
    Case("eval out is the checkpoint", lambda p: ["eval", p.run, "--out", p.run / "model.safetensors"], 2,
         "model.safetensors is an input of this command"),
    Case("eval out is results.json", lambda p: ["eval", p.run, "--out", p.run / "results.json"], 2,
         "results.json is an input of this command"),
    Case("eval out is a directory", lambda p: ["eval", p.run, "--out", p.work], 2, "is a directory"),
    Case("eval a checkpoint of another run", lambda p: ["eval", p.copy, *_data(p)], 1,
         "is not the checkpoint results.json was written with", swap_checkpoint),
    Case("eval results edited to another seed", lambda p: ["eval", p.copy, *_data(p)], 1,
         "configs differ: seed: 3 ≠ 7", edit_results(lambda r: r["config"].update(seed=7))),
    Case("eval results edited to other data", lambda p: ["eval", p.copy, *_data(p)], 1,
         "the data recorded in results.json and the data rebuilt now differ: fingerprint",
         edit_results(lambda r: r["data"].update(fingerprint="0" * 16))),
    Case("eval flipped mask bytes", lambda p: ["eval", p.copy, *_data(p)], 1, "fails its checksum",
         edit_checkpoint(edit_tensors=flip_bytes)),
    Case("eval header without layers", lambda p: ["eval", p.copy, *_data(p)], 1, "'layers' must be a list",
         edit_checkpoint(edit_meta=lambda m: m.pop("layers"))),
    Case("eval header with unknown architecture", lambda p: ["eval", p.copy, *_data(p)], 1,
         "model.safetensors and the model of results.json differ: architecture.name: 'vit' ≠ 'lenet'",
         edit_checkpoint(edit_meta=lambda m: m["architecture"].update(name="vit"))),
    Case("eval header with a huge output size", lambda p: ["eval", p.copy, *_data(p)], 1,
         "differ: architecture.output_size: 10000000 ≠ 30",
         edit_checkpoint(edit_meta=lambda m: m["architecture"].update(output_size=10_000_000))),
    Case("eval truncated results", lambda p: ["eval", p.copy], 1, "results.json is not valid JSON",
         lambda p: (copy_run(p), truncate(p.copy / "results.json"))),
    Case("eval results not a results file", lambda p: ["eval", p.copy], 1, "is not a supsup results file",
         lambda p: (copy_run(p), (p.copy / "results.json").write_text("[1, 2]"))),
    Case("eval without checkpoint", lambda p: ["eval", p.copy, *_data(p)], 1,
         "model.safetensors not found: the run saved no task yet",
         lambda p: (copy_run(p), (p.copy / "model.safetensors").unlink())),
    Case("eval GG with a granularity", lambda p: ["eval", p.run, "--scenario", "GG", "--granularity", "sample"], 2,
         "--granularity has no effect in scenario GG"),
    Case("eval mixed stream without per-sample", lambda p: ["eval", p.run, "--mixed-per-task", "10"], 2,
         "--mixed-per-task only applies to --granularity sample"),
    Case("eval on a missing device", lambda p: ["eval", p.run, "--device", "cuda:7"], 1, "CUDA is not available"),
    Case("eval G objective without superfluous outputs", lambda p: ["eval", p.copy, "--objective", "g"], 2,
         "the G objective needs superfluous outputs", edit_results(lambda r: r["config"].update(output_size=10))),
    # data
    Case("data file corrupt", lambda p: ["run", "demo", "--out", p.work / "o", "--data-root", p.work / "data"], 1,
         "checksum mismatch for", corrupt_data_root),
    Case("data file replaced by a folder", lambda p: ["run", "demo", "--out", p.work / "o", "--data-root",
                                                      p.work / "data"], 1, "train-images-idx3-ubyte",
         lambda p: data_root_with(p, "train-images-idx3-ubyte", lambda f: f.mkdir())),
    Case("data file a corrupt gzip", lambda p: ["run", "demo", "--out", p.work / "o", "--data-root", p.work / "data"],
         1, "train-images-idx3-ubyte.gz is not a valid gzip file",
         lambda p: data_root_with(p, "train-images-idx3-ubyte", lambda f: f.with_suffix(".gz").write_bytes(b"junk"))),
    Case("fetch into a data root that is a file", lambda p: ["fetch", "--data-root", p.work / "f"], 1,
         "cannot write in", write("f", "mine")),
    # config files and --set
    Case("config file not TOML", lambda p: ["run", p.work / "bad.toml"], 2, "bad.toml is not valid TOML",
         write("bad.toml", "tasks = = 3\n")),
    Case("config file missing", lambda p: ["run", p.work / "none.toml"], 2, "none.toml not found"),
    Case("config file with an unknown setting", lambda p: ["run", p.work / "x.toml"], 2,
         "config.colour is not a setting", write("x.toml", 'colour = "red"\n')),
    Case("config file with a mistyped setting", lambda p: ["run", p.work / "x.toml"], 2,
         "config.train.lr must be of type float, got 'fast'", write("x.toml", '[train]\nlr = "fast"\n')),
    Case("config file with an unknown section", lambda p: ["run", p.work / "x.toml"], 2,
         "config.trian is not a setting", write("x.toml", "[trian]\nlr = 0.1\n")),
    Case("results file that is not JSON", lambda p: ["run", p.work / "results.json"], 2, "is not valid JSON",
         write("results.json", "{")),
    Case("--set an unknown field", lambda p: ["run", "demo", "--set", "train.colour=red"], 2,
         "config.train.colour is not a setting (known: "),
    Case("--set a wrong type", lambda p: ["run", "demo", "--set", "tasks=five"], 2,
         "config.tasks must be of type int, got 'five'"),
    Case("--set without a value", lambda p: ["run", "demo", "--set", "tasks"], 2, "expected section.key=value"),
    Case("--set a section to a value", lambda p: ["run", "demo", "--set", "train=3"], 2,
         "config.train must be a table of settings"),
    Case("--set a value out of range", lambda p: ["run", "demo", "--set", "train.batch_size=0"], 2,
         "batch_size must be >= 1, got 0"),
    Case("--small without a small form", lambda p: ["run", "split-mnist", "--small"], 2, "has no [small] form"),
    Case("show an unknown preset", lambda p: ["presets", "show", "nope"], 2, "unknown preset 'nope'"),
    Case("baseline outside GG", lambda p: ["run", "demo", "--set", "method=psp"], 2,
         "method psp is a GG baseline (task given): set scenario GG"),
    Case("conv net on flat images", lambda p: ["run", "demo", "--model", "gem_resnet18"], 2, "needs images"),
    Case("topk without a density", lambda p: ["run", "demo", "--set", "rule=topk"], 2,
         "the topk rule needs one of density"),
    Case("time budget outside NNs", lambda p: ["run", "demo", "--train-seconds", "5"], 2,
         "--train-seconds only applies to scenario NNs"),
    Case("tasks at once for a baseline", lambda p: ["run", "rotated-mnist-psp", "--tasks-at-once", "2"], 2,
         "--tasks-at-once has no effect in method psp"),
    Case("HopSupSup with Adam", lambda p: ["run", "hopsupsup-split-mnist", "--optimizer", "adam"], 2,
         "HopSupSup trains its neuron masks with SGD"),
    Case("negative time budget", lambda p: ["run", "nns-permuted-mnist", "--train-seconds", "-1"], 2,
         "train_seconds must be a positive number of seconds"),
    Case("resume a baseline run", lambda p: ["run", "--resume", p.copy, *_data(p)], 1,
         "method upper-bound runs cannot be resumed: its state is not a SupermaskModel",
         edit_results(lambda r: (r.update(status="running"), r["config"].update(method="upper-bound",
                                                                                 scenario="GG")))),
    Case("resume an NNs run", lambda p: ["run", "--resume", p.copy, *_data(p)], 1,
         "scenario NNs runs cannot be resumed",
         edit_results(lambda r: (r.update(status="running"), r["config"].update(scenario="NNs")))),
    Case("CIFAR-100 not in the data root", lambda p: ["run", "split-cifar100", "--small", "--out", p.work / "o",
                                                      "--data-root", p.work / "empty"], 1, "CIFAR-100 not found"),
    Case("ImageNet not in the data root", lambda p: ["run", "split-imagenet", "--small", "--out", p.work / "o",
                                                     "--data-root", p.work / "empty"], 1, "ImageNet not found"),
    # report
    Case("report a missing run", lambda p: ["report", p.work / "nothing"], 1, "results.json not found"),
    Case("report a run that is not finished", lambda p: ["report", p.copy], 1,
         "is running: finish it (supsup run --resume", edit_results(lambda r: r.update(status="running"))),
]


def _running(p: Paths) -> None:
    """A run whose checkpoint was swapped for another seed's, marked as still running (so resumable)."""
    swap_checkpoint(p)
    results = json.loads((p.copy / "results.json").read_text())
    results["status"] = "running"
    (p.copy / "results.json").write_text(json.dumps(results))


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots`` with its bytes' sha256 (data files: size and mtime)."""
    state = {}
    for root in roots:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                state[f] = (f.stat().st_size, f.stat().st_mtime_ns) if f.stat().st_size > 1 << 22 else \
                    hashlib.sha256(f.read_bytes()).hexdigest()
    return state


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_with_one_clear_line_and_changes_nothing(case, runs, tmp_path, data_root, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("SUPSUP_DATA", str(data_root))  # verified MNIST: no case fetches anything
    paths = Paths(*runs, tmp_path, data_root)
    if case.setup:
        case.setup(paths)
    before = snapshot(paths.run, paths.other, paths.work, data_root)
    code, out, err = supsup(capsys, *case.argv(paths))
    assert code == case.code, out + err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err  # one line, on stderr
    assert case.message in err, err
    assert "Traceback" not in out + err
    assert snapshot(paths.run, paths.other, paths.work, data_root) == before


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_run_saved_before_a_setting_existed_still_evaluates_and_resumes(command, runs, tmp_path, data_root,
                                                                          capsys):
    """A setting added since the run was saved (here train.fused_step) reads as its default, in the checkpoint
    as in results.json: the two still belong together."""
    p = Paths(*runs, tmp_path, data_root)
    edit_checkpoint(edit_meta=lambda meta: meta["extra"]["run"]["config"]["train"].pop("fused_step"))(p)
    results = json.loads((p.copy / "results.json").read_text())
    results["config"]["train"].pop("fused_step")
    if command == "resume":
        results["status"] = "interrupted"
    (p.copy / "results.json").write_text(json.dumps(results))
    argv = ["eval", p.copy] if command == "eval" else ["run", "--resume", p.copy]
    code, out, err = supsup(capsys, *argv, "--data-root", data_root)
    assert code == 0, out + err
    assert json.loads((p.copy / "results.json").read_text())["status"] == "complete"


def test_the_table_covers_at_least_seventy_cases():
    assert len(CASES) >= 70


def test_sys_read_only_place_is_refused_before_training(capsys, tmp_path):
    target = Path("/sys/supsup-cannot-write-here")
    try:
        target.mkdir()
        target.rmdir()
        pytest.skip("/sys is writable on this machine")
    except OSError:
        pass
    code, _, err = supsup(capsys, "run", "demo", "--out", target)
    assert code == 1 and f"cannot write into {target}" in err
    existing = Path("/sys/kernel")  # an existing folder on a read-only file system
    code, _, err = supsup(capsys, "run", "demo", "--out", existing, "--force")
    assert code == 1 and f"cannot write into {existing}" in err


def test_a_run_whose_data_is_missing_leaves_no_run_directory(tmp_path, capsys):
    code, _, err = supsup(capsys, "run", "split-cifar100", "--small", "--data-root", tmp_path / "empty", "--out",
                          tmp_path / "o")
    assert code == 1 and "CIFAR-100 not found" in err and not (tmp_path / "o").exists()
