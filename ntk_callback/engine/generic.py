"""The generic path: exact per-probe Jacobian rows with torch.func, contracted blockwise.

For a group of parameter tensors with P_g entries, the rows ``g(i, v)`` (see
:mod:`.problem`) of a block of probes are computed with ``vmap`` over probes of a
``vjp`` (one forward a probe, one backward a cotangent), giving a (n, k, P_g) block.
Kernel blocks are contractions of two such blocks (:func:`.symmetric.add_gram`; a
self-kernel only on and above the diagonal, the rest mirrored). Memory is bounded by the
budget: when the rows of all probes do not fit, probes are processed in blocks of size
``budget / (2 * bytes a probe)`` and the off-diagonal blocks recomputed (memory traded
for time); trace mode additionally splits the outputs into chunks.

Works for any module torch.func can trace, including free parameters used directly in
``forward``. What ``vmap`` cannot vectorise (RNN kernels without a batching rule,
activation checkpointing and other saved-tensor hooks, data-dependent Python control
flow) takes ``method="loop"``: the same rows from a per-probe loop of plain
``torch.autograd.grad`` calls on the model's own parameters (one forward a probe, one
backward a cotangent row), under the same memory blocking.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.func import vjp, vmap

from . import batch as B
from .errors import NTKError
from .problem import Problem, blocks, numel, output_shape, unsqueeze_batch
from .symmetric import add_gram, mirror_lower


class RowCheckFailed(RuntimeError):
    """vmap's per-probe rows disagree with plain autograd on the same weighted sum."""


def _rows(problem: Problem, names: list[str], x: Any, cot: torch.Tensor,
          chunk: int, name: str = "inputs") -> torch.Tensor:
    """Per-probe gradient rows, shape (n, k, P_g) for a batch ``x`` of n probes and
    cotangents ``cot`` of shape (n, k, O)."""
    base = problem.tensors()
    live0 = {n: problem.params[n] for n in names}

    def per_probe(xi: Any, vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def f(live: dict[str, torch.Tensor]) -> torch.Tensor:
            tensors = dict(base)
            tensors.update(live)
            return problem.forward(tensors, unsqueeze_batch(xi))[0]

        result = vjp(f, live0)  # (value, pullback) without has_aux
        value, pullback = result[0], result[1]
        (grads,) = vmap(pullback)(vi)
        k = vi.shape[0]
        return torch.cat([grads[n].reshape(k, -1) for n in names], dim=1), value

    n = cot.shape[0]
    out = []
    for sl in blocks(n, chunk):
        with warnings.catch_warnings():
            # ops without a batching rule (RNN kernels, fused attention) run in a loop
            # inside vmap: exact, only slower -- not the user's concern
            warnings.filterwarnings("ignore", message="There is a performance drop")
            rows, values = vmap(per_probe)(B.take(x, sl), cot[sl])
        problem.check_outputs(values, name)
        if rows.shape[-1] != numel(problem.params, names):
            # a batching rule that returns a batched gradient of the wrong shape
            raise RowCheckFailed(f"vmap's rows of {', '.join(names)} have {rows.shape[-1]} "
                                 f"entries a probe, not {numel(problem.params, names)}")
        out.append(rows)
    return out[0] if len(out) == 1 else torch.cat(out)


def _loop_rows(problem: Problem, names: list[str], x: Any, cot: torch.Tensor,
               chunk: int, name: str = "inputs") -> torch.Tensor:
    """:func:`_rows` by a per-probe autograd loop: (n, k, P_g)."""
    live = dict(problem.model.named_parameters())
    params = [live[n] for n in names]
    n, k = cot.shape[:2]
    out = torch.empty((n, k, numel(problem.params, names)), dtype=problem.dtype,
                      device=problem.device)
    for i in range(n):
        value = problem.as_matrix(problem.call(B.take(x, slice(i, i + 1))))
        if value.shape[0] != 1:
            raise NTKError(f"the model's output on one probe of `{name}` has shape "
                           f"{tuple(value.shape)}; it must be one row per probe.")
        problem.check_outputs(value, name)
        for r in range(k):
            grads = torch.autograd.grad(value, params, cot[i:i + 1, r], allow_unused=True,
                                        retain_graph=r < k - 1)
            col = 0
            for p, g in zip(params, grads):
                size = p.numel()
                if g is None:
                    out[i, r, col:col + size] = 0
                else:
                    out[i, r, col:col + size] = g.reshape(-1)
                col += size
    return out


ROWS = {"vmap": _rows, "loop": _loop_rows}

#: relative tolerance of :func:`check_rows` (float64, float32; other dtypes 2e-2)
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
CHECK_ROWS = 3  # cotangent rows checked (all of them when there are at most this many)


def check_rows(problem: Problem, names: list[str], x: Any, cot: torch.Tensor,
               rows: torch.Tensor, seed: int = 0) -> None:
    r"""Verify vmap's per-probe gradient rows against one batched autograd backward.

    For Gaussian probe weights ``w`` (n,) and a checked cotangent row r, the rows must
    satisfy ``sum_i w_i rows[i, r] = d/dtheta_g sum_i w_i <cot[i, r], f(x_i)>``, the
    gradient of a weighted sum of the batch's outputs over the group's parameters. Both
    sides are P_g-vectors, compared with a tolerance relative to
    ``sum_i |w_i| ||rows[i, r]||`` (float64 1e-9, float32 1e-4). vmap runs torch's batching
    rules, which are not exact for every op (torch 2.13's PReLU backward broadcasts a
    batched weight gradient wrongly under nested vmap: a 6 % error in target mode; rows of
    the wrong width are refused earlier, in :func:`_rows`); this
    check costs one batched forward and one backward per checked row (at most
    ``CHECK_ROWS``) and raises :class:`RowCheckFailed` on a mismatch, after which the
    caller recomputes the rows by the per-probe autograd loop. A model whose batched
    forward mixes probes fails the check too, and the loop, which calls the model on one
    probe at a time as the kernel's definition does, is then the right answer anyway.
    """
    n, k = cot.shape[:2]
    live = dict(problem.model.named_parameters())
    params = [live[name] for name in names]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen, dtype=torch.float64).to(rows.dtype).to(rows.device)
    checked = (list(range(k)) if k <= CHECK_ROWS
               else torch.randperm(k, generator=gen)[:CHECK_ROWS].tolist())
    rtol = CHECK_RTOL.get(rows.dtype, 2e-2)
    with torch.enable_grad():
        value = problem.as_matrix(problem.call(x))
        for pos, r in enumerate(checked):
            weights = w[:, None] * cot[:, r].to(value.dtype)
            grads = torch.autograd.grad(value, params, weights, allow_unused=True,
                                        retain_graph=pos < len(checked) - 1)
            theirs = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                for p, g in zip(params, grads)])
            ours = w @ rows[:, r]
            scale = float((w.abs() * rows[:, r].norm(dim=1)).sum())
            err = float((ours - theirs).norm())
            if not err <= rtol * scale + torch.finfo(rows.dtype).tiny:
                raise RowCheckFailed(
                    f"vmap's rows of {names[0]}{' ...' if len(names) > 1 else ''} differ "
                    f"from autograd by {err:.3g} (scale {scale:.3g}, row {r})")


