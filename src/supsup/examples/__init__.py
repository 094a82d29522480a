"""Runnable examples: ``python -m supsup.examples.NAME --help``.

- ``avalanche_permuted_mnist``: the ``SupSup`` Avalanche strategy, with task labels and without;
- ``lightning_permuted_mnist``: one ``Trainer.fit`` per task, a Lightning checkpoint, every task restored;
- ``transformer``: an ``nn.TransformerEncoder`` learning PermutedMNIST rows as tokens, tasks inferred by One-Shot;
- ``pretrained``: masks over a pretrained CNN's kept weights against masks over seeded weights.
"""

from __future__ import annotations

import argparse

import torch

from supsup.data.idx import load_mnist
from supsup.data.streams import PermutedMNIST


def example_arguments(doc: str, tasks: int, out: str, test_samples: int | None = None) -> argparse.ArgumentParser:
    """The options every example takes: ``--tasks``, ``--batches`` (per task), ``--test-samples``,
    ``--threads``, ``--data-root``, ``--out``."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=tasks, help=f"PermutedMNIST tasks (default {tasks})")
    parser.add_argument("--batches", type=int, default=200, help="training batches of 128 per task (default 200)")
    parser.add_argument("--test-samples", type=int, default=test_samples,
                        help=f"test samples per task (default {test_samples or 'all'})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: LeNet's small operations run faster on one)")
    parser.add_argument("--data-root", default=None, help="MNIST's folder (default: $SUPSUP_DATA or ~/.cache/supsup)")
    parser.add_argument("--out", default=out, help=f"folder for the results (default {out})")
    return parser


def permuted_mnist(args: argparse.Namespace) -> PermutedMNIST:
    """The example's tasks: PermutedMNIST from verified MNIST (fetched on first use), seed 1; sets torch's
    threads."""
    torch.set_num_threads(args.threads)
    return PermutedMNIST(load_mnist(args.data_root), args.tasks, seed=1)
