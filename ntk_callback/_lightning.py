"""Compatibility shim over the two Lightning distributions.

Lightning ships the same trainer twice: as ``pytorch_lightning`` (the standalone
package) and as ``lightning.pytorch`` (the unified package). Their classes are distinct
objects, so ``isinstance`` against one flavour's ``TensorBoardLogger`` misses the other
flavour's. This module:

* picks the flavour whose :class:`Callback` the callback subclasses (``pytorch_lightning``
  when both are installed; Lightning 2.x Trainers of either flavour accept it and
  checkpoint its state);
* exposes that flavour's ``rank_zero_warn`` / ``rank_zero_info`` and an exception that is
  both its ``MisconfigurationException`` and a :class:`ValueError`;
* recognises loggers and strategies of *both* flavours by walking the class MRO and
  comparing module prefixes and class names, so that a flavour that is not installed is
  never imported.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


def _import_flavour() -> tuple[str, ModuleType]:
    errors = []
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            return name, importlib.import_module(name)
        except ImportError as err:  # pragma: no cover - depends on the environment
            errors.append(f"{name}: {err}")
    raise ImportError(  # pragma: no cover - depends on the environment
        "NTKReportCallback needs PyTorch Lightning: install `pytorch-lightning` or `lightning` "
        "(pip install pytorch-lightning). Import errors: " + "; ".join(errors)
    )


FLAVOUR, pl = _import_flavour()

_callbacks = importlib.import_module(f"{FLAVOUR}.callbacks")
_rank_zero = importlib.import_module(f"{FLAVOUR}.utilities.rank_zero")
_exceptions = importlib.import_module(f"{FLAVOUR}.utilities.exceptions")

Callback = _callbacks.Callback
rank_zero_warn = _rank_zero.rank_zero_warn
rank_zero_info = _rank_zero.rank_zero_info
if TYPE_CHECKING:  # the same class in both flavours; one is enough to check against
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
else:
    MisconfigurationException = _exceptions.MisconfigurationException


class NTKCallbackConfigError(MisconfigurationException, ValueError):
    """An invalid :class:`~ntk_callback.NTKReportCallback` setting.

    Both Lightning's ``MisconfigurationException`` (of the flavour the callback is built
    on) and a :class:`ValueError`, so either ``except`` clause catches it.
    """


# Module prefixes under which each flavour defines its loggers and strategies.
_LOGGER_MODULES = (
    "pytorch_lightning.loggers",
    "lightning.pytorch.loggers",
    "lightning_fabric.loggers",
    "lightning.fabric.loggers",
)
_STRATEGY_MODULES = (
    "pytorch_lightning.strategies",
    "lightning.pytorch.strategies",
    "lightning_fabric.strategies",
    "lightning.fabric.strategies",
)

_LOGGER_KINDS = {
    "TensorBoardLogger": "tensorboard",
    "WandbLogger": "wandb",
    "MLFlowLogger": "mlflow",
    "CSVLogger": "csv",
    "DummyLogger": "dummy",
}

# Strategies that shard parameters across ranks: the unwrapped module on one rank does
# not hold the full theta, so an NTK computed there would be silently wrong.
_SHARDED_STRATEGIES = frozenset(
    {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"}
)


def _in_modules(cls: type, prefixes: tuple[str, ...]) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def logger_kind(logger: Any) -> str:
    """Classify a logger of either Lightning flavour (or a subclass of one).

    Returns one of ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"csv"``, ``"dummy"``
    (the no-op logger ``fast_dev_run`` installs) or ``"other"``. Works by class name and
    defining module along the MRO, so it needs neither flavour's logger modules imported.
    """
    for cls in type(logger).__mro__:
        kind = _LOGGER_KINDS.get(cls.__name__)
        if kind is not None and _in_modules(cls, _LOGGER_MODULES):
            return kind
    return "other"


def sharded_strategy_name(strategy: Any) -> str | None:
    """Name of the sharded-parameter strategy class ``strategy`` derives from, else ``None``."""
    for cls in type(strategy).__mro__:
        if cls.__name__ in _SHARDED_STRATEGIES and _in_modules(cls, _STRATEGY_MODULES):
            return cls.__name__
    return None


__all__ = [
    "FLAVOUR",
    "Callback",
    "MisconfigurationException",
    "NTKCallbackConfigError",
    "logger_kind",
    "pl",
    "rank_zero_info",
    "rank_zero_warn",
    "sharded_strategy_name",
]
