r"""The NTK's top eigenvalues over a whole dataset, without forming the kernel.

Definitions (those of :func:`.api.empirical_ntk`). Every mode has cotangent rows
``v_ir`` (r = 1..k a probe: target ``e_{t_i}``, sum ``1``, trace and full ``e_1..e_O``)
and Jacobian rows ``g(i, v) = d <v, f(x_i)> / d theta``. Let ``G_r`` be the (N, P) matrix
with rows ``g(i, v_ir)``.

* target / sum / trace: ``K = sum_r G_r G_r^T`` (N x N). Written as ``K = M M^T`` with
  ``M = [G_1 ... G_k]`` (N x kP, the rows side by side), so its nonzero eigenvalues are
  those of the (kP x kP) Gram ``M^T M`` (blocks ``G_r^T G_s``). For trace mode this is
  **not** ``J J^T`` of the stacked (N*O, P) Jacobian: that one is the full kernel.
* full: ``K[(i,a), (j,b)] = <g(i, e_a), g(j, e_b)>``, (N*O) x (N*O), ``K = J J^T`` with
  J the stacked Jacobian; its nonzero eigenvalues are those of the (P x P) Gram
  ``J^T J = sum_r G_r^T G_r``.

Three routes (``route="auto"`` picks ``"gram"`` when it fits, else ``"factors"`` in one
process when the factors fit the memory budget, else ``"matfree"``):

* ``"factors"``: Lanczos on products with per-probe factors captured once by the
  structured engine (:mod:`.factors`: each layer's inputs and output cotangents, or its
  per-probe gradient rows where smaller, exact ``torch.func`` rows for parameters no rule
  covers; self-checked against autograd): a product is a few matrix products over the
  factors, no pass through the model. Memory: the factors (``N`` times their size a
  probe). One process only.
* ``"matfree"``: Lanczos (``scipy.sparse.linalg.eigsh``, ARPACK, ``which="LA"``) on the
  operator ``v -> K v = sum_r G_r (G_r^T v)``: per product one pass over the data in
  chunks, each a forward, a vector-Jacobian product (``torch.func.vjp``, the k rows
  vmapped) and a Jacobian-vector product (``torch.func.jvp``, vmapped). Memory: one chunk's
  activations and a few parameter-sized vectors; the kernel never exists.
* ``"gram"``: accumulate the parameter-space Gram (kP x kP, or P x P in full mode) from
  per-probe Jacobian rows in one pass (``vmap`` of ``vjp``), then a dense symmetric
  eigendecomposition (``torch.linalg.eigh``) in float64. Chosen by ``"auto"`` when that
  width is at most ``GRAM_MAX`` (4096), smaller than the kernel's size and its Gram fits
  the memory budget.

Accuracy: the Gram route is exact to float64 round-off of the eigensolver (the rows are
in the compute dtype). The Lanczos route stops when ARPACK's relative residual criterion
``tol`` is met (default ``1e-10`` in float64, ``1e-6`` otherwise): the returned
eigenvalues are then within about ``tol * lambda_max`` of the exact ones, and the products
themselves carry the compute dtype's round-off (use ``dtype=torch.float64`` for
reference-grade values).

Hutchinson estimates (:func:`ntk_trace_estimate`): ``tr K ~ mean z^T K z`` and
``||K||_F^2 ~ mean ||K z||^2`` over Rademacher vectors z (Hutchinson 1989; Avron &
Toledo 2011), with standard errors; on the Gram route both are exact (``tr M^T M`` and
``||M^T M||_F``, equal to those of K); on the factors route the trace is exact (the
kernel's diagonal ``||g(i, r)||^2`` summed from the factors).

Ranks (``comm=``): every rank passes the same data; each product's forward and backward
passes run on this rank's contiguous share of the probes only, the parameter-space vector
is all-reduced and the output entries all-gathered, so a product costs about
``1/world_size`` of the single-process time. ARPACK runs on every rank on identical
vectors (a seeded start vector), so every rank returns the same eigenvalues.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import batch as B
from .blocked import collect
from .device import default_budget, model_device
from .distributed import Communicator, check_same_data, gather_rows, guarded, resolve, shard
from .errors import NTKError
from .factors import FactorOperator, TooLarge, capture
from .problem import Problem, build_problem, resolve_dtype
from .state import cast_floating, frozen_measurement

ROUTES = ("auto", "matfree", "gram", "factors")
log = logging.getLogger("ntk_callback.engine")
GRAM_MAX = 4096


@dataclass
class NormEstimate:
    """Trace and Frobenius norm of the NTK: estimates with standard errors from
    ``samples`` Rademacher vectors, or exact values (``exact=True``, errors 0).
    ``trace_exact``: the trace alone is exact (the ``"factors"`` route sums the kernel's
    diagonal, ``||g(i, r)||^2``, from the factors; ``trace_stderr`` is then 0)."""

    trace: float
    trace_stderr: float
    frobenius: float
    frobenius_stderr: float
    samples: int
    exact: bool
    trace_exact: bool = False


class _Operator:
    """The kernel of one problem as products with vectors, and its parameter-space Gram.

    Vectors are (dim,) with dim = N (diagonal pairing) or N*k (all pairs, probe-major)."""

    def __init__(self, problem: Problem, comm: Communicator, chunk: int) -> None:
        self.p = problem
        self.comm = comm
        self.names = list(problem.params)
        self.params = {n: problem.params[n] for n in self.names}
        self.base = problem.tensors()
        self.cot = problem.cot1                        # (N, k, O)
        self.n, self.k = self.cot.shape[0], self.cot.shape[1]
        self.all_pairs = problem.mode.all_pairs
        self.dim = self.n * self.k if self.all_pairs else self.n
        self.local = shard(self.n, comm)
        self.chunks = [slice(s, min(self.local.stop, s + chunk))
                       for s in range(self.local.start, self.local.stop, chunk)]
        self.width = (1 if self.all_pairs else self.k) * sum(
            t.numel() for t in self.params.values())
        self.products = 0
        self.double_vjp = False  # set once forward-mode AD turns out unsupported

    @property
    def dtype(self) -> torch.dtype:
        return self.p.dtype

    def _f(self, x: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def f(live: dict[str, torch.Tensor]) -> torch.Tensor:
            tensors = dict(self.base)
            tensors.update(live)
            return self.p.forward(tensors, x)
        return f

    def _weights(self, v: torch.Tensor, sl: slice) -> torch.Tensor:
        """(rows, n, O) output cotangents of a chunk for the vector v."""
        cot = self.cot[sl]                                       # (n, k, O)
        if self.all_pairs:
            return torch.einsum("ir,iro->io", v.reshape(self.n, self.k)[sl], cot)[None]
        return (v[sl, None, None] * cot).permute(1, 0, 2)

    def _readout(self, t: torch.Tensor, sl: slice) -> torch.Tensor:
        """Entries of ``K v`` for a chunk from the output tangents t (rows, n, O)."""
        cot = self.cot[sl]
        if self.all_pairs:
            return torch.einsum("io,iro->ir", t[0], cot).reshape(-1)
        return torch.einsum("rio,iro->i", t, cot)

    def _push(self, f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
              u: dict[str, torch.Tensor]) -> torch.Tensor:
        """Jacobian-vector products ``J u`` for each row of the tangents ``u``: forward-mode
        ``jvp``, or, for ops without forward AD (e.g. the fused ``nn.TransformerEncoderLayer``
        of eval mode), the transpose of the vjp: ``J u = d/dc <J^T c, u>``."""
        if not self.double_vjp:
            try:
                forward: torch.Tensor = vmap(lambda tan: jvp(f, (self.params,), (tan,))[1])(u)
                return forward
            except NotImplementedError:
                self.double_vjp = True
        # the math attention kernel: the fused ones have no double backward
        with sdpa_kernel(SDPBackend.MATH):
            out, pull = vjp(f, self.params)[:2]

            def transposed(c: torch.Tensor) -> dict[str, torch.Tensor]:
                grads: dict[str, torch.Tensor] = pull(c)[0]
                return grads

            push = vjp(transposed, torch.zeros_like(out))[1]
            pushed: torch.Tensor = vmap(lambda tan: push(tan)[0])(u)
        return pushed

    def matvec(self, v_np: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.ascontiguousarray(v_np).reshape(-1))
        v = v.to(self.p.dtype).to(self.p.device)
        rows = 1 if self.all_pairs else self.k

        def pull_back() -> torch.Tensor:
            total = None
            for sl in self.chunks:
                x = B.take(self.p.x1, sl)
                pull = vjp(self._f(x), self.params)[1]  # (value, pullback)
                (g,) = vmap(pull)(self._weights(v, sl))
                flat = torch.cat([g[n].reshape(rows, -1) for n in self.names], dim=1)
                total = flat if total is None else total + flat
            if total is None:
                total = torch.zeros(rows, self.width // rows, dtype=self.p.dtype,
                                    device=self.p.device)
            return total

        u_flat = guarded(self.comm, pull_back)
        if self.comm.world_size > 1:
            u_flat = self.comm.all_reduce(u_flat, "sum")
        u, col = {}, 0
        for n in self.names:
            size = self.params[n].numel()
            u[n] = u_flat[:, col:col + size].reshape((rows,) + tuple(self.params[n].shape))
            col += size

        def push_forward() -> torch.Tensor:
            parts = []
            for sl in self.chunks:
                f = self._f(B.take(self.p.x1, sl))
                t = self._push(f, u)
                parts.append(self._readout(t, sl))
            width = self.k if self.all_pairs else 1
            if not parts:
                return torch.zeros(0, dtype=self.p.dtype, device=self.p.device)
            return torch.cat(parts).reshape(-1, width) if width > 1 else torch.cat(parts)

        local = guarded(self.comm, push_forward)
        if self.all_pairs:
            local = local.reshape(-1, self.k)
        out = gather_rows(self.comm, local, self.n).reshape(-1)
        self.products += 1
        return out.detach().double().cpu().numpy()

    def rows(self, sl: slice) -> torch.Tensor:
        """Per-probe Jacobian rows of a chunk, (n, k, P) (``vmap`` of ``vjp``)."""
        x, cot = B.take(self.p.x1, sl), self.cot[sl]

        def per_probe(xi: Any, ci: torch.Tensor) -> torch.Tensor:
            f = self._f(_unsqueeze(xi))
            pull = vjp(lambda live: f(live)[0], self.params)[1]  # (value, pullback)
            (g,) = vmap(pull)(ci)
            return torch.cat([g[n].reshape(ci.shape[0], -1) for n in self.names], dim=1)

        return vmap(per_probe)(x, cot)

    def gram(self) -> torch.Tensor:
        """The parameter-space Gram in float64: ``M^T M`` (kP x kP) or ``J^T J`` (P x P)."""
        def local() -> torch.Tensor:
            g = torch.zeros(self.width, self.width, dtype=torch.float64, device=self.p.device)
            for sl in self.chunks:
                r = self.rows(sl).double()
                m = r.reshape(-1, r.shape[2]) if self.all_pairs else r.reshape(r.shape[0], -1)
                g.addmm_(m.T, m)
            return g

        g = guarded(self.comm, local)
        return self.comm.all_reduce(g, "sum") if self.comm.world_size > 1 else g

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """``M w`` (or ``J w``) for parameter-space vectors w (width, m): (dim, m)."""
        def local() -> torch.Tensor:
            parts = []
            for sl in self.chunks:
                r = self.rows(sl).double()
                m = r.reshape(-1, r.shape[2]) if self.all_pairs else r.reshape(r.shape[0], -1)
                parts.append(m @ w)
            if not parts:
                return torch.zeros(0, w.shape[1], dtype=torch.float64, device=w.device)
            return torch.cat(parts)

        part = guarded(self.comm, local)
        if self.all_pairs:
            return gather_rows(self.comm, part.reshape(-1, self.k, w.shape[1]),
                               self.n).reshape(-1, w.shape[1])
        return gather_rows(self.comm, part, self.n)


def _unsqueeze(x: Any) -> Any:
    from torch.utils._pytree import tree_map
    return tree_map(lambda t: t.unsqueeze(0), x)


def _setup(model: torch.nn.Module, data: Any, targets: Any, mode: Any, dtype: Any,
           batch_to_probe: Any, output_fn: Any, chunk_size: int | None, budget: int,
           comm: Communicator) -> _Operator:
    x, t, n = guarded(comm, lambda: collect(data, targets, batch_to_probe, "data"))
    from .blocked import checksum
    check_same_data(comm, n, checksum(x, t), "data")

    def build() -> _Operator:
        problem = build_problem(model, x, t, mode=mode, dtype=dtype, output_fn=output_fn)
        k = problem.cot1.shape[1]
        per_probe = max(1, problem.activation_numel) * (4 + 2 * k) * problem.itemsize()
        chunk = chunk_size or max(1, min(4096, budget // (4 * per_probe)))
        return _Operator(problem, comm, chunk)

    return guarded(comm, build)


def _route(route: str, op: _Operator, budget: int) -> str:
    if route not in ROUTES:
        raise NTKError(f"route={route!r}; choose one of {', '.join(map(repr, ROUTES))}.")
    if route == "factors" and op.comm.world_size > 1:
        raise NTKError("route='factors' runs in one process; with comm= use route='matfree' "
                       "(each product split across the ranks) or 'gram'.")
    if route != "auto":
        return route
    fits = op.width <= GRAM_MAX and op.width < op.dim and 2 * op.width ** 2 * 8 <= budget
    if fits:
        return "gram"
    return "factors" if op.comm.world_size == 1 else "matfree"


def _products(route: str, chosen: str, op: _Operator, budget: int, self_check: bool
              ) -> _Operator | FactorOperator:
    """The operator whose ``matvec`` Lanczos and Hutchinson call: the per-probe factors,
    captured once (route ``"factors"``; ``"auto"`` falls back to passes through the model
    when they exceed the budget), or ``op`` itself."""
    if chosen != "factors":
        return op
    try:
        return capture(op.p, limit=budget, budget=max(1, budget // 4), self_check=self_check)
    except TooLarge as exc:
        if route == "factors":
            raise NTKError(f"route='factors': {exc} (memory_budget); pass memory_budget="
                           f"{exc.bytes * 5 // 4} or more, or route='matfree' (passes through "
                           "the model for each product, little memory).") from None
        return op
    except NTKError:
        raise
    except Exception as exc:  # noqa: BLE001 - "auto" has an exact route that needs no factors
        if route == "factors":
            raise
        log.debug("the factors route failed (%s: %s); products by passes through the model",
                  type(exc).__name__, exc)
        return op


def ntk_spectrum(model: torch.nn.Module, data: Any, targets: Any = None, *, k: int = 10,
                 mode: Any = "trace", dtype: torch.dtype | None = None,
                 return_vectors: bool = False, route: str = "auto", tol: float | None = None,
                 maxiter: int | None = None, ncv: int | None = None, seed: int = 0,
                 batch_to_probe: Callable[[Any], Any] | None = None,
                 chunk_size: int | None = None, memory_budget: int | None = None,
                 output_fn: Callable[[Any], torch.Tensor] | None = None,
                 eval_mode: bool = True, comm: Communicator | None = None,
                 self_check: bool = True) -> Any:
    """Top-``k`` eigenvalues of the NTK of ``model`` over ``data``, descending, as a float64
    tensor (k,), without forming the kernel (module doc: definitions, routes, accuracy).

    Args:
        data: a probe batch (tensor / tuple / dict, with ``targets``) or a ``DataLoader``
            / iterable of ``(inputs, targets)`` batches (``batch_to_probe`` maps other
            batch shapes), as for :func:`.api.empirical_ntk`.
        k: eigenvalues wanted, ``1 <= k < dim`` (dim = N, or N*O in full mode).
        mode: ``"trace"`` (default), ``"target"``, ``"sum"`` or ``"full"`` (the
            (N*O) x (N*O) kernel, entries ordered probe-major).
        dtype: compute dtype (default: the model's); ``torch.float64`` for
            reference-grade eigenvalues.
        return_vectors: also return the unit eigenvectors, (dim, k) float64 (signs
            arbitrary).
        route: ``"auto"``, ``"factors"`` (Lanczos on products with per-probe factors
            captured once), ``"matfree"`` (Lanczos on products by passes through the
            model) or ``"gram"`` (parameter-space Gram).
        tol, maxiter, ncv: ARPACK's stopping tolerance (default 1e-10 in float64, 1e-6
            otherwise), iteration limit and Lanczos basis size (default ``max(2k+1, 20)``).
        seed: the start vector's seed (the same on every rank).
        chunk_size: probes a pass handles at once (default: from ``memory_budget``).
        memory_budget: bytes of working memory (default: the device's, as for
            :func:`.api.empirical_ntk`); the ``"factors"`` route holds at most this much
            of factors (``"auto"`` passes through the model beyond it).
        comm: a :class:`.distributed.Communicator` splitting each pass across ranks.
        self_check: verify the ``"factors"`` route's structured factors against autograd
            (as :func:`.api.empirical_ntk` does its kernels).

    Returns:
        ``eigenvalues`` (k,), or ``(eigenvalues, eigenvectors)``.

    Side effects: none (as :func:`.api.empirical_ntk`).
    """
    if not isinstance(k, int) or k < 1:
        raise NTKError(f"k={k!r} must be a positive int (eigenvalues wanted).")
    with _measurement(model, data, targets, mode, dtype, batch_to_probe, output_fn,
                      chunk_size, memory_budget, eval_mode, comm, route, k) as (op, chosen, budget):
        if chosen == "gram":
            return _gram_spectrum(op, k, return_vectors)
        return _lanczos(_products(route, chosen, op, budget, self_check), k, return_vectors,
                        tol, maxiter, ncv, seed)


@contextmanager
def _measurement(model: torch.nn.Module, data: Any, targets: Any, mode: Any, dtype: Any,
                 batch_to_probe: Any, output_fn: Any, chunk_size: int | None,
                 memory_budget: int | None, eval_mode: bool, comm: Communicator | None,
                 route: str, k: int) -> Iterator[tuple[_Operator, str, int]]:
    """The measurement context of the spectrum functions (model frozen and cast): the
    problem's operator, the route taken for ``k`` eigenvalues and the memory budget."""
    comm = resolve(comm)
    budget = memory_budget or default_budget(model_device(model))
    with frozen_measurement(model, eval_mode), cast_floating(model, resolve_dtype(model, dtype)):
        op = _setup(model, data, targets, mode, dtype, batch_to_probe, output_fn, chunk_size,
                    budget, comm)
        chosen = _route(route, op, budget)
        _check_k(k, op, chosen)
        yield op, chosen, budget


