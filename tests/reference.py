"""Independent float64 references for the empirical NTK (test-only; never imports the engine).

Two Jacobian computations that share no code path with each other:

(a) :func:`jacobian_loop` -- a per-sample loop of ``torch.autograd.grad`` calls, one per
    (sample, output) pair, on a float64 deep copy of the model in eval mode, building the
    full Jacobian ``J`` of shape (N, O, P) (P = number of trainable scalars,
    concatenated in ``named_parameters()`` order). Kernels are then contracted straight
    from ``J`` (:func:`kernel_from_jacobian`).
(b) :func:`full_kernel_func` -- ``torch.func.vmap(jacrev(functional_call))`` per-parameter
    Jacobians contracted per parameter with ``einsum`` and summed
    ("Neural Tangent Kernels" tutorial, pytorch.org/tutorials/intermediate/neural_tangent_kernels.html),
    giving the (N1, N2, O, O) ``full`` kernel; the other modes are read off it
    (:func:`modes_from_full`).

Mode definitions (README "The engine and the analysis", docs/conventions.md), with ``J_a(x) = df_a(x)/dtheta``:
    full[i,j,a,b] = <J_a(x_i), J_b(x_j)>                            (N1, N2, O, O)
    trace[i,j]    = sum_a full[i,j,a,a]                              (N1, N2)
    sum[i,j]      = sum_{a,b} full[i,j,a,b]  (NTK of sum_a f_a)      (N1, N2)
    target[i,j]   = full[i,j,t_i,t_j], t_i = targets[i] (t_i = 0 when O = 1)
theta = the parameters with ``requires_grad=True`` only; buffers are constants.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

MODES = ("target", "trace", "sum", "full")


# ------------------------------------------------------------------ batch helpers
def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """Apply ``fn`` to every tensor of a tensor / tuple / list / dict batch."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, b) for b in batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    raise TypeError(f"unsupported batch type {type(batch)!r}")


def first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return first_tensor(batch[0])
    return first_tensor(next(iter(batch.values())))


def num_samples(batch: Any) -> int:
    return int(first_tensor(batch).shape[0])


def take(batch: Any, idx: Any) -> Any:
    """Rows ``idx`` (an int keeps a batch dim of 1; a slice or index tensor selects)."""
    if isinstance(idx, int):
        idx = slice(idx, idx + 1)
    return map_tensors(lambda t: t[idx], batch)


def concat(b1: Any, b2: Any) -> Any:
    """Concatenate two batches of the same structure along the sample dim."""
    if isinstance(b1, torch.Tensor):
        return torch.cat([b1, b2], 0)
    if isinstance(b1, (tuple, list)):
        return type(b1)(concat(x, y) for x, y in zip(b1, b2))
    return {k: concat(b1[k], b2[k]) for k in b1}


def to_float64(batch: Any) -> Any:
    return map_tensors(lambda t: t.double() if t.is_floating_point() else t, batch)


def _positional_arity(fn: Callable[..., Any]) -> Tuple[int, bool]:
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    n = sum(1 for p in params if p.kind in kinds)
    var = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
    return n, var


def call_model(model: nn.Module, batch: Any) -> torch.Tensor:
    """The project's call convention: tuple -> model(*b) when forward takes several
    positional args, dict -> model(**b) when forward's parameters are exactly its keys,
    anything else -> model(b)."""
    if isinstance(batch, (tuple, list)):
        n, var = _positional_arity(model.forward)
        if n > 1 or var:
            return model(*batch)
    if isinstance(batch, dict):
        names = set(inspect.signature(model.forward).parameters)
        if names == set(batch):
            return model(**batch)
    return model(batch)


