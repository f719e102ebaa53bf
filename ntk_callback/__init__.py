"""ntk-callback: the empirical Neural Tangent Kernel of a PyTorch model, its analysis,
and a PyTorch Lightning callback that reports it while the model trains.

The engine (:func:`empirical_ntk`, :func:`layerwise_ntk`, :func:`ntk_spectrum`) and the analysis
(:mod:`ntk_callback.analysis`, :func:`analyze_ntk`, :class:`NTKReport`) and
:class:`NTKMonitor` (the reports of a hand-written training loop) are plain PyTorch and
never import Lightning; :class:`NTKReportCallback` is imported lazily so
that ``import ntk_callback`` works without Lightning installed.
"""
from __future__ import annotations

from typing import Any

from . import analysis, dynamics, theory
from .engine import (
    KernelMode,
    NTKError,
    empirical_ntk,
    finite_difference_ntk,
    layerwise_ntk,
    ntk_spectrum,
    ntk_spectrum_and_norms,
    ntk_trace_estimate,
    register_mode,
)
from .monitor import NTKMonitor
from .report import NTKReport, analyze_ntk

__all__ = [
    "analysis",
    "dynamics",
    "theory",
    "KernelMode",
    "NTKError",
    "NTKMonitor",
    "NTKReport",
    "NTKReportCallback",
    "analyze_ntk",
    "empirical_ntk",
    "finite_difference_ntk",
    "layerwise_ntk",
    "ntk_spectrum",
    "ntk_spectrum_and_norms",
    "ntk_trace_estimate",
    "register_mode",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "NTKReportCallback":
        from .callback import NTKReportCallback

        return NTKReportCallback
    raise AttributeError(f"module 'ntk_callback' has no attribute {name!r}")
