r"""The self-check's data, gathered by the driver during the capture: the check vectors,
both sides that :func:`.selfcheck.verify` compares, and the premises the fused check
relies on. (:mod:`.selfcheck` holds the comparison and the verdict.)

For a probe set of n probes with k cotangent rows, :func:`check_vectors` draws each
check vector c: probe weights ``w`` (n,) and row weights ``u`` (k,) (``u = 1`` when
k = 1). A :class:`CheckData` holds them with the two sides, per check vector:

* autograd's side ``ref[c][param]`` = ``d/dparam sum_i w_i <sum_r u_r cot_ir, f(x_i)>``:
  :func:`_reference` (one extra backward a check vector and capture chunk), or with the
  fused check (k = 1, the weights on the capture's own cotangents) :func:`_add_ref` on
  that backward's parameter gradients;
* the rules' side ``G[c][module]``, the pieces (one a term) of
  ``sum_i sum_r w_i u_r rows_ir``: :func:`_rule_side` from the rows buffers
  (n, k, P_key) and the Gram-route terms; the block-by-block terms of :mod:`.rowblocks`
  bring theirs from :func:`.rowblocks.contract`, with the weights of
  :func:`_check_weights`, summed over cotangent rows by :func:`_accumulate`;

and, for a self-kernel, :func:`_quads`: each layer key's quadratic form ``w^T K w`` from
its rows and terms, without the kernel, which the verdict compares with the kernel's.

The fused check cannot see a probe's cotangent reaching another probe's rows (the
weights travel with the cotangents), so the driver establishes that it cannot
happen: :func:`_independent` (the capture pass's outputs are the trial forward's, computed
on each probe alone: no batch statistics) and :func:`_separate_copies` (each probe's copy
of a broadcast call's input receives that probe's cotangent only).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import batch as B
from ..modes import KernelMode
from ..problem import Problem
from .capture import Calls, Fallback
from .planner import Plan
from .rowblocks import CheckWeights, Contracted
from .terms import Term, param_of

#: the driver's forward of a probe batch (problem, plan, x, n, label) -> (outputs, calls)
Forward = Callable[[Problem, Plan, Any, int, str], tuple[torch.Tensor, Calls]]


@dataclass
class CheckData:
    """What the self-check compares, for one probe set: probe weights ``w`` (n,) and
    row weights ``u`` (k,) per check vector c; the rule side ``G[c][module]`` = the
    pieces (one a term) of ``sum_i sum_r w_i u_r rows_ir``; the autograd side
    ``ref[c][param]`` = ``d/dparam sum_i w_i <sum_r u_r cot_ir, f(x_i)>``."""

    w: list[torch.Tensor]
    u: list[torch.Tensor]
    G: list[dict[str, list[torch.Tensor]]] = field(default_factory=list)
    ref: list[dict[str, torch.Tensor]] = field(default_factory=list)


def check_vectors(n: int, k: int, count: int, seed: int,
                  dtype: torch.dtype, device: torch.device
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gaussian probe weights (n,) and row weights (k,) for ``count`` check vectors, from
    a private generator (the global RNG is not touched). Modes of one row (target, sum)
    have u = 1. Gaussian rather than signs: a nonzero symmetric error E has
    ``w^T E w = 0`` with probability zero (with signs, e.g. diag(1, -1) always cancels)."""
    gen = torch.Generator().manual_seed(seed)
    ws, us = [], []
    for _ in range(count):
        ws.append(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device))
        u = torch.randn(k, generator=gen, dtype=torch.float64) if k > 1 else torch.ones(1)
        us.append(u.to(dtype=dtype, device=device))
    return ws, us


def _independent(problem: Problem, out: torch.Tensor) -> None:
    """The per-probe kernel assumes each probe's output ignores the other probes of its
    batch (eval BatchNorm, no batch statistics): the capture pass's first rows must be the
    trial forward's, computed on those probes alone. Otherwise no structured rule applies
    (the exact path computes one probe at a time)."""
    trial = problem.trial_out1
    if trial is None or out.shape[0] <= trial.shape[0]:
        return
    got = out[: trial.shape[0]].detach()
    rtol = 1e-9 if got.dtype == torch.float64 else 1e-4
    scale = float(trial.abs().max())
    if float((got - trial).abs().max()) > rtol * scale + 1e-30:
        raise Fallback("", "the model's outputs depend on the other probes of the batch")


