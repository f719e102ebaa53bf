"""The capture pass: one batched forward that records every planned module call, and the
backward passes that hand each call's output cotangent to a consumer while hot."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..census import BROADCAST_ADDS, broadcast_form
from ..problem import Problem
from .rules import Call, Rule

Calls = dict[str, list[Call]]  # module name -> its calls, in order


class Fallback(Exception):
    """A structural assumption failed at run time: send ``module`` (all planned modules
    when empty) to the generic path instead, for ``reason``."""

    def __init__(self, module: str = "", reason: str = "") -> None:
        super().__init__(module, reason)
        self.module = module
        self.reason = reason or "its calls did not match the trial forward's"


class InPlace(Exception):
    """A captured activation was modified in place after the hook saw it."""


def _detach(value: Any, copy: bool) -> Any:
    def fix(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        return t.clone() if copy else t
    return tree_map(fix, value)


class _BroadcastUses(TorchFunctionMode):
    """Records the result of each broadcast use (:func:`..census.broadcast_form`) of a
    watched parameter as a call of its pseudo-module (see ``Plan.free``)."""

    def __init__(self, watch: dict[int, str], calls: Calls, n: int, copy: bool,
                 versions: list[tuple[torch.Tensor, int]]) -> None:
        super().__init__()
        self.watch, self.calls, self.n, self.copy, self.versions = watch, calls, n, copy, versions

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.expand or func in BROADCAST_ADDS:
            for a in args[:2]:
                name = self.watch.get(id(a)) if isinstance(a, torch.Tensor) else None
                if name is not None and broadcast_form(func, a, args, kwargs, out,
                                                       self.n) != "other":
                    if not torch.is_grad_enabled():
                        raise Fallback(name, "used with autograd disabled")
                    self.calls[name].append(Call((), {}, out))
                    if self.copy:
                        return out.clone()
                    self.versions.append((out, out._version))
        return out


def forward(problem: Problem, modules: dict[str, nn.Module], rules: dict[str, Rule],
            copy: bool, x: Any, n: int, label: str, broadcast: bool = False,
            watch: dict[int, str] | None = None) -> tuple[torch.Tensor, Calls]:
    """One batched forward with hooks: the model's (n, O) output and each planned
    module's calls. The captured inputs are used as they are (``copy=False``): a later
    in-place op on one of them (``ReLU(inplace=True)``, ``out += identity``) is detected
    by its version counter and raises :class:`InPlace`; with ``copy=True`` the inputs are
    cloned and the output replaced by a clone, which absorbs later in-place ops. With
    ``broadcast``, a rule's broadcast calls (batch size 1 for n probes) have their input
    and output expanded to n copies, the output replaced by the expanded one. ``watch``
    (parameter id -> pseudo-module name): parameters taken by their broadcast use, whose
    op results are recorded as that pseudo-module's calls."""
    calls: Calls = {m: [] for m in modules}
    expanded: list[str] = []  # modules whose broadcast calls were given a copy a probe
    versions: list[tuple[torch.Tensor, int]] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def hook(mname: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]:
        rule = rules[mname]

        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               out: Any) -> Any:
            call = Call(args, kwargs, out)
            if not rule.accepts(module, call, n):
                if not (broadcast and rule.broadcasts(module, call, n)):
                    raise Fallback(mname, "a call's inputs/outputs are not batched along "
                                          "the probe dimension")
                # a copy a probe of the shared input and output (same values): each
                # probe's cotangent then reaches its own copy
                args, out = rule.expand(args, out, n)
                replaced = True
                expanded.append(mname)
            else:
                replaced = False
            if not torch.is_grad_enabled():
                # e.g. reentrant activation checkpointing: the graph is built later
                raise Fallback(mname, "called with autograd disabled")
            tracked = rule.output(out)
            calls[mname].append(Call(_detach(args, copy), _detach(kwargs, copy), tracked,
                                     tuple(t for t in rule.unfollowed(out) if t.requires_grad)))
            if copy:
                # the clone absorbs later in-place ops; `tracked` stays the graph node whose
                # cotangent we need
                if out is tracked:
                    return tracked.clone()
                if isinstance(out, tuple) and out and out[0] is tracked:
                    return (tracked.clone(),) + out[1:]
                raise Fallback(mname, "in-place ops on an output the rule cannot copy")
            for t in [*args, *kwargs.values(), tracked]:
                if isinstance(t, torch.Tensor):
                    versions.append((t, t._version))
            return out if replaced else None
        return fn

    watch = watch or {}
    pseudo = set(watch.values())
    for mname, module in modules.items():
        if mname not in pseudo:
            handles.append(module.register_forward_hook(hook(mname), with_kwargs=True))
    try:
        # the module's own parameters carry the graph; autograd.grad below asks only for
        # the cotangents of the captured outputs (and, for the self-check, of the
        # parameters), so no .grad is ever written
        if watch:
            with _BroadcastUses(watch, calls, n, copy, versions):
                out = problem.as_matrix(problem.call(x))
        else:
            out = problem.as_matrix(problem.call(x))
    except RuntimeError as exc:
        if not expanded:
            raise
        # the model does not take the copies a probe where it took the shared output
        raise Fallback(expanded[0], "the forward failed on the per-probe copies of a "
                                    f"broadcast call: {str(exc)[:120]}") from exc
    finally:
        for h in handles:
            h.remove()
    if any(t._version != v for t, v in versions):
        raise InPlace
    if out.shape[0] != n:
        raise Fallback("", "the output has not one row per probe")
    problem.check_outputs(out, label)
    return out, calls


