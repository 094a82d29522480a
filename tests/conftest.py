"""Shared fixtures. Real-data tests read MNIST from ``$SUPSUP_DATA`` (default: ``<repo>/.data``),
fetching and verifying it on first use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ.get("SUPSUP_DATA", REPO / ".data"))


@pytest.fixture(scope="session")
def mnist(data_root):
    from supsup.data.idx import load_mnist

    return load_mnist(data_root)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: small CPU ops are far faster than on two contended threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