def _separate_copies(problem: Problem, plan: Plan, forward: Forward, probes: int = 3
                     ) -> None:
    """The fused self-check's premise for broadcast calls: each probe's cotangent reaches
    only that probe's copy of the expanded (shared) input. The planned modules' calls are
    captured on the first ``probes`` probes; a backward of one probe's output (Gaussian
    output weights, private generator) must leave every other probe's copy at exactly
    zero, for the first and the last of them (a model that reads one copy for every
    probe, or averages the copies, fails one of the two). Raises :class:`.capture.Fallback`
    naming the module otherwise (its rows would mix probes; the check's weights, which
    travel with the cotangents, could not see it). ``forward``: the driver's forward of
    the capture pass (the plan's hooks and output copies)."""
    x, label, n, _ = next(iter(problem.probe_sets()))
    m = min(n, probes)
    if m < 2:
        return
    out, calls = forward(problem, plan, B.take(x, slice(0, m)), m, label)
    copies = [(mname, c.output) for mname in sorted(plan.broadcasting)
              for c in calls.get(mname, []) if c.output.requires_grad]
    if not copies:
        return
    gen = torch.Generator().manual_seed(12345)
    for i in (0, m - 1):
        g = torch.zeros_like(out)
        g[i] = torch.randn(out.shape[1], generator=gen, dtype=torch.float64).to(g)
        grads = torch.autograd.grad(out, [t for _, t in copies], g, allow_unused=True,
                                    retain_graph=i != m - 1)
        others = torch.arange(m, device=out.device) != i
        for (mname, _), d in zip(copies, grads):
            if d is not None and bool(d[others].ne(0).any()):
                raise Fallback(mname, "self-check: a probe's output depends on another "
                                      "probe's copy of a broadcast input")


def _add_ref(ref: dict[str, torch.Tensor], names: list[str],
             grads: tuple[torch.Tensor | None, ...]) -> None:
    for name, g in zip(names, grads):
        if g is not None:
            ref[name] = g.detach() if name not in ref else ref[name] + g.detach()


def _reference(out: torch.Tensor, cot: torch.Tensor, sl: slice, data: CheckData,
               params: list[torch.Tensor], names: list[str]) -> None:
    """Autograd's side of the self-check on one probe chunk: the gradient of
    ``sum_i w_i <sum_r u_r cot_ir, f(x_i)>`` with respect to each checked parameter
    (summed over chunks)."""
    for c, (w, u) in enumerate(zip(data.w, data.u)):
        weights = w[sl, None] * torch.einsum("r,iro->io", u, cot)
        grads = torch.autograd.grad(out, params, weights, retain_graph=True, allow_unused=True)
        _add_ref(data.ref[c], names, grads)


def _rule_side(data: CheckData, bufs: dict[str, torch.Tensor], gram: dict[str, Term],
               slots: dict[str, tuple[str, int, int]], module_of: dict[str, str],
               unit: bool = False) -> dict[str, torch.Tensor]:
    """The rules' side of the self-check: ``sum_i sum_r w_i u_r rows_ir`` per module, from
    the rows buffers and from the Gram-route terms (without per-probe rows). ``unit``:
    the rows already carry the probe weights (fused check), so they are summed with
    weight 1. Returns the first check vector's pieces by term name."""
    first: dict[str, torch.Tensor] = {}
    for c, (w, u) in enumerate(zip(data.w, data.u)):
        if unit:
            w = torch.ones_like(w)
        side = data.G[c]
        wu = w[:, None] * u[None, :]
        for name, (key, start, stop) in slots.items():
            g = torch.einsum("ir,irp->p", wu, bufs[key][:, :, start:stop])
            side.setdefault(module_of[param_of(name)], []).append(g)
            if c == 0:
                first[name] = g
        for name, term in gram.items():
            g = term.weighted(w, u)
            side.setdefault(module_of[param_of(name)], []).append(g)
            if c == 0:
                first[name] = g
    return first


def _quads(data: CheckData, bufs: dict[str, torch.Tensor], gram: dict[str, Term],
           slots: dict[str, tuple[str, int, int]], key_of: dict[str, str], mode: KernelMode,
           budget: int) -> list[dict[str, float]]:
    """Per check vector and layer key, the quadratic form of the key's kernel computed
    from its rows and terms instead of the kernel (:mod:`.selfcheck`)."""
    out = []
    for w, u in zip(data.w, data.u):
        quads: dict[str, float] = {}
        for key, start, stop in slots.values():
            h = torch.einsum("i,irp->rp", w, bufs[key][:, :, start:stop])
            quads[key] = quads.get(key, 0.0) + mode.rows_quad(h, u)
        for name, term in gram.items():
            key = key_of[param_of(name)]
            quads[key] = quads.get(key, 0.0) + mode.term_quad(term, w, u, budget)
        out.append(quads)
    return out


def _check_weights(data: CheckData, fused: bool, row: int | None = None) -> CheckWeights:
    """The self-check's weights for :func:`.rowblocks.contract`: all ones for the fused
    check (its rows already carry the probe weights), else the check vectors' probe and
    row weights (``row``: only that cotangent row's weight, for one row's term)."""
    if fused:
        return CheckWeights([torch.ones_like(data.w[0])], [torch.ones_like(data.u[0])],
                            unit=True)
    return CheckWeights(data.w, data.u if row is None else [u[row:row + 1] for u in data.u])


def _accumulate(into: dict[str, Contracted], name: str, got: Contracted) -> None:
    """Add ``got`` (one cotangent row's, or the whole term's) to ``into[name]``."""
    if name not in into:
        into[name] = got
        return
    have = into[name]
    for mine, theirs in zip(have.pieces, got.pieces):
        for a, b in zip(mine, theirs):
            a += b
    have.quads = [a + b for a, b in zip(have.quads, got.quads)]
