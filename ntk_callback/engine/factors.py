r"""Kernel-vector products from per-probe factors captured once (the spectrum's
``"factors"`` route).

The structured engine's capture pass (:func:`.structured.compute`) sees, for every layer,
the inputs ``a_is`` and output cotangents ``D_ris`` of each probe i, position s and
cotangent row r; a layer's per-probe gradient rows are ``g(i, r) = sum_s D_ris a_is^T``
(Novak et al. 2022). Captured once, they give the kernel's products without another pass
through the model:

* ``H_r = sum_i w_ir g(i, r)``  (pull: the transposed Jacobian, one product a layer),
* ``(K v)_i = sum_r <g(i, r), H_r>`` with ``w_ir = v_i`` (target, sum, trace mode:
  ``K = sum_r G_r G_r^T``), or, full mode, ``(K v)_(i,r) = <g(i, r), sum_q H_q>`` with
  ``w_ir = v_(i,r)`` (push: the Jacobian, one product a layer).

Each layer keeps whichever form is smaller a probe: its rows ``g(i, r)`` (``k P``
numbers, e.g. convolutions, norms, biases) or its inputs and cotangents
(``S (c + k o)``, e.g. a wide Linear layer in target mode: ``c + 1`` numbers instead of
``o c``). Parameters no structured rule covers keep their exact per-probe rows (torch.func
``vmap`` of ``vjp``, or the per-probe autograd loop). The capture runs the self-check of
:func:`.api.empirical_ntk`: a layer whose factors disagree with autograd takes the exact
rows instead.

Cost: one capture pass (about the structured kernel's pass on the same probes, without
the N x N contraction), then a product costs two passes over the factors' memory (a few
matrix products), instead of a forward, a vjp and a jvp through the model. Memory: the
factors, ``N`` times their per-probe size; :func:`capture` refuses (:class:`TooLarge`)
beyond a byte limit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import structured
from .generic import generic_rows
from .problem import Problem
from .structured.factormode import FactorsTooLarge, part_nbytes
from .structured.selfcheck import tolerance

log = logging.getLogger("ntk_callback.engine")

TooLarge = FactorsTooLarge


@dataclass
class FactorOperator:
    """``v -> K v`` for the kernel of one probe set from its per-probe factors: ``parts``
    are (n, k, P) rows tensors and :class:`.structured.terms.Term` objects (outer /
    token pieces). Vectors are (dim,), dim = n (target, sum, trace) or n*k (full mode,
    probe-major)."""

    parts: list[Any]
    n: int
    k: int
    all_pairs: bool
    dtype: torch.dtype
    device: torch.device
    paths: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    products: int = 0

    @property
    def dim(self) -> int:
        return self.n * self.k if self.all_pairs else self.n

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(part_nbytes(part) for part in self.parts)

    def pulled(self, w: torch.Tensor) -> list[torch.Tensor]:
        """``H_r = sum_i w_ir g(i, r)`` of every part, (k, P_part) each, for ``w`` (n, k)."""
        return [torch.einsum("ir,irp->rp", w, part) if isinstance(part, torch.Tensor)
                else part.pull(w) for part in self.parts]

    def pushed(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """``out_ir = sum over parts <g(i, r), H_r>``, (n, k)."""
        out = torch.zeros(self.n, self.k, dtype=self.dtype, device=self.device)
        for part, h in zip(self.parts, hs):
            if isinstance(part, torch.Tensor):
                out += torch.einsum("irp,rp->ir", part, h)
            else:
                out += part.push(h)
        return out

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``K v`` for v (dim,) in the operator's dtype and device."""
        w = v.reshape(self.n, self.k) if self.all_pairs else v.reshape(self.n, 1).expand(
            self.n, self.k)
        hs = self.pulled(w)
        if self.all_pairs:
            hs = [h.sum(dim=0, keepdim=True).expand(self.k, -1) for h in hs]
        out = self.pushed(hs)
        self.products += 1
        return out.reshape(-1) if self.all_pairs else out.sum(dim=1)

    def diagonal(self) -> torch.Tensor:
        """The kernel's diagonal ``K[(i, r), (i, r)] = ||g(i, r)||^2`` summed as the mode
        pairs rows: (dim,) float64 -- ``sum_r`` of it a probe (target, sum, trace), every
        (probe, row) in full mode. Exact (no vectors)."""
        total = torch.zeros(self.n, self.k, dtype=torch.float64, device=self.device)
        for part in self.parts:
            if isinstance(part, torch.Tensor):
                total += part.double().pow(2).sum(-1)
            else:
                total += part.sq_norms()
        return total.reshape(-1) if self.all_pairs else total.sum(dim=1)

    def verify(self, w: torch.Tensor, u: torch.Tensor, autograd_sq: float,
               rtol: float) -> str | None:
        """The products' self-check for probe weights ``w`` (n,) and row weights ``u``
        (k,), on parts that cover exactly the parameters whose autograd gradient
        ``d/dtheta sum_i w_i <sum_r u_r cot_ir, f(x_i)>`` has squared norm
        ``autograd_sq``: the pull must give that gradient's norm,
        ``sum_parts ||sum_r u_r H_r||^2``, and the push must be its transpose,
        ``<push(H), W> = sum_parts ||H||^2`` with ``W = w u^T``. A reason, or None."""
        weights = w[:, None] * u[None, :]
        hs = self.pulled(weights)  # H_r = u_r sum_i w_i g(i, r)
        ours = sum(float(torch.vdot(h.sum(0), h.sum(0))) for h in hs)
        if abs(ours - autograd_sq) > rtol * max(ours, autograd_sq):
            return f"the factors' gradient norm {ours:.6g}, autograd's {autograd_sq:.6g}"
        energy = sum(float(torch.vdot(h.reshape(-1), h.reshape(-1))) for h in hs)
        back = float((self.pushed(hs) * weights).sum())
        if abs(back - energy) > rtol * max(abs(back), energy):
            return f"the Jacobian product {back:.6g} is not the transpose's {energy:.6g}"
        return None

    def matvec(self, v_np: np.ndarray) -> np.ndarray:
        """:meth:`apply` on float64 numpy vectors (what ``scipy.sparse.linalg`` calls)."""
        v = torch.as_tensor(np.ascontiguousarray(v_np).reshape(-1))
        out = self.apply(v.to(dtype=self.dtype, device=self.device))
        return out.detach().double().cpu().numpy()


