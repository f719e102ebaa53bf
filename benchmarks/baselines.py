r"""The empirical-NTK implementations a PyTorch user would otherwise write.

Every function takes ``(model, x, targets, mode)`` with ``x`` an (N, ...) probe batch
(a tensor, or a tuple / dict of tensors whose dim 0 is N, called with the engine's
convention, see :func:`call`), ``targets`` (N,) int64 class labels and ``mode`` one of
the modes listed in :data:`SUPPORTED`, and returns the kernel with the conventions of docs/conventions.md:

* ``target``: ``K[i, j] = <d f_{t_i}(x_i)/d theta, d f_{t_j}(x_j)/d theta>``, (N, N);
* ``trace``:  ``K[i, j] = sum_a <d f_a(x_i)/d theta, d f_a(x_j)/d theta>``, (N, N);
* ``full``:   ``K[i, j, a, b] = <d f_a(x_i)/d theta, d f_b(x_j)/d theta>``, (N, N, O, O);

with theta the parameters that have ``requires_grad=True``. The model is called as
``model(x)`` (or ``model(*x)`` / ``model(**x)``, see :func:`call`) and must return
(N, O); it is used in whatever train/eval state it is in
(the benchmark puts it in ``eval()``), and ``.grad`` is left as it was found (None).

Methods (sources in each docstring):

* :func:`floor_target` / :func:`floor_trace` -- not kernels: the cost floors (one
  batched forward + one ``autograd.grad``; or + O of them).
* :func:`per_sample_loop` -- per probe: forward, then per needed output: zero grads,
  ``backward()``, flatten ``.grad``; then contract the stacked Jacobian rows.
* :func:`vmap_jacrev` -- the PyTorch NTK tutorial's
  ``empirical_ntk_jacobian_contraction``: ``vmap(jacrev)`` Jacobians, per-parameter
  einsum. For ``target`` it selects each probe's target row of the full Jacobian.
* :func:`vmap_grad` -- ``target`` only: per-sample gradients of the target logit with
  ``vmap(grad)`` (the torch.func per-sample-gradient recipe), then ``G G^T``.
* :func:`ntk_vps` -- the tutorial's ``empirical_ntk_ntk_vps`` (NTK-vector products,
  ``vjp`` then ``jvp`` per probe pair and output), evaluated over row blocks of x1 with
  ``vmap(chunk_size=...)`` so its memory stays inside ``block_bytes``.
* :func:`nngeometry_gram` -- nngeometry's ``GramMatrix`` (``FMatDense``, hook-based);
  raises ``ImportError`` when nngeometry is not installed and :class:`Unsupported` for a
  tuple / dict probe batch.

A method that cannot run on a model at all by construction raises :class:`Unsupported`
(reported as n/a); anything else it raises (e.g. ``vmap`` refusing the data-dependent
control flow of Hugging Face's attention-mask code) is reported as an error.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map

from ntk_callback.engine.batch import call_convention

SUPPORTED: dict[str, tuple[str, ...]] = {
    "per_sample_loop": ("target", "trace", "full"),
    "vmap_jacrev": ("target", "trace", "full"),
    "vmap_grad": ("target",),
    "ntk_vps": ("target", "trace", "full"),
    "nngeometry_gram": ("target", "trace", "full"),
}


class Unsupported(Exception):
    """The method cannot run on this model / probe batch by construction (n/a)."""


# --------------------------------------------------------------------------- batches

def batch_len(x: Any) -> int:
    """N: dim 0 of the batch's first tensor."""
    return int(tree_leaves(x)[0].shape[0])


def batch_slice(x: Any, index: slice | int) -> Any:
    """Probes ``index`` of every tensor of the batch (an int keeps a batch dim of 1)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return tree_map(lambda v: v[index], x)


def batch_to(x: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of the batch cast to ``dtype`` (token ids and masks unchanged)."""
    return tree_map(lambda v: v.to(dtype) if v.is_floating_point() else v, x)


