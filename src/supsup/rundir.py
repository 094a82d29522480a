"""A run directory: one unit of files, every one written atomically (``files.write_atomic``).

- ``model.safetensors``: the checkpoint, rewritten after every task group. Its metadata holds the run's
  config, what built the data and the progress so far: it alone is enough to resume.
- ``results.json``: ``status`` (``running``, ``interrupted``, ``complete``), the config, what built the data
  and the model, the checkpoint's sha256, the kernel backend, the continual-learning metrics so far and, once
  complete, the per-task figures. Rewritten right after the checkpoint.
- ``transfer-N.safetensors`` (SupSup Transfer): the running sum of the scores of the N tasks learned, which starts
  the next task; written before the checkpoint that names it (with its sha256), the older one removed after.
- ``metrics.csv`` (every scalar logged: loss, accuracies, seconds, per tasks learned), ``accuracy_matrix.csv``
  and ``task_confusion.csv`` (``supsup.metrics``); ``nns_decisions.json`` (scenario NNs); ``eval-*.json``
  (``supsup eval``); ``tensorboard/`` (``--tensorboard``); ``report/`` (``supsup report``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from supsup.config import RunConfig
from supsup.files import write_atomic, write_json

RESULTS, CHECKPOINT, DECISIONS = "results.json", "model.safetensors", "nns_decisions.json"
TRANSFER = "transfer-{tasks}.safetensors"  # SupSup Transfer's running score sums after that many tasks
METRICS, MATRIX, CONFUSION, TENSORBOARD = "metrics.csv", "accuracy_matrix.csv", "task_confusion.csv", "tensorboard"
WRITTEN = (RESULTS, CHECKPOINT, DECISIONS, METRICS, MATRIX, CONFUSION)
#: What ``--force`` removes from an existing run directory (nothing else in it is touched).
RUN_FILES = (*WRITTEN, "eval-*.json", "transfer-*.safetensors", ".transfer-*.safetensors.*.tmp",
             *(f".{name}.*.tmp" for name in WRITTEN))
RUN_FOLDERS = (TENSORBOARD, "report")
#: Config fields a resumed run or a re-evaluation may change (they do not change what was learned).
FREE_FIELDS = ("device", "paper")


class RunError(RuntimeError):
    """A run directory cannot be used as asked: not empty, not a run, or its files do not belong together."""


class RunDirectory:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results, self.checkpoint, self.decisions = (self.path / n for n in (RESULTS, CHECKPOINT, DECISIONS))

    def own_files(self) -> list[Path]:
        return sorted({f for pattern in RUN_FILES for f in self.path.glob(pattern)})

    def prepare(self, force: bool) -> None:
        """Make an empty (or, with ``force``, emptied of run files) writable directory, or say why not."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a directory: choose another --out")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not force:
                names = ", ".join(sorted(p.name for p in self.path.iterdir())[:4])
                raise RunError(f"--out {self.path} is not empty (it holds {names}): pass --resume {self.path} to "
                               f"continue that run, --force to replace it, or choose another --out")
            for file in self.own_files():
                file.unlink()
            for folder in RUN_FOLDERS:
                if (self.path / folder).is_dir() and not (self.path / folder).is_symlink():
                    shutil.rmtree(self.path / folder)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / ".write-test", {})
            (self.path / ".write-test").unlink()
        except OSError as err:
            raise RunError(f"cannot write into {self.path}: {err.strerror or err}; choose another --out") from err

    def remove_temporaries(self) -> None:
        """Temporary files of writes cut off by a kill (an atomic write leaves no other trace)."""
        for file in self.own_files():
            if file.name.endswith(".tmp"):
                file.unlink()

    def read_results(self) -> dict:
        if not self.results.is_file():
            raise RunError(f"{self.results} not found: is {self.path} a run directory written by `supsup run`?")
        try:
            results = json.loads(self.results.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{self.results} is not valid JSON ({err}): the file was cut short or edited") from err
        if not isinstance(results, dict) or "config" not in results or "status" not in results:
            raise RunError(f"{self.results} is not a supsup results file (no 'config' or 'status')")
        return results

    def config(self) -> RunConfig:
        try:
            return RunConfig.from_dict(self.read_results()["config"])
        except ValueError as err:
            raise RunError(f"{self.results}: {err}") from err

    def save(self, model, run_state: dict) -> str:
        """Write ``model``'s checkpoint atomically; returns its sha256 (from the bytes written, not read back)."""
        from supsup.checkpoint import checkpoint_bytes

        return write_atomic(self.checkpoint, checkpoint_bytes(model, extra={"run": run_state}))


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: saved ≠ now`` for every field that differs (nested dicts by dotted key)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if prefix == "" and key in FREE_FIELDS:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} ≠ {b!r}")
    return out


def as_saved_now(config: dict) -> dict:
    """A config saved in a checkpoint, in today's form: settings added since it was written read as their
    defaults (as ``RunConfig.from_dict`` reads results.json). A config that does not read is returned as it is,
    so that the comparison names what differs."""
    if not config:
        return config
    try:
        return RunConfig.from_dict(config).to_dict()
    except ValueError:
        return config


def require_same(what: str, saved: dict, now: dict, advice: str) -> None:
    """Refuse (``RunError``) when ``saved`` and ``now`` differ outside ``FREE_FIELDS``, naming the fields."""
    diff = _differences(saved, now)
    if diff:
        raise RunError(f"{what} differ: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}; {advice}")