def capture(problem: Problem, limit: int, budget: int, self_check: bool = True,
            chunk_size: int | None = None) -> FactorOperator:
    """The factors of ``problem``'s (self-)kernel, verified by the self-check.

    ``limit``: bytes the factors may take (:class:`TooLarge` beyond); ``budget``: the
    capture pass's working memory (probe chunks, as for :func:`.api.empirical_ntk`).
    """
    from .api import Explanation, _structured, explain_paths

    if problem.cross:
        raise ValueError("factors are captured for a self-kernel (one probe set)")
    keys = {"": list(problem.params)}
    plan = structured.plan(problem, "auto", None, broadcast=True)
    explanation = Explanation()
    result = _structured(problem, plan, keys, budget, self_check, explanation, factors=limit)
    parts: list[Any] = result.factors.parts() if result is not None and result.factors else []
    op = FactorOperator(parts, problem.n1, problem.cot1.shape[1], problem.mode.all_pairs,
                        problem.dtype, problem.device)
    if parts and result is not None and result.checks:
        # the products' own check, on the structured self-check's vectors and autograd side
        data = result.checks[0]
        rtol = tolerance(problem.dtype, problem.census.dtypes if problem.census else ())
        for w, u, ref in zip(data.w, data.u, data.ref):
            sq = sum(float(torch.vdot(g.reshape(-1), g.reshape(-1))) for g in ref.values())
            why = op.verify(w, u, sq, rtol)
            if why is not None:
                log.debug("factor products fail their self-check (%s): exact rows", why)
                for m in list(plan.modules):
                    plan.drop(m, f"self-check of the factor products: {why}")
                op.parts = []
                break
    rest = [name for name in problem.params if name not in plan.handled]
    methods: dict[str, str] = {}
    if rest:
        problem.check_single_probe()
        need = op.nbytes() + problem.n1 * op.k * sum(
            problem.params[name].numel() for name in rest) * problem.itemsize()
        if need > limit:
            raise TooLarge(need, limit)
        rows, method = generic_rows(problem, rest, budget, chunk_size, self_check)
        methods.update({name: method for name in rest})
        op.parts.append(rows)
    explain_paths(problem, plan, methods, explanation)
    op.paths, op.reasons = explanation.paths, explanation.reasons
    return op


__all__ = ["FactorOperator", "capture", "TooLarge"]