def _gram_spectrum(op: _Operator, k: int, return_vectors: bool,
                   g: torch.Tensor | None = None) -> Any:
    g = op.gram() if g is None else g
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0), evecs.flip(1)
    top = evals[:k].clamp_min(0)
    if k > op.width:  # the kernel's remaining eigenvalues are exactly 0
        top = torch.cat([evals.clamp_min(0), torch.zeros(k - op.width, dtype=torch.float64)])
    if not return_vectors:
        return top.cpu()
    if k > op.width or bool((top <= 0).any()):
        raise NTKError("eigenvectors of zero eigenvalues are not defined by the Gram route; "
                       "ask for fewer, or use route='matfree'.")
    vecs = op.lift(evecs[:, :k]) / top.sqrt()
    return top.cpu(), vecs.cpu()


def _lanczos(op: _Operator | FactorOperator, k: int, return_vectors: bool,
             tol: float | None, maxiter: int | None, ncv: int | None, seed: int) -> Any:
    from scipy.sparse.linalg import LinearOperator, eigsh

    if tol is None:
        tol = 1e-10 if op.dtype == torch.float64 else 1e-6
    ncv = min(op.dim, ncv or max(2 * k + 1, 20))
    v0 = np.random.default_rng(seed).standard_normal(op.dim)
    lin = LinearOperator((op.dim, op.dim), matvec=op.matvec, dtype=np.float64)
    vals, vecs = eigsh(lin, k=k, which="LA", tol=tol, maxiter=maxiter, ncv=ncv, v0=v0,
                       return_eigenvectors=True)
    order = np.argsort(vals)[::-1]
    values = torch.from_numpy(np.ascontiguousarray(vals[order]))
    if not return_vectors:
        return values
    return values, torch.from_numpy(np.ascontiguousarray(vecs[:, order]))


