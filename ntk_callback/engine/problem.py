"""Everything the kernel computations share: the model as a pure function of its
parameters, the probe batches, and the per-probe output cotangents that define the mode.

Every mode is a Gram matrix of per-probe vector-Jacobian products ``g(i, v) = d <v,
f(x_i)> / d theta`` for the mode's cotangent rows ``v``; what each mode's rows are and
which pairs of them meet is owned by :mod:`.modes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from . import batch as B
from .census import Census, take_census
from .errors import NTKError
from .modes import KernelMode, ModeLike

DEFAULT_MEMORY_BUDGET = 1 << 30  # the CPU's default budget; a call's default: device.py


def slot_names(model: torch.nn.Module) -> dict[str, str]:
    """Every place a parameter or buffer is stored (one path per storing module, however
    many names the module has) -> the tensor's name in ``named_parameters()`` /
    ``named_buffers()``.

    ``functional_call`` is given one entry per slot with ``tie_weights=False``: a tensor
    tied into several modules is swapped in each of them, and a module registered under
    two names (``self.dec = self.enc``) is swapped once. torch's own tie handling swaps
    such a module under both names and restores it in the wrong order, leaving a plain
    tensor shadowing the parameter (the model would then train a frozen copy)."""
    canonical = {id(t): n for n, t in model.named_parameters()}
    canonical.update({id(t): n for n, t in model.named_buffers()})
    out: dict[str, str] = {}
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for attr, t in store.items():
                if t is not None and id(t) in canonical:
                    out[f"{prefix}.{attr}" if prefix else attr] = canonical[id(t)]
    return out


@dataclass
class Problem:
    model: torch.nn.Module
    split: B.Split
    output_fn: Callable[[Any], torch.Tensor] | None
    mode: KernelMode
    dtype: torch.dtype
    device: torch.device
    params: dict[str, torch.Tensor]          # trainable, detached, cast: theta
    constants: dict[str, torch.Tensor]       # frozen params and buffers, cast
    x1: Any
    n1: int
    cot1: torch.Tensor                       # (N1, k, O)
    num_outputs: int
    x2: Any = None
    n2: int | None = None
    cot2: torch.Tensor | None = None         # (N2, k, O)
    param_owner: dict[str, str] = field(default_factory=dict)
    # what the trial forward saw: module calls and parameter uses (structured planning)
    census: Census | None = None
    # entries of all module outputs for one probe (measured by the trial forward): sizes
    # the probe chunks of the structured path
    activation_numel: int = 0
    single_probe_checked: bool = False
    # the model's output on the first probes of `inputs`, a batch of their own (trial
    # forward): a capture pass over more probes must give the same rows
    trial_out1: torch.Tensor | None = None
    # storage slot -> tensor name for functional_call (:func:`slot_names`), on first use
    slots: dict[str, str] | None = None

    @property
    def cross(self) -> bool:
        return self.x2 is not None

    @property
    def n_cols(self) -> int:
        """Probes indexing the kernel's columns: N2 for a cross kernel, else N1."""
        return self.n2 if self.n2 is not None else self.n1

    def probe_sets(self) -> list[tuple[Any, str, int, torch.Tensor]]:
        """``(batch, argument name, N, cotangents)`` of ``inputs`` and, for a cross
        kernel, of ``inputs2``."""
        sets = [(self.x1, "inputs", self.n1, self.cot1)]
        if self.x2 is not None:
            if self.n2 is None or self.cot2 is None:
                raise RuntimeError("a second probe set without its size or cotangents")
            sets.append((self.x2, "inputs2", self.n2, self.cot2))
        return sets

    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def tensors(self, live: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """All tensors for ``functional_call``: theta (``live`` overrides some) + constants."""
        out = dict(self.params)
        out.update(self.constants)
        if live:
            out.update(live)
        return out

    def forward(self, tensors: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        """Batched forward, outputs as (n, O)."""
        args, kwargs = self.split(x)
        if self.slots is None:  # the module tree does not change during a measurement
            self.slots = slot_names(self.model)
        by_slot = {slot: tensors[name] for slot, name in self.slots.items() if name in tensors}
        out = functional_call(self.model, by_slot, args, kwargs, strict=False,
                              tie_weights=False)
        return self.as_matrix(out)

    def call(self, x: Any) -> Any:
        """The model itself on a batch (the raw output). The model runs in the compute
        dtype for the whole measurement (:func:`.state.cast_floating`)."""
        args, kwargs = self.split(x)
        return self.model(*args, **kwargs)

    def trial_forward(self, x: Any, name: str, measure: bool = False
                      ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Forward without gradient; a failing call becomes an NTKError naming the fix.
        ``measure`` records the entries of every module output, per probe of ``x``, in
        ``activation_numel``."""
        handles: list[torch.utils.hooks.RemovableHandle] = []
        total = [0]
        if measure:
            def count(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    total[0] += out.numel()

            handles = [m.register_forward_hook(count) for m in self.model.modules()]
        with torch.no_grad():
            try:
                raw = None
                if measure:
                    raw = self._census_call(x)
                if raw is None:
                    raw = self.call(x)
                out = self.as_matrix(raw)
            except NTKError:
                raise
            except Exception as exc:
                raise NTKError(f"calling the model on `{name}` failed: {type(exc).__name__}: "
                               f"{exc}. `{name}` must be what `model({name})` accepts for a "
                               "batch of probes (tuple batches are unpacked when forward takes "
                               "several arguments; use `output_fn=` for non-tensor "
                               "outputs).") from exc
            finally:
                for h in handles:
                    h.remove()
        if measure:
            self.activation_numel = -(-total[0] // B.batch_size(x))
        return out, tuple(raw.shape) if isinstance(raw, torch.Tensor) else tuple(out.shape)

    def _census_call(self, x: Any) -> Any:
        """The trial forward with a census of module calls and parameter uses; None (and
        an incomplete census, which no structured rule trusts) if recording fails."""
        live = {n: p for n, p in self.model.named_parameters() if n in self.params}
        m = B.batch_size(x)
        try:
            raw, self.census = take_census(self.model, live, lambda: self.call(x), m)
            if m > 1:
                fewer = B.take(x, slice(0, m - 1))
                self.census.alt = take_census(self.model, live, lambda: self.call(fewer),
                                              m - 1)[1]
            return raw
        except Exception:  # noqa: BLE001 - the plain call below reports model errors
            self.census = Census(complete=False)
            return None

    def trial_rows(self, x: Any, name: str, n: int, m: int, measure: bool = False
                   ) -> torch.Tensor:
        """The model's (m, O) output on the first m of the n probes of ``x``; refuses
        outputs without one row per probe and non-finite ones."""
        out, raw_shape = self.trial_forward(B.take(x, slice(0, m)), name, measure=measure)
        if out.shape[0] != m:
            raise NTKError(f"the model's output on {m} of the {n} probes in `{name}` has "
                           f"shape {tuple(raw_shape)}; the output must have one row per "
                           f"probe, shape ({n},) or ({n}, O) for all {n} probes. Do not "
                           "reduce over the batch in forward (and squeeze with "
                           "`.squeeze(-1)`, not `.squeeze()`), or pass `output_fn=`.")
        self.check_outputs(out, name)
        return out

    def check_single_probe(self) -> None:
        """The generic path calls the model on batches of one probe: check that those
        still give one output row (``.squeeze()`` in ``forward`` would not). Once."""
        if self.single_probe_checked:
            return
        for x, name, n, _ in self.probe_sets():
            if n > 1:
                self.trial_rows(x, name, n, 1)
        self.single_probe_checked = True

    @staticmethod
    def check_outputs(out: torch.Tensor, name: str) -> None:
        """Non-finite outputs make the NTK undefined: refuse with the likely causes."""
        finite = torch.isfinite(out.detach())
        if not bool(finite.all()):
            bad = int((~finite).reshape(out.shape[0], -1).any(dim=1).sum())
            raise NTKError(f"the model's outputs on `{name}` are non-finite (NaN/inf) for {bad} "
                           "probe(s); the NTK is undefined there. Check the weights for "
                           "divergence (lower the learning rate) or the probes for NaNs.")

    def as_matrix(self, out: Any) -> torch.Tensor:
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise NTKError(f"the model returned a {type(out).__name__}, not a tensor; pass "
                           "`output_fn=` mapping the model's output to an (N, O) tensor "
                           "(e.g. `output_fn=lambda out: out.logits`).")
        if out.dim() == 0:
            raise NTKError("the model returned a 0-d tensor; it must return one output row "
                           "per probe, shape (N,) or (N, O).")
        return out.reshape(out.shape[0], -1)


def _owners(model: torch.nn.Module) -> dict[str, str]:
    """Per-layer key of every parameter (the keys of ``layerwise_ntk``).

    A parameter belongs to the module that owns it directly. Leaf modules (Linear, Conv,
    norm layers, ...) are keyed by their ``named_modules()`` name; a parameter owned by a
    container module (a free ``nn.Parameter`` used in some ``forward``) or by the root is
    keyed by its own ``named_parameters()`` name.
    """
    owners: dict[str, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        is_leaf = next(iter(module.children()), None) is None
        # (the module's own parameter dict: named_parameters(recurse=False) costs a
        # generator walk a module, a visible part of a small model's call)
        for pname, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            owners.setdefault(full, mname if (is_leaf and mname) else full)
    return owners


def resolve_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The compute dtype: ``dtype``, else the first trainable parameter's."""
    if not isinstance(model, torch.nn.Module):
        raise NTKError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if dtype is None:
        first = next((p for p in model.parameters() if p.requires_grad), None)
        if first is None:
            return torch.get_default_dtype()
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise NTKError(f"dtype={dtype} is not a floating dtype; use torch.float32 or "
                       "torch.float64.")
    return dtype


def build_problem(model: torch.nn.Module, inputs: Any, targets: Any, *, mode: ModeLike,
                  dtype: torch.dtype | None, inputs2: Any = None, targets2: Any = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None) -> Problem:
    kind = KernelMode.parse(mode)
    if not isinstance(model, torch.nn.Module):
        raise NTKError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    if not trainable:
        raise NTKError("the model has no trainable parameter (every parameter has "
                       "requires_grad=False), so its NTK is zero; unfreeze the parameters "
                       "you want the kernel of with `p.requires_grad_(True)`.")
    first = next(iter(trainable.values()))
    device = first.device
    dtype = resolve_dtype(model, dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype) if t.is_floating_point() else t

    params = {n: cast(p) for n, p in trainable.items()}
    constants = {n: cast(p) for n, p in named.items() if not p.requires_grad}
    constants.update({n: cast(b) for n, b in model.named_buffers()})

    n1 = B.batch_size(inputs, "inputs")
    x1 = B.prepare(inputs, device, dtype)
    x2: Any = None
    n2: int | None = None
    if inputs2 is not None:
        n2 = B.batch_size(inputs2, "inputs2")
        x2 = B.prepare(inputs2, device, dtype)
    split = B.call_convention(model, x1)

    problem = Problem(model=model, split=split, output_fn=output_fn, mode=kind, dtype=dtype,
                      device=device, params=params, constants=constants, x1=x1, n1=n1,
                      cot1=torch.empty(0), num_outputs=0, x2=x2, n2=n2,
                      param_owner=_owners(model))
    # A small forward (up to 3 probes) gives the output size and catches models whose
    # output is not one row per probe before any expensive work; the single-probe batches
    # of the generic path are checked when that path runs
    # (:meth:`Problem.check_single_probe`). The full batches are checked for non-finite
    # outputs where their outputs are computed anyway (:meth:`Problem.check_outputs`),
    # which saves a whole forward pass.
    problem.trial_out1 = problem.trial_rows(x1, "inputs", n1, min(n1, 3), measure=True)
    num_outputs = problem.trial_out1.shape[1]
    if x2 is not None and n2 is not None:
        other = problem.trial_rows(x2, "inputs2", n2, min(n2, 3)).shape[1]
        if other != num_outputs:
            raise NTKError("`inputs` and `inputs2` give outputs of different sizes "
                           f"({num_outputs} vs {other}).")
    problem.num_outputs = num_outputs
    t1 = B.as_tensor_targets(targets, device)
    problem.cot1 = kind.cotangents(t1, n1, num_outputs, "targets", dtype, device)
    if x2 is not None and n2 is not None:
        t2 = B.as_tensor_targets(targets2, device)
        problem.cot2 = kind.cotangents(t2, n2, num_outputs, "targets2", dtype, device)
    return problem


def output_shape(problem: Problem) -> tuple[int, ...]:
    """Shape of the kernel: (N1, N2), or (N1, N2, k, k) for a mode of all row pairs."""
    return problem.mode.kernel_shape(problem.n1, problem.n_cols, problem.cot1.shape[1])


def unsqueeze_batch(x: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0), x)


def blocks(n: int, size: int) -> list[slice]:
    size = max(1, int(size))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b > 0 else a


def numel(tensors: dict[str, torch.Tensor], names: list[str]) -> int:
    return int(sum(tensors[n].numel() for n in names))


__all__ = ["DEFAULT_MEMORY_BUDGET", "Problem", "build_problem", "output_shape",
           "unsqueeze_batch", "blocks", "ceil_div", "numel", "math"]