def split_args(model: nn.Module, x: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``model.forward`` for a batch, with ``empirical_ntk``'s own
    convention (the engine's ``call_convention``, so every method reads a batch the same
    way): a tuple is unpacked when forward takes several positional arguments (or
    ``*args``), a dict when forward's parameters are its keys, anything else is the
    single argument."""
    return call_convention(model, x)(x)


def call(model: nn.Module, x: Any) -> torch.Tensor:
    """``model`` applied to a probe batch (see :func:`split_args`)."""
    args, kwargs = split_args(model, x)
    return model(*args, **kwargs)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tutorial's ``params``: detached copies of the trainable parameters."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def _fnet_single(model: nn.Module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """The tutorial's ``fnet_single``: f(params, x) for ONE probe x (every tensor of the
    batch without its probe dim), shape (O,). Parameters not passed (frozen ones) and
    buffers are taken from the module."""
    def fnet_single(params: dict, x: Any) -> torch.Tensor:
        args, kwargs = split_args(model, tree_map(lambda v: v.unsqueeze(0), x))
        return functional_call(model, params, args, kwargs).squeeze(0)
    return fnet_single


def _check_mode(method: str, mode: str) -> None:
    if mode not in SUPPORTED[method]:
        raise ValueError(f"{method} supports modes {SUPPORTED[method]}, not {mode!r}.")


def _from_full(full: torch.Tensor, targets: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a (N, N, O, O) kernel to the requested mode."""
    if mode == "full":
        return full
    if mode == "trace":
        return torch.einsum("ijaa->ij", full)
    n = full.shape[0]
    idx = torch.arange(n, device=full.device)
    # K[i, j] = full[i, j, t_i, t_j]
    return full[idx[:, None], idx[None, :], targets[:, None], targets[None, :]]


