"""Probe batches: tensors, tuples/lists or dicts of tensors with a shared leading dim.

The engine needs three things of a batch: its size N, a slice of it, and how to call the
model on it. The call convention follows ``model(inputs)``; a tuple/list batch is unpacked
as ``model(*inputs)`` and a dict batch as ``model(**inputs)`` only when ``forward``'s
signature says so (several required positional parameters / exactly the dict's keys).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .errors import NTKError

Batch = Any


def leaves(batch: Batch) -> list[Any]:
    flat: list[Any] = tree_flatten(batch)[0]
    return flat


def batch_size(batch: Batch, name: str = "inputs") -> int:
    """N of a batch; every leaf must be a tensor with the same leading dimension."""
    flat = leaves(batch)
    if not flat:
        raise NTKError(f"`{name}` holds no tensor: pass a tensor (or a tuple/dict of tensors) "
                       "whose first dimension indexes the probes.")
    sizes = set()
    for leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            raise NTKError(f"`{name}` contains a {type(leaf).__name__}; every leaf of the probe "
                           "batch must be a torch.Tensor batched along dim 0 (convert it with "
                           "torch.as_tensor, or close over constants inside the model).")
        if leaf.dim() == 0:
            raise NTKError(f"`{name}` contains a 0-d tensor; every leaf must have the probe "
                           "dimension first, shape (N, ...).")
        sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        raise NTKError(f"the tensors in `{name}` disagree on the number of probes (leading "
                       f"dims {sorted(sizes)}); give every tensor the same first dimension N.")
    n = sizes.pop()
    if n == 0:
        raise NTKError(f"`{name}` is an empty probe batch (N = 0); pass at least one probe.")
    return n


def take(batch: Batch, index: slice | torch.Tensor) -> Batch:
    return tree_map(lambda t: t[index], batch)


def prepare(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    """Move to the model's device, cast floating leaves to ``dtype``, and make ordinary
    (non-inference) tensors so that autograd can run even if the caller built them under
    ``torch.inference_mode``."""

    def fix(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.clone() if t.is_inference() else t

    return tree_map(fix, batch)


def _required_positional(fn: Callable[..., Any]) -> list[str] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None  # forward(*args): unpacking is the natural reading
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            names.append(p.name)
    return names


Split = Callable[[Batch], tuple[tuple[Any, ...], dict[str, Any]]]


def call_convention(model: torch.nn.Module, batch: Batch) -> Split:
    """Decide once how a batch maps onto ``model.forward``'s arguments.

    Returns ``split(batch) -> (args, kwargs)``.
    """
    forward = model.forward
    if isinstance(batch, (tuple, list)) and not isinstance(batch, torch.Tensor):
        required = _required_positional(forward)
        if required is None or len(required) > 1:
            return lambda b: (tuple(b), {})
    if isinstance(batch, dict):
        required = _required_positional(forward)
        try:
            params: Mapping[str, inspect.Parameter] = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            params = {}
        if required is not None and len(required) != 1 and set(required) <= set(batch) \
                and set(batch) <= set(params):
            return lambda b: ((), dict(b))
    return lambda b: ((b,), {})


def as_tensor_targets(targets: Any, device: torch.device | str) -> torch.Tensor | None:
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor):
        try:
            targets = torch.as_tensor(targets)
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            raise NTKError(f"`targets` could not be converted to a tensor ({exc}); pass a "
                           "tensor of shape (N,) with int64 class labels.") from exc
    moved: torch.Tensor = targets.to(device)
    return moved