def as_matrix_output(out: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) -> (N, 1); (N, O) stays; (N, d1, d2, ...) -> (N, d1*d2*...) (row-major)."""
    assert out.shape[0] == n, f"unexpected output shape {tuple(out.shape)} for N = {n}"
    return out.reshape(n, -1)


def float64_eval_copy(model: nn.Module) -> nn.Module:
    """A float64 eval-mode deep copy (the original is never touched)."""
    m = copy.deepcopy(model).to(torch.float64)
    m.eval()
    return m


def trainable_named(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------ (a) per-sample loop
def jacobian_loop(model: nn.Module, batch: Any) -> Tuple[torch.Tensor, List[str], List[slice]]:
    """Full float64 Jacobian J (N, O, P) by a per-sample, per-output autograd.grad loop.

    Returns ``(J, names, slices)``: column block ``slices[k]`` of J belongs to the
    trainable parameter ``names[k]``. A parameter that does not influence the output
    gets a zero block.
    """
    m = float64_eval_copy(model)
    named = trainable_named(m)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    sizes = [p.numel() for p in params]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    slices = [slice(offsets[k], offsets[k + 1]) for k in range(len(sizes))]
    batch64 = to_float64(batch)
    n = num_samples(batch64)
    rows: List[torch.Tensor] = []
    with torch.enable_grad():
        for i in range(n):
            out = as_matrix_output(call_model(m, take(batch64, i)), 1)[0]  # (O,)
            per_out = []
            for a in range(out.shape[0]):
                grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
                per_out.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(grads, params)
                        ]
                    )
                )
            rows.append(torch.stack(per_out))
    return torch.stack(rows).detach(), names, slices


def _targets_index(targets: Optional[torch.Tensor], n: int, num_outputs: int) -> torch.Tensor:
    if num_outputs == 1:
        return torch.zeros(n, dtype=torch.long)
    assert targets is not None and targets.dtype == torch.long
    return targets.reshape(n)


def kernel_from_jacobian(
    J1: torch.Tensor,
    J2: torch.Tensor,
    mode: str,
    targets1: Optional[torch.Tensor] = None,
    targets2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Contract two Jacobians (N1, O, P), (N2, O, P) into the kernel of ``mode``."""
    n1, o, _ = J1.shape
    n2 = J2.shape[0]
    if mode == "full":
        return torch.einsum("iap,jbp->ijab", J1, J2)
    if mode == "trace":
        return torch.einsum("iap,jap->ij", J1, J2)
    if mode == "sum":
        return J1.sum(1) @ J2.sum(1).T
    if mode == "target":
        # targets2 defaults to targets1: the square kernel of one probe set.
        t1 = _targets_index(targets1, n1, o)
        t2 = _targets_index(targets1 if targets2 is None else targets2, n2, o)
        return J1[torch.arange(n1), t1] @ J2[torch.arange(n2), t2].T
    raise ValueError(mode)


