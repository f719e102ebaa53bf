"""Shared pytest setup: make the test helpers (models.py, reference.py) importable and
register the markers the engine tests use."""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers", "memory: peak-memory test in a fresh subprocess (runs in CI; tens of seconds)"
    )
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