def ntk_trace_estimate(model: torch.nn.Module, data: Any, targets: Any = None, *,
                       mode: Any = "trace", dtype: torch.dtype | None = None,
                       num_samples: int = 32, route: str = "auto", seed: int = 0,
                       batch_to_probe: Callable[[Any], Any] | None = None,
                       chunk_size: int | None = None, memory_budget: int | None = None,
                       output_fn: Callable[[Any], torch.Tensor] | None = None,
                       eval_mode: bool = True, comm: Communicator | None = None,
                       self_check: bool = True) -> NormEstimate:
    """Trace and Frobenius norm of the NTK over ``data`` without forming it: Hutchinson
    estimates from ``num_samples`` Rademacher vectors (one product each), the exact
    trace on the ``"factors"`` route (the kernel's diagonal from the factors), or both
    exact on the Gram route (see the module doc; arguments as :func:`ntk_spectrum`). For
    normalised metrics such as ``lambda_max / trace``."""
    return ntk_spectrum_and_norms(
        model, data, targets, k=0, mode=mode, dtype=dtype, num_samples=num_samples,
        route=route, seed=seed, batch_to_probe=batch_to_probe, chunk_size=chunk_size,
        memory_budget=memory_budget, output_fn=output_fn, eval_mode=eval_mode, comm=comm,
        self_check=self_check)[1]


