r"""The self-check: every structured kernel is verified against autograd before it is used.

For each probe set, check vectors ``c`` draw Gaussian probe weights ``w`` (n,) and row
weights ``u`` (k,) (``u = 1`` in target and sum mode, where each probe has one
cotangent row). With ``rows_i`` a module's per-probe gradient rows (k, P) as its rule
computes them, and ``cot_ir`` the mode's cotangent rows:

* **rules vs autograd**, per module: ``|| sum_r u_r sum_i w_i rows_ir ||^2`` against
  ``sum_p || d/dp sum_i w_i <sum_r u_r cot_ir, f(x_i)> ||^2`` over the module's
  parameters p -- one extra backward pass of the whole batch per check vector (about
  the cost of the floor G: one batched gradient). A parameter the rule misses, a use it
  does not describe, or a wrong formula changes the left side; with Gaussian weights a
  nonzero error cancels with probability zero, and two vectors are drawn.
* **kernel vs rules**, per layer key: ``w^T K w`` (trace: with the same ``w`` for every
  output; full: ``sum w_i u_a K[i,j,a,b] w_j u_b``; a cross kernel uses the vectors of
  both probe sets) against the same quadratic form computed from the rows, which checks
  the Gram products, panels and mirroring that assemble the kernel.

A module failing the first check, or every module of a key failing the second, is sent
to the exact path (and the structured part recomputed without it); the reason is kept
for ``explain=True``. Tolerances are relative to the compared squared norms (float64:
1e-9, float32: 1e-4, half precision: 2e-2) plus a floor of 1e-6 of that relative error
times the total squared norm of the probe set (round-off of near-zero contributions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .driver import CheckData, Result
from .planner import Plan

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
RTOL_OTHER = 2e-2


@dataclass
class Verdict:
    bad_modules: dict[str, str] = field(default_factory=dict)   # module -> why
    bad_keys: dict[str, str] = field(default_factory=dict)      # layer key -> why
    # module -> [(rules, autograd)] per check vector and probe set
    values: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _sq(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


def _close(a: float, b: float, rtol: float, floor: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + floor


def verify(plan: Plan, result: Result, keys: dict[str, list[str]], mode: str,
           dtype: torch.dtype) -> Verdict:
    rtol = RTOL.get(dtype, RTOL_OTHER)
    verdict = Verdict()
    module_of = {full: m for m, attrs in plan.params.items() for full in attrs.values()}
    for data in result.checks:
        for c, (w, u) in enumerate(zip(data.w, data.u)):
            side, ref = data.H[c], data.ref[c]
            energy = sum(_sq(g) for g in ref.values())
            floor = rtol * 1e-6 * energy
            for mname, attrs in plan.params.items():
                ours = sum(_sq(torch.einsum("r,rp->p", u, h)) for h in side.get(mname, []))
                theirs = sum(_sq(ref[p]) for p in attrs.values() if p in ref)
                verdict.values.setdefault(mname, []).append((ours, theirs))
                if not _close(ours, theirs, rtol, floor):
                    verdict.bad_modules.setdefault(
                        mname, f"self-check: the rule gives {ours:.6g}, autograd {theirs:.6g}")
    # kernel vs rules (only for modules that passed: a failing one is recomputed anyway)
    first = result.checks[0] if result.checks else None
    second = result.checks[-1] if result.checks else None
    if first is None:
        return verdict
    for key, names in keys.items():
        kernel = result.kernels.get(key)
        mods = {module_of[p] for p in names if p in module_of}
        if kernel is None or not mods or mods & set(verdict.bad_modules):
            continue
        for c in range(len(first.w)):
            w1, u1, w2, u2 = first.w[c], first.u[c], second.w[c], second.u[c]
            from_rows, scale1, scale2 = 0.0, 0.0, 0.0
            for m in mods:
                for h1, h2 in zip(first.H[c].get(m, []), second.H[c].get(m, [])):
                    if mode == "full":
                        h1, h2 = u1 @ h1, u2 @ h2
                    from_rows += float((h1.double() * h2.double()).sum())
                    scale1 += _sq(h1)
                    scale2 += _sq(h2)
            if mode == "full":
                q = float(torch.einsum("i,a,ijab,j,b->", w1, u1, kernel, w2, u2))
            else:
                q = float(w1 @ kernel @ w2)
            scale = (scale1 * scale2) ** 0.5
            if abs(q - from_rows) > RTOL.get(dtype, RTOL_OTHER) * scale * 10 + 1e-300:
                verdict.bad_keys[key] = (f"self-check: the kernel's quadratic form {q:.6g} "
                                         f"differs from its rows' {from_rows:.6g}")
    return verdict