def _contract_rows(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Kernel from stacked Jacobian rows ``rows`` (N, k, P): k = 1 rows (target) or all
    O outputs (trace/full)."""
    n, k, _ = rows.shape
    if mode in ("target", "trace"):
        flat = rows.reshape(n, -1)          # trace: sum over outputs of row inner products
        return flat @ flat.T
    full = rows.reshape(n * k, -1) @ rows.reshape(n * k, -1).T   # (N*O, N*O)
    return full.reshape(n, k, n, k).permute(0, 2, 1, 3)


# --------------------------------------------------------------------------- floors

def floor_target(model: nn.Module, x: Any, targets: torch.Tensor) -> None:
    """Floor G: one batched forward and one ``autograd.grad`` of the summed target logits
    with respect to the trainable parameters (the cost of a training step's gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = call(model, x)
    torch.autograd.grad(out.gather(1, targets[:, None]).sum(), params)


def floor_trace(model: nn.Module, x: Any, num_outputs: int) -> None:
    """Trace-mode floor: one batched forward and O ``autograd.grad`` calls, one per
    output's summed logits (trace mode needs every output's cotangent)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = call(model, x)
    for a in range(num_outputs):
        torch.autograd.grad(out[:, a].sum(), params, retain_graph=a < num_outputs - 1)


# --------------------------------------------------------------------------- baselines

def per_sample_loop(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """Per-sample ``backward()`` loop: for each probe i, one forward of ``x[i:i+1]``;
    for each needed output a (the target, or all O): zero the grads, ``f_a(x_i).backward()``
    and flatten every ``.grad`` into a Jacobian row. Memory: N * k * P rows (k = 1 for
    target, O otherwise)."""
    _check_mode("per_sample_loop", mode)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    n = batch_len(x)
    rows = None
    try:
        for i in range(n):
            out = call(model, batch_slice(x, i)).reshape(-1)
            outputs = [int(targets[i])] if mode == "target" else range(out.shape[0])
            if rows is None:
                numel = sum(p.numel() for p in params)
                rows = torch.empty(n, len(outputs), numel, dtype=out.dtype, device=out.device)
            for r, a in enumerate(outputs):
                for p in params:
                    p.grad = None
                out[a].backward(retain_graph=r < len(outputs) - 1)
                torch.cat([p.grad.reshape(-1) for p in params], out=rows[i, r])
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return _contract_rows(rows, mode)


def vmap_jacrev(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                mode: str) -> torch.Tensor:
    """The PyTorch NTK tutorial's ``empirical_ntk_jacobian_contraction`` (Jacobian
    contraction; pytorch.org/tutorials/intermediate/neural_tangent_kernels.html) for
    x1 = x2: ``vmap(jacrev(fnet_single))`` gives per-parameter Jacobians (N, O, P_l)
    -- computed once, since both probe sets are the same -- contracted per parameter by
    einsum and summed. ``target`` selects row t_i of probe i's Jacobian first.
    Memory: N * O * P."""
    _check_mode("vmap_jacrev", mode)
    params = _trainable(model)
    jac = vmap(jacrev(_fnet_single(model)), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]          # (N, O, P_l) each
    if mode == "target":
        idx = torch.arange(batch_len(x), device=targets.device)
        jac = [j[idx, targets] for j in jac]             # (N, P_l)
        return torch.stack([torch.einsum("Nf,Mf->NM", j, j) for j in jac]).sum(0)
    expr = "Naf,Maf->NM" if mode == "trace" else "Naf,Mbf->NMab"
    return torch.stack([torch.einsum(expr, j, j) for j in jac]).sum(0)


def vmap_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
              mode: str = "target") -> torch.Tensor:
    """Per-sample gradients of the target logit with ``vmap(grad)`` (the torch.func
    per-sample-gradients recipe), then ``sum_l G_l G_l^T``. Target mode only.
    Memory: N * P."""
    _check_mode("vmap_grad", mode)
    params = _trainable(model)
    fnet_single = _fnet_single(model)

    def target_logit(p: dict, xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return fnet_single(p, xi).gather(0, ti.reshape(1)).squeeze(0)

    grads = vmap(grad(target_logit), (None, 0, 0))(params, x, targets)
    return torch.stack([g.flatten(1) @ g.flatten(1).T for g in grads.values()]).sum(0)


def ntk_vps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, mode: str, *,
            block_bytes: int = 2 ** 31) -> torch.Tensor:
    """The PyTorch NTK tutorial's ``empirical_ntk_ntk_vps`` (NTK-vector products): for
    every probe pair (i, j) and output basis vector e_a, ``vjp`` gives e_a^T J(x_i) and
    ``jvp`` pushes it through J(x_j), so full[i, j, a, :] costs one vjp and one jvp on
    single probes. The tutorial vmaps over all N^2 pairs at once, which holds N^2 * O
    parameter-sized vectors; here the outer vmap runs over row blocks of x1 and the
    inner one uses ``vmap(chunk_size=...)`` so a block holds about ``block_bytes``.
    The full (N, N, O, O) kernel is computed and reduced to ``mode``."""
    _check_mode("ntk_vps", mode)
    params = _trainable(model)
    fnet_single = _fnet_single(model)

    def get_ntk(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        def func_x1(p: dict) -> torch.Tensor:
            return fnet_single(p, x1)

        def func_x2(p: dict) -> torch.Tensor:
            return fnet_single(p, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec: torch.Tensor) -> torch.Tensor:
            vjps = vjp_fn(vec)                         # vec^T J(x1)
            _, jvps = jvp(func_x2, (params,), vjps)    # J(x2) J(x1)^T vec
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(get_ntk_slice)(basis)

    n = batch_len(x)
    with torch.no_grad():
        o = call(model, batch_slice(x, 0)).shape[-1]
    numel = sum(p.numel() for p in params.values())
    # Each (i, j) pair holds O parameter-sized vjps plus the jvp tangents (x ~3).
    per_pair = 3 * o * numel * next(iter(params.values())).element_size()
    pairs = max(1, block_bytes // per_pair)
    rows = max(1, min(n, pairs // n))
    cols = max(1, min(n, pairs // rows))
    inner = vmap(get_ntk, (None, 0), chunk_size=cols)
    full = torch.cat([vmap(inner, (0, None))(batch_slice(x, slice(s, s + rows)), x)
                      for s in range(0, n, rows)])
    return _from_full(full, targets, mode)   # full[i, j, a, b]


def nngeometry_available() -> bool:
    return importlib.util.find_spec("nngeometry") is not None


def nngeometry_gram(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """nngeometry's ``GramMatrix`` (George et al., nngeometry; ``FMatDense`` over the
    ``TorchHooksJacobianBackend``): the full Gram (O, N, O, N) from layer hooks,
    reduced to ``mode``. Raises ``ImportError`` when nngeometry is not installed."""
    _check_mode("nngeometry_gram", mode)
    if not isinstance(x, torch.Tensor):
        raise Unsupported("nngeometry's GramMatrix is given one input tensor here; this "
                          "model takes a tuple / dict batch")
    from nngeometry import GramMatrix  # optional dependency

    gram = GramMatrix(model, (x,)).to_torch()          # G[a, i, b, j]
    return _from_full(gram.permute(1, 3, 0, 2), targets, mode)


BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "per_sample_loop": per_sample_loop,
    "vmap_jacrev": vmap_jacrev,
    "vmap_grad": vmap_grad,
    "ntk_vps": ntk_vps,
    "nngeometry_gram": nngeometry_gram,
}

__all__ = ["BASELINES", "SUPPORTED", "Unsupported", "batch_len", "batch_slice", "batch_to",
           "call", "floor_target", "floor_trace", "nngeometry_available", "split_args",
           *BASELINES]