def _check_samples(num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 2:
        raise NTKError(f"num_samples={num_samples!r} must be an int >= 2 (Rademacher vectors; "
                       "the standard error needs two).")


def ntk_spectrum_and_norms(model: torch.nn.Module, data: Any, targets: Any = None, *,
                           k: int = 10, mode: Any = "trace", dtype: torch.dtype | None = None,
                           num_samples: int = 16, route: str = "auto", tol: float | None = None,
                           maxiter: int | None = None, ncv: int | None = None, seed: int = 0,
                           batch_to_probe: Callable[[Any], Any] | None = None,
                           chunk_size: int | None = None, memory_budget: int | None = None,
                           output_fn: Callable[[Any], torch.Tensor] | None = None,
                           eval_mode: bool = True, comm: Communicator | None = None,
                           self_check: bool = True) -> tuple[torch.Tensor, NormEstimate]:
    """:func:`ntk_spectrum` (top ``k`` eigenvalues; ``k=0``: none, an empty tensor) and
    :func:`ntk_trace_estimate` (``num_samples`` Rademacher vectors) of one kernel, sharing
    the data, the route and, on the ``"factors"`` route, the one capture of the factors:
    what a report of both costs. Arguments as those two functions."""
    if not isinstance(k, int) or k < 0:
        raise NTKError(f"k={k!r} must be a non-negative int (eigenvalues wanted).")
    _check_samples(num_samples)
    with _measurement(model, data, targets, mode, dtype, batch_to_probe, output_fn,
                      chunk_size, memory_budget, eval_mode, comm, route, k) as (op, chosen, budget):
        if chosen == "gram":
            g = op.gram()
            norms = NormEstimate(float(torch.trace(g)), 0.0, float(torch.linalg.norm(g)), 0.0,
                                 0, True, True)
            values = _gram_spectrum(op, k, False, g) if k else torch.zeros(0, dtype=torch.float64)
            return values, norms
        products = _products(route, chosen, op, budget, self_check)
        values = _lanczos(products, k, False, tol, maxiter, ncv, seed) if k \
            else torch.zeros(0, dtype=torch.float64)
        return values, _norms(products, num_samples, seed)


def _check_k(k: int, op: _Operator, chosen: str) -> None:
    if k > op.dim or (chosen != "gram" and k >= op.dim):
        raise NTKError(f"k={k} eigenvalues of a {op.dim} x {op.dim} kernel: Lanczos needs "
                       f"k < {op.dim}; for (nearly) all eigenvalues form the kernel with "
                       "empirical_ntk and use torch.linalg.eigvalsh.")


def _norms(products: _Operator | FactorOperator, num_samples: int, seed: int) -> NormEstimate:
    """Hutchinson estimates over Rademacher vectors z: ``tr K ~ mean z^T K z`` (or the
    exact trace from the factors' diagonal) and ``||K||_F^2 ~ mean ||K z||^2``."""
    rng = np.random.default_rng(seed)
    tr, fr = [], []
    for _ in range(num_samples):
        z = rng.integers(0, 2, products.dim).astype(np.float64) * 2 - 1
        y = products.matvec(z)
        tr.append(float(z @ y))
        fr.append(float(y @ y))
    m = len(tr)
    tr_mean, fr2_mean = float(np.mean(tr)), float(np.mean(fr))
    tr_se = float(np.std(tr, ddof=1) / math.sqrt(m))
    fr2_se = float(np.std(fr, ddof=1) / math.sqrt(m))
    frob = math.sqrt(max(fr2_mean, 0.0))
    fr_se = fr2_se / (2 * frob) if frob > 0 else 0.0
    if isinstance(products, FactorOperator):
        return NormEstimate(float(products.diagonal().sum()), 0.0, frob, fr_se, m, False, True)
    return NormEstimate(tr_mean, tr_se, frob, fr_se, m, False)


__all__ = ["ntk_spectrum", "ntk_trace_estimate", "ntk_spectrum_and_norms", "NormEstimate",
           "ROUTES", "GRAM_MAX"]