def ntk_loop(
    model: nn.Module,
    inputs: Any,
    targets: Optional[torch.Tensor] = None,
    mode: str = "target",
    inputs2: Any = None,
    targets2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference (a): float64 kernel from the explicit per-sample-loop Jacobian."""
    J1 = jacobian_loop(model, inputs)[0]
    if inputs2 is None:
        return kernel_from_jacobian(J1, J1, mode, targets, targets)
    J2 = jacobian_loop(model, inputs2)[0]
    return kernel_from_jacobian(J1, J2, mode, targets, targets2)


# --------------------------------------------------------- (b) vmap(jacrev) tutorial
def param_jacobians_func(model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
    """{name: (N, O, numel)} per-parameter Jacobians via vmap(jacrev(functional_call))."""
    m = float64_eval_copy(model)
    params = {n: p.detach() for n, p in trainable_named(m)}
    batch64 = to_float64(batch)

    def f_single(p: Dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        xb = map_tensors(lambda t: t.unsqueeze(0), x)  # a batch of one
        return _functional_forward(m, p, xb).reshape(-1)  # (O,) for (1,), (1, 1), (1, O)

    jac = vmap(jacrev(f_single), in_dims=(None, 0))(params, batch64)
    return {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in jac.items()}


def _functional_forward(m: nn.Module, p: Dict[str, torch.Tensor], xb: Any) -> torch.Tensor:
    """functional_call with the same call convention as :func:`call_model`."""
    if isinstance(xb, (tuple, list)):
        n, var = _positional_arity(m.forward)
        if n > 1 or var:
            return functional_call(m, p, tuple(xb))
    if isinstance(xb, dict) and set(inspect.signature(m.forward).parameters) == set(xb):
        return functional_call(m, p, (), dict(xb))
    return functional_call(m, p, (xb,))


def full_kernel_func(model: nn.Module, inputs: Any, inputs2: Any = None) -> torch.Tensor:
    """Reference (b): (N1, N2, O, O) float64 full kernel, summed per parameter."""
    j1 = param_jacobians_func(model, inputs)
    j2 = j1 if inputs2 is None else param_jacobians_func(model, inputs2)
    return sum(torch.einsum("iap,jbp->ijab", j1[k], j2[k]) for k in j1)  # type: ignore[return-value]


def modes_from_full(
    full: torch.Tensor,
    mode: str,
    targets1: Optional[torch.Tensor] = None,
    targets2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Read a mode off the (N1, N2, O, O) full kernel by its definition."""
    n1, n2, o, _ = full.shape
    if mode == "full":
        return full
    if mode == "trace":
        return torch.diagonal(full, dim1=2, dim2=3).sum(-1)
    if mode == "sum":
        return full.sum((2, 3))
    if mode == "target":
        # targets2 defaults to targets1: the square kernel of one probe set.
        t1 = _targets_index(targets1, n1, o)
        t2 = _targets_index(targets1 if targets2 is None else targets2, n2, o)
        return full[torch.arange(n1)[:, None], torch.arange(n2)[None, :], t1[:, None], t2[None, :]]
    raise ValueError(mode)


def ntk_func(
    model: nn.Module,
    inputs: Any,
    targets: Optional[torch.Tensor] = None,
    mode: str = "target",
    inputs2: Any = None,
    targets2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference (b) kernel in any mode."""
    full = full_kernel_func(model, inputs, inputs2)
    return modes_from_full(full, mode, targets, targets if inputs2 is None else targets2)


# ----------------------------------------------------------------- per-layer split
def layer_groups(model: nn.Module) -> Dict[str, List[str]]:
    """{key: [trainable parameter names]} as the engine defines layerwise keys.

    A module that owns trainable parameters directly is keyed by its ``named_modules()``
    name. A parameter registered directly on a container module (one with child
    modules, i.e. a free ``nn.Parameter`` used in that container's forward) is keyed by
    its own ``named_parameters()`` name.
    """
    groups: Dict[str, List[str]] = {}
    for mname, mod in model.named_modules():
        direct = [pn for pn, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not direct:
            continue
        full = [f"{mname}.{pn}" if mname else pn for pn in direct]
        if any(True for _ in mod.children()):
            for fn in full:
                groups[fn] = [fn]
        else:
            groups[mname] = full
    return groups


def layerwise_loop(
    model: nn.Module, inputs: Any, targets: Optional[torch.Tensor] = None, mode: str = "target"
) -> Dict[str, torch.Tensor]:
    """{key: kernel from the Jacobian columns of that key's parameters} (reference (a))."""
    J, names, slices = jacobian_loop(model, inputs)
    where = dict(zip(names, slices))
    out = {}
    for key, pnames in layer_groups(model).items():
        cols = torch.cat([torch.arange(where[p].start, where[p].stop) for p in pnames])
        Jk = J[:, :, cols]
        out[key] = kernel_from_jacobian(Jk, Jk, mode, targets, targets)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius-norm relative error ||a - b|| / ||b|| in float64."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    den = torch.linalg.vector_norm(b64)
    num = torch.linalg.vector_norm(a64 - b64)
    return float(num / den) if den > 0 else float(num)