def generic_rows(problem: Problem, names: list[str], budget: int,
                 chunk_size: int | None = None, check: bool = True) -> tuple[torch.Tensor, str]:
    """Per-probe gradient rows of the parameters ``names`` for the first probe set, (n, k,
    P_g), and the method that made them: ``vmap`` (its first chunk checked against
    autograd with ``check``, :func:`check_rows`) or, where vmap cannot run the model or
    its rows fail the check, the per-probe autograd loop."""
    x, name, n, cot = problem.probe_sets()[0]
    per_probe = max(1, cot.shape[1] * numel(problem.params, names) * problem.itemsize())
    vchunk = chunk_size or max(1, budget // (4 * per_probe))
    try:
        first = _rows(problem, names, B.take(x, slice(0, vchunk)), cot[:vchunk], vchunk, name)
        if check:
            check_rows(problem, names, B.take(x, slice(0, vchunk)), cot[:vchunk], first)
        rest = [_rows(problem, names, B.take(x, sl), cot[sl], vchunk, name)
                for sl in blocks(n, vchunk)[1:]]
        return (torch.cat([first] + rest) if rest else first), "vmap"
    except NTKError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything vmap cannot do, the loop can
        mapped = explain_failure(exc, problem.model) if isinstance(exc, RuntimeError) \
            and not isinstance(exc, RowCheckFailed) else None
        if mapped is not None:
            raise mapped from exc
    return _loop_rows(problem, names, x, cot, vchunk, name), "loop"


def generic_kernel(problem: Problem, names: list[str], budget: int,
                   chunk_size: int | None = None, method: str = "vmap",
                   check: bool = False) -> torch.Tensor:
    """Exact kernel contribution of the parameters ``names``, shape ``output_shape``;
    ``method`` picks how the per-probe rows are computed (``"vmap"`` or ``"loop"``).
    ``check`` verifies the first block of vmap rows against autograd
    (:func:`check_rows`, raising :class:`RowCheckFailed`)."""
    rows_of = ROWS[method]
    mode = problem.mode
    kernel = torch.zeros(output_shape(problem), dtype=problem.dtype, device=problem.device)
    p_g = numel(problem.params, names)
    if p_g == 0:
        return kernel
    itemsize = problem.itemsize()
    n1 = problem.n1
    n_all = n1 + (problem.n2 or 0)
    k_total = problem.cot1.shape[1]
    # Row chunks: where only same-index rows meet (trace), rows can be split freely.
    k_chunk = mode.row_chunk(k_total, budget // max(1, n_all * p_g * itemsize))
    sets = problem.probe_sets()

    unchecked = [check and method == "vmap"]

    def rows(which: int, sl: slice, cs: slice, vchunk: int) -> torch.Tensor:
        """Rows of probes ``sl`` of set ``which`` (1 or 2) for the cotangent rows ``cs``."""
        x, name, _, cot = sets[which - 1]
        xs = B.take(x, sl)
        out = rows_of(problem, names, xs, cot[sl, cs], vchunk, name)
        if unchecked[0]:
            unchecked[0] = False
            check_rows(problem, names, xs, cot[sl, cs], out)
        return out

    for c0 in range(0, k_total, k_chunk):
        cs = slice(c0, min(k_total, c0 + k_chunk))
        k = cs.stop - cs.start
        per_probe = k * p_g * itemsize
        # vmap materialises each parameter's rows and then their concatenation, so a
        # chunk holds ~2x its rows: keep chunks to a quarter of the budget.
        vchunk = chunk_size or max(1, budget // (4 * per_probe))

        if n_all * per_probe <= budget:
            j1 = rows(1, slice(0, n1), cs, vchunk)
            j2 = rows(2, slice(0, problem.n_cols), cs, vchunk) if problem.cross else None
            add_gram(kernel, mode, j1, j2)
            continue
        size = max(1, budget // (2 * per_probe))
        if problem.cross:
            for si in blocks(n1, size):
                ji = rows(1, si, cs, vchunk)
                for sj in blocks(problem.n_cols, size):
                    add_gram(kernel[si, sj], mode, ji, rows(2, sj, cs, vchunk))
            continue
        # self-kernel: the blocks on and above the diagonal; the rest is mirrored
        parts = blocks(n1, size)
        for a, si in enumerate(parts):
            ji = rows(1, si, cs, vchunk)
            add_gram(kernel[si, si], mode, ji, None)
            for sj in parts[a + 1:]:
                add_gram(kernel[si, sj], mode, ji, rows(1, sj, cs, vchunk))
    if not problem.cross:
        mirror_lower(kernel)
    return kernel


def explain_failure(exc: Exception, model: torch.nn.Module | None = None) -> NTKError | None:
    """Map torch.func failures that have a known user-side fix to an NTKError. An in-place
    write is such a failure only while a BatchNorm module is in training mode (the probes
    then interact); other in-place writes in forward (a counter, an EMA buffer) are left
    to the per-probe loop, which runs the model as it is."""
    text = str(exc)
    inplace = "inplace" in text.lower() or "in-place" in text.lower()
    if inplace and model is not None and not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
            for m in model.modules()):
        return None
    if "randomness" in text:
        if model is not None and not any(m.training for m in model.modules()):
            return NTKError("the model draws random numbers in forward even in eval mode (e.g. "
                            "`F.dropout(x, p, training=True)` or noise added with "
                            "`torch.randn`), so its NTK is not defined; make the randomness "
                            "depend on `self.training`. "
                            f"({text.splitlines()[0]})")
        return NTKError("the model draws random numbers in forward (e.g. Dropout in train mode) "
                        "while the NTK is measured; use eval_mode=True (the default) so dropout "
                        f"is off. ({text.splitlines()[0]})")
    if inplace:
        return NTKError("the model updates a tensor in place during forward (e.g. BatchNorm "
                        "running statistics in train mode), which cannot be differentiated per "
                        "probe; use eval_mode=True (the default) so BatchNorm uses its running "
                        f"statistics. ({text.splitlines()[0]})")
    return None