def bottoms(targets: list[torch.Tensor]) -> list[int]:
    """Indices of the captured outputs whose gradient node leads to no other captured
    output's node. Asking autograd for the cotangents of these alone runs every node of
    the others too (they lie on the paths), so their hooks fire inside the backward."""
    owner = {z.grad_fn for z in targets if z.grad_fn is not None}
    reach: dict[Any, bool] = {}
    for start in owner:
        stack = [(start, False)]
        while stack:  # iterative post-order walk: deep graphs must not hit the recursion limit
            node, done = stack.pop()
            if node in reach:
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if done:
                reach[node] = any(c in owner or reach.get(c, False) for c in children)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reach)
    return [i for i, z in enumerate(targets) if z.grad_fn is not None and not reach[z.grad_fn]]


def backward_rows(out: torch.Tensor, targets: list[torch.Tensor], cot: torch.Tensor,
                  consume: Callable[[int, int, torch.Tensor], None],
                  finish: Callable[[int], None], retain_last: bool = False,
                  params: list[torch.Tensor] | None = None,
                  on_params: Callable[[tuple[torch.Tensor | None, ...]], None] | None = None
                  ) -> None:
    """One backward a cotangent row r: ``consume(r, i, D)`` receives the cotangent D at
    captured output i from a tensor hook as soon as autograd has computed it, so it is
    used while hot and freed as the backward moves on (outputs the row does not reach get
    zeros); ``finish(r)`` closes the row. (``is_grads_batched`` would vmap the backward,
    but convolution backward has no batching rule: 1.2-1.5x slower than this loop.)
    With ``params`` (one cotangent row only), the same backward also gives the gradients
    of those parameters, handed to ``on_params`` (the fused self-check)."""
    k = cot.shape[1]
    grad_out = cot.transpose(0, 1)  # (k, n, O)
    inputs = [targets[i] for i in bottoms(targets)]
    state: dict[str, Any] = {"row": 0, "seen": set()}

    def hook(i: int) -> Callable[[torch.Tensor], None]:
        def fn(grad: torch.Tensor) -> None:
            state["seen"].add(i)
            consume(state["row"], i, grad)
        return fn

    # (torch declares Tensor.register_hook without annotations)
    handles = [z.register_hook(hook(i))  # type: ignore[no-untyped-call]
               for i, z in enumerate(targets) if z.requires_grad]
    try:
        for r in range(k):
            state["row"], state["seen"] = r, set()
            extra = list(params) if params else []
            if inputs or extra:
                grads = torch.autograd.grad(out, inputs + extra, grad_out[r], allow_unused=True,
                                            retain_graph=retain_last or r < k - 1)
                if extra and on_params is not None:
                    on_params(grads[len(inputs):])
            for i, z in enumerate(targets):
                if i not in state["seen"]:
                    consume(r, i, torch.zeros_like(z))
            finish(r)
    finally:
        for h in handles:
            h.remove()
