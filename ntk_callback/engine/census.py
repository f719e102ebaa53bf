"""What one small forward pass reveals about a model: every module call and every use
of every parameter.

The structured rules may take a parameter only when the rule describes *every* way it
enters the output. :func:`take_census` runs the model once (under ``no_grad``, on the
trial batch) with a ``TorchFunctionMode`` that records, for each torch function applied
to a parameter, the module whose call was innermost at that moment. A weight read
directly by another module (``nn.MultiheadAttention`` reading ``out_proj.weight``), used
through ``F.linear`` elsewhere, tied between two layers, or touched by a user hook is
then seen to be used outside its own module's call, and the planner leaves it to the
exact path.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# Metadata reads (shape, dtype, device, ...) move no value of the parameter into the
# output: they are not uses.
_METADATA = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.element_size,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.data_ptr,
    torch.Tensor.__len__, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.get_device, torch.Tensor.nelement, torch.Tensor.ndimension,
    torch.Tensor.storage_offset,
}


@dataclass
class ModuleCall:
    """One call of a module: inputs as passed to ``forward`` (after pre-hooks) and the
    output, on the trial batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


@dataclass
class Census:
    calls: dict[str, list[ModuleCall]] = field(default_factory=dict)  # module -> calls
    uses: dict[str, set[str | None]] = field(default_factory=dict)     # param -> contexts
    batch: int = 0                                                      # trial probes
    # param -> the form of each use (:func:`broadcast_form`: "expand", "add", or "other")
    forms: dict[str, list[str]] = field(default_factory=dict)
    complete: bool = True  # False when the recording could not run (then nothing is trusted)
    # the same census on one probe fewer: a size that equals the trial batch only by
    # coincidence (a (S,) position-id input with S probes) does not follow it there
    alt: Census | None = None
    # floating dtypes of every op's result: a float64 measurement of a model that upcasts
    # or downcasts inside (T5 / Llama norms in float32) is only float32-accurate
    dtypes: set[torch.dtype] = field(default_factory=set)


BROADCAST_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


def broadcast_form(func: Callable[..., Any], param: torch.Tensor, args: tuple[Any, ...],
                   kwargs: dict[str, Any], result: Any, batch: int) -> str:
    """How one op uses a parameter: ``"expand"`` (``p.expand(n, ...)``) or ``"add"`` (``x +
    p`` with p broadcast over the probe dimension of x) when the op's result is batched
    along dim 0 with ``batch`` probes and holds p once a probe (its per-probe gradient is
    the result's cotangent of that probe, summed over the broadcast axes); else
    ``"other"``."""
    if not (isinstance(result, torch.Tensor) and result.dim() >= 1 and result.shape[0] == batch
            and not kwargs and len(args) >= 1):
        return "other"
    shared = param.dim() < result.dim() or param.shape[0] == 1
    if func is torch.Tensor.expand and args[0] is param and shared:
        return "expand"
    if func in BROADCAST_ADDS and len(args) == 2 and shared and param.dim() <= result.dim():
        other = args[1] if args[0] is param else args[0]
        if (isinstance(other, torch.Tensor) and other is not param
                and other.shape == result.shape):
            return "add"
    return "other"


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, slice,
            type(Ellipsis))


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors among an op's arguments, as ``tree_flatten`` finds them, with a fast
    path for the common cases (tensors, scalars, flat lists such as ``torch.cat``'s):
    the census runs this on every op, where pytree cost more than the op."""
    out: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, _SCALARS):
            continue
        elif isinstance(value, (list, tuple)) and not any(
                isinstance(v, (list, tuple, dict)) for v in value):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
        else:
            out.extend(v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor))
    return out


class _UseRecorder(TorchFunctionMode):
    def __init__(self, ids: dict[int, str], census: Census, stack: list[str]) -> None:
        super().__init__()
        self.ids, self.census, self.stack = ids, census, stack

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            self.census.dtypes.add(result.dtype)
        if func not in _METADATA and getattr(func, "__name__", "") != "__get__":
            for leaf in _tensors(args, kwargs):
                name = self.ids.get(id(leaf))
                if name is not None:
                    self.census.uses.setdefault(name, set()).add(
                        self.stack[-1] if self.stack else None)
                    self.census.forms.setdefault(name, []).append(broadcast_form(
                        func, leaf, args, kwargs, result, self.census.batch))
        return result


def take_census(model: nn.Module, params: Mapping[str, torch.Tensor],
                run: Callable[[], Any], batch: int) -> tuple[Any, Census]:
    """Run ``run()`` (one forward of ``model``) while recording module calls and the uses
    of ``params`` (name -> the tensor objects the forward sees). Returns the forward's
    result and the census."""
    census = Census(batch=batch)
    stack: list[str] = []
    ids = {id(t): name for name, t in params.items()}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    owners = {name: m for name, m in model.named_modules() if m._parameters}

    def enter(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            stack.append(name)  # after the module's other pre-hooks: their uses are outside
        return fn

    def leave(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               out: Any) -> None:
            if stack and stack[-1] == name:
                stack.pop()
            if out is not None and name in owners:  # (None: the call raised)
                census.calls.setdefault(name, []).append(ModuleCall(args, kwargs, out))
        return fn

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            # prepend: popped before the module's other forward hooks run
            handles.append(module.register_forward_hook(leave(name), with_kwargs=True,
                                                        prepend=True, always_call=True))
        with _UseRecorder(ids, census, stack):
            out = run()
    finally:
        for h in handles:
            h.remove()
    # modules that own parameters and were never called have no entry
    for name in owners:
        census.calls.setdefault(name, [])
    return out, census
