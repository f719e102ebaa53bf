r"""The self-check: every structured kernel is verified against autograd before it is used.

For each probe set, check vectors ``c`` draw Gaussian probe weights ``w`` (n,) and row
weights ``u`` (k,) (``u = 1`` in target and sum mode, where each probe has one
cotangent row). With ``rows_ir`` a module's per-probe gradient rows as its rule
computes them and ``cot_ir`` the mode's cotangent rows:

* **rules vs autograd**, per module: ``|| sum_i sum_r w_i u_r rows_ir ||^2`` against
  ``sum_p || d/dp sum_i w_i <sum_r u_r cot_ir, f(x_i)> ||^2`` over the module's
  parameters p. A parameter the rule misses, a use it does not describe, or a wrong
  formula changes the left side: the two sides are the quadratic forms ``w^T K_m w`` of
  the module's kernel contribution as the rule builds it and as autograd defines it, and
  for random weights a nonzero error cancels with probability zero.
  With one cotangent row (target and sum mode) the check is *fused* into the capture
  pass: one positive weighting ``w_i = 2^{m_i}``, ``m_i = clamp(round(2.5 z_i), -6, 6)``,
  ``z ~ N(0, 1)``, scales each probe's cotangent, so the capture's own backward also
  returns autograd's side (the parameter gradients of that weighted sum) and the rules
  build ``w_i rows_i``; the kernel is then divided by ``w_i w_j``. Powers of two make the
  scaling and the division exact: the kernel is bit for bit the unweighted one. A term
  the rule drops makes its ``K_m`` too small by a positive semidefinite matrix, which a
  positive ``w`` always sees; an error confined to probes of equal weight can cancel
  (two probes' rows swapped: when their weights are equal, probability ~1/8). Cost:
  the parameter gradients in that backward plus the rule side, about +15-100 % (most on
  wide MLPs, whose kernel costs less than one gradient).
  With several cotangent rows (trace, full mode) two Gaussian weightings ``w`` and row
  weightings ``u`` are drawn, each with one extra backward pass of the whole batch
  (about the floor G), whatever the number of outputs: +10-50 % on conv nets, up to
  ~2.3x on MLPs, whose trace kernel costs only a few backward passes.
* **kernel vs rules**, per layer key of a self-kernel: ``w^T K w`` (trace mode: the same
  ``w`` for every output; full mode: ``sum w_i u_a K[i,j,a,b] w_j u_b``) against the
  same form computed from the rows and terms, which checks the Gram products, panels
  and mirroring that assemble the kernel.

A module failing the first check, or the modules of a key failing the second, are sent
to the exact path (and the structured part recomputed without them); the reason is kept
for ``explain=True``. Tolerances are relative to the compared squared norms (float64:
1e-9, float32: 1e-4, half precision: 2e-2; the loosest of the compute dtype and every
floating dtype the trial forward produced, so a float64 measurement of a model that runs
its norms in float32 is checked at float32's), plus a floor of 1e-6 of that relative
error times the total squared gradient norm of the probe set (round-off of near-zero
contributions).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..modes import KernelMode
from .driver import Result
from .planner import Plan

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
RTOL_OTHER = 2e-2


def tolerance(dtype: torch.dtype, seen: Iterable[torch.dtype] = ()) -> float:
    """The check's relative tolerance for a computation in ``dtype`` whose forward also
    produced tensors of the dtypes ``seen`` (the census): the loosest of them, since a
    float64 measurement of a model that computes some ops in float32 carries float32
    round-off (two exact computations of the same quantity then differ by ~1e-7)."""
    return max(RTOL.get(d, RTOL_OTHER) for d in {dtype, *seen})


@dataclass
class Verdict:
    bad_modules: dict[str, str] = field(default_factory=dict)   # module -> why
    bad_keys: dict[str, str] = field(default_factory=dict)      # layer key -> why
    # module -> [(rules, autograd)] per check vector and probe set
    values: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _sq(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    return float(torch.vdot(flat, flat))


def _close(a: float, b: float, rtol: float, floor: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + floor


def verify(plan: Plan, result: Result, keys: dict[str, list[str]], mode: KernelMode,
           dtype: torch.dtype, seen: Iterable[torch.dtype] = ()) -> Verdict:
    rtol = tolerance(dtype, seen)
    verdict = Verdict()
    module_of = {full: m for m, attrs in plan.params.items() for full in attrs.values()}
    # modules sharing a tied parameter are checked as one unit (the parameter's rows are
    # the sum over them, filed under the unit's name by the driver)
    unit = plan.units()
    members: dict[str, list[str]] = {}
    for mname in plan.params:
        members.setdefault(unit[mname], []).append(mname)
    for data in result.checks:
        for c in range(len(data.w)):
            side, ref = data.G[c], data.ref[c]
            energy = sum(_sq(g) for g in ref.values())
            floor = rtol * 1e-6 * energy
            for head, group in members.items():
                params = {p for m in group for p in plan.params[m].values()}
                ours = sum(_sq(g) for g in side.get(head, []))
                theirs = sum(_sq(ref[p]) for p in params if p in ref)
                for mname in group:
                    verdict.values.setdefault(mname, []).append((ours, theirs))
                if not _close(ours, theirs, rtol, floor):
                    for mname in group:
                        verdict.bad_modules.setdefault(
                            mname, f"self-check: the rule gives {ours:.6g}, autograd "
                                   f"{theirs:.6g}")
    if not result.quads:
        return verdict
    first = result.checks[0]
    for key, names in keys.items():
        kernel = result.kernels.get(key)
        mods = {module_of[p] for p in names if p in module_of}
        if kernel is None or not mods or mods & set(verdict.bad_modules):
            continue
        for c, quads in enumerate(result.quads):
            w, u = first.w[c], first.u[c]
            q = mode.quad(kernel, w, u)
            from_rows = quads.get(key, 0.0)
            if not _close(q, from_rows, 10 * rtol, 0.0):
                verdict.bad_keys[key] = (f"self-check: the kernel's quadratic form {q:.6g} "
                                         f"differs from its rows' {from_rows:.6g}")
    return verdict
