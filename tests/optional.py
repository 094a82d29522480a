"""Optional integrations: their tests skip where the library is not installed, except where
``$SUPSUP_REQUIRE`` names the integration (``make test`` sets it where it installed the library), so that
there a missing or broken import fails instead of hiding every test behind a skip."""

from __future__ import annotations

import importlib
import os

import pytest


def import_or_skip(module: str, integration: str):
    """``module``, imported; skips the test file if it is missing and ``integration`` is not required."""
    if integration in os.environ.get("SUPSUP_REQUIRE", "").split(","):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'supsup[{integration}]')")
