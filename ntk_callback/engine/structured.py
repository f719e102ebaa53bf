r"""Structured per-layer rules: kernels from layer inputs and output cotangents.

For a layer ``z = layer(a; w)`` inside the network, the per-probe gradient of a row
``<v, f(x_i)>`` with respect to ``w`` depends only on the layer's input ``a_i`` and the
cotangent ``D_i = d <v, f(x_i)> / d z_i`` at its output (Novak et al. 2022, "Fast Finite
Width Neural Tangent Kernel", structured derivatives). One batched forward captures every
``a``; one backward a cotangent row gives every ``D``.
The contributions, with ``s, t`` running over extra positions (sequence, spatial, or
repeated calls of the same module):

* weight of a linear map ``z_s = W a_s`` (``nn.Linear``; ``nn.Conv1d``/``Conv2d`` with
  ``a_s`` the unfolded input patches, per group):
  ``K_W[i,j] = sum_{s,t} (D_is . D_jt) (a_is . a_jt)`` -- the *Gram* route, which for no
  extra positions is ``(D D^T) * (A A^T)``; or the *rows* route, materialising the
  per-probe gradient ``sum_s D_is a_is^T`` and taking inner products. A cost model
  (flops, then memory) picks the route per term.
* bias: per-probe gradient ``sum_s D_is`` (rows route); a Linear's bias joins its weight
  as one outer term on ``[a; 1]``, sharing the cotangent Gram.
* conv weight rows: ``sum_s D_is p_is^T`` by one grouped convolution backward with the
  probes as groups, or, for pointwise convs and for small patches shared by several
  cotangent rows, by one batched matmul with the (unfolded) input.
* normalisation affine weight (BatchNorm in eval, LayerNorm, GroupNorm): per-probe
  gradient ``sum_s D_is * xhat_is`` with ``xhat`` the normalised input (rows route).
* ``nn.Embedding``: ``K[i,j] = sum_{s,t} [tok_is = tok_jt] (D_is . D_jt)`` (Gram route) or
  the scattered per-probe gradient (rows route).

Mechanics: the capture forward keeps the activations without copies (an in-place op on
a captured tensor is detected by its version counter and the pass redone with copies);
cotangent rows are processed one at a time, one backward each, and a tensor hook turns a
layer's cotangent into that layer's rows as soon as autograd has computed it (written
into one preallocated (n, k, P) buffer a layer key), so cotangents are used while hot and
freed as the backward moves on; probes are chunked so that a pass fits the memory budget.

Everything else -- other modules with parameters, free parameters used in ``forward``,
tied weights, modules whose activations are not batched along dim 0 -- is left to the
generic torch.func path. The rules assume probes do not interact in the forward pass,
which holds in eval mode; with any BatchNorm/Dropout module in training mode the plan is
empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import batch as B
from .errors import NTKError
from .problem import Problem, blocks, output_shape
from .symmetric import add_gram, columns, mirror_lower, panel_rows

ROUTES = ("generic", "gram", "rows")
_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_STOCHASTIC = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd,
               nn.AlphaDropout, nn.FeatureAlphaDropout)


class _Fallback(Exception):
    """A structural assumption failed at run time: use the generic path instead."""


@dataclass
class Plan:
    """Which module computes which parameters, and by which route."""

    modules: dict[str, nn.Module] = field(default_factory=dict)     # name -> module
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {attr: full name}
    routes: dict[str, str] = field(default_factory=dict)             # term name -> route
    forced: dict[str, str] = field(default_factory=dict)             # module name -> route
    # set for good once the model turns out to need it
    copy_outputs: bool = False   # an op modified a captured tensor in place

    @property
    def handled(self) -> set[str]:
        return {full for attrs in self.params.values() for full in attrs.values()}

    def __bool__(self) -> bool:
        return bool(self.modules)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, _LINEAR):
        return True
    if isinstance(module, _CONV):
        return module.padding_mode in ("zeros", "reflect", "replicate", "circular")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # Eval-mode BatchNorm with running statistics is a per-channel affine map.
        return module.track_running_stats and module.running_mean is not None
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return True
    if isinstance(module, nn.Embedding):
        return module.max_norm is None  # max_norm renormalises the weight in place
    return False


def plan(problem: Problem, implementation: str,
         layer_paths: dict[str, str] | None = None) -> Plan:
    """Choose the modules the structured rules take.

    ``layer_paths`` maps module names to ``"generic"``, ``"gram"`` or ``"rows"`` to force
    a path (``"gram"``/``"rows"`` apply to weight terms that have both routes).
    """
    result = Plan()
    layer_paths = dict(layer_paths or {})
    for name, route in layer_paths.items():
        if route not in ROUTES:
            raise NTKError(f"layer_paths[{name!r}] = {route!r}; choose one of {ROUTES}.")
    if implementation == "generic":
        return result
    model = problem.model
    if any(isinstance(m, _STOCHASTIC) and m.training for m in model.modules()):
        return result
    uses: dict[int, int] = {}
    modules = list(model.named_modules())
    for _, module in modules:
        for p in module._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    for mname, module in modules:
        if not _supported(module) or layer_paths.get(mname) == "generic":
            continue
        own = {attr: p for attr, p in module._parameters.items() if p is not None}
        attrs = {}
        for attr, p in own.items():
            full = names.get(id(p))
            if full in problem.params and uses[id(p)] == 1:
                attrs[attr] = full
        if attrs:
            result.modules[mname] = module
            result.params[mname] = attrs
            if mname in layer_paths:
                result.forced[mname] = layer_paths[mname]
    return result


# --------------------------------------------------------------------------- capture

Calls = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # module -> [(input, output)]


class _InPlace(Exception):
    """A captured activation was modified in place after the hook saw it."""


def _forward(problem: Problem, plan: Plan, x: Any, n: int, name: str
             ) -> tuple[torch.Tensor, Calls]:
    """One batched forward with hooks: the model's (n, O) output and, per planned module,
    the (input, output) of each of its calls.

    The captured tensors are used as they are; a later in-place op on one of them
    (``ReLU(inplace=True)``, ``out += identity``) is detected by its version counter and
    the pass is redone with copies (remembered in ``plan``).

    (Channels-last inputs make oneDNN's convolution backward up to 5x faster for small
    channel counts, but the per-probe weight gradients then need contiguous copies of
    every map; measured on the benchmark's CNN and ResNet it was a wash in trace mode and
    25 % slower in target mode, so the model's own layout is kept.)"""
    try:
        return _forward_once(problem, plan, x, n, name)
    except _InPlace:
        plan.copy_outputs = True
    return _forward_once(problem, plan, x, n, name)


def _forward_once(problem: Problem, plan: Plan, x: Any, n: int, name: str
                  ) -> tuple[torch.Tensor, Calls]:
    copy = plan.copy_outputs
    calls: Calls = {m: [] for m in plan.modules}
    versions: list[tuple[torch.Tensor, int]] = []
    handles = []

    def hook(mname: str):
        def fn(module: nn.Module, args: tuple, out: Any) -> Any:
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                raise _Fallback(mname)
            if args[0].shape[:1] != (n,) or out.shape[:1] != (n,):
                raise _Fallback(mname)
            a = args[0].detach()
            if copy:
                # the clones absorb later in-place ops; `out` stays the graph node we need
                calls[mname].append((a.clone(), out))
                return out.clone()
            calls[mname].append((a, out))
            versions.extend(((a, a._version), (out, out._version)))
            return None
        return fn

    for mname, module in plan.modules.items():
        handles.append(module.register_forward_hook(hook(mname)))
    try:
        if problem.native:
            # the module's own parameters carry the graph; autograd.grad below asks only for
            # the cotangents of the captured outputs, so no .grad is ever written
            out = problem.as_matrix(problem.call(x))
        else:
            live = {name: t.detach().requires_grad_(True) if t.is_floating_point() else t
                    for name, t in problem.params.items()}
            out = problem.forward(problem.tensors(live), x)
    finally:
        for h in handles:
            h.remove()
    if any(t._version != v for t, v in versions):
        raise _InPlace
    if out.shape[0] != n:
        raise _Fallback("output rows")
    problem.check_outputs(out, name)
    return out, calls


def _bottoms(targets: list[torch.Tensor]) -> list[int]:
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


def _backward_rows(out: torch.Tensor, targets: list[torch.Tensor], cot: torch.Tensor,
                   consume: Callable[[int, int, torch.Tensor], None],
                   finish: Callable[[int], None]) -> None:
    """One backward a cotangent row r: ``consume(r, i, D)`` receives the cotangent D at
    captured output i from a tensor hook as soon as autograd has computed it, so it is
    used while hot and freed as the backward moves on (outputs the row does not reach get
    zeros); ``finish(r)`` closes the row. (``is_grads_batched`` would vmap the backward,
    but convolution backward has no batching rule: 1.2-1.5x slower than this loop.)"""
    k = cot.shape[1]
    grad_out = cot.transpose(0, 1)  # (k, n, O)
    inputs = [targets[i] for i in _bottoms(targets)]
    state = {"row": 0, "seen": set()}

    def hook(i: int) -> Callable[[torch.Tensor], None]:
        def fn(grad: torch.Tensor) -> None:
            state["seen"].add(i)
            consume(state["row"], i, grad)
        return fn

    handles = [z.register_hook(hook(i)) for i, z in enumerate(targets) if z.requires_grad]
    try:
        for r in range(k):
            state["row"], state["seen"] = r, set()
            if inputs:
                torch.autograd.grad(out, inputs, grad_out[r], allow_unused=True,
                                    retain_graph=r < k - 1)
            for i, z in enumerate(targets):
                if i not in state["seen"]:
                    consume(r, i, torch.zeros_like(z))
            finish(r)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- terms
# A term is one parameter (or one conv group of it) in a normal form over positions s:
#   ("outer", A (n, S, c), D (k, n, S, o))   gradient sum_s D_s a_s^T
#   ("token", T (n, S),    D (k, n, S, o))   gradient scatters D_s into row T_s
#   ("conv",  a (n, C, *sp), D (k, n, O, *sp')) a convolution weight, kept as maps
# and, with positions last so that channel-first maps are used without a copy:
#   ("sum",   None,        D (k, n, o, S))   gradient sum_s D_s
#   ("scale", X (n, o, S), D (k, n, o, S))   gradient sum_s D_s * x_s
#   ("bn",    a (n, o, S), D (k, n, o, S))   gradient r * sum_s D_s * (a_s - m) (eval
#                                            BatchNorm with one cotangent row: no xhat)
_ROWS_ONLY = ("sum", "scale", "bn")

@dataclass
class Term:
    kind: str
    key: str          # parameter full name (+ group suffix)
    data: torch.Tensor | None
    d: torch.Tensor
    extra: int = 0    # vocabulary size for tokens
    module: nn.Module | None = None  # the conv layer of a "conv" term
    # values that depend only on the layer input, shared by the terms of every cotangent
    # row of one call (normalised inputs, padded conv inputs, patches)
    memo: dict = field(default_factory=dict)


def _channels_last(t: torch.Tensor, lead: int) -> torch.Tensor:
    """(lead..., C, *spatial) -> (lead..., S, C)."""
    c = t.shape[lead]
    return t.reshape(t.shape[:lead + 1] + (-1,)).transpose(-1, -2).reshape(t.shape[:lead] + (-1, c))


def _conv_patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches (n, L, C_in * prod(kernel)), padding as the module does."""
    conv2d = isinstance(module, nn.Conv2d)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        a = F.pad(a, pad, mode=mode)
    if conv2d:
        kernel, dil, stride = module.kernel_size, module.dilation, module.stride
    else:
        a = a.unsqueeze(2)
        kernel = (1,) + tuple(module.kernel_size)
        dil = (1,) + tuple(module.dilation)
        stride = (1,) + tuple(module.stride)
    return F.unfold(a, kernel, dilation=dil, padding=0, stride=stride).transpose(1, 2)


def _positions_last(t: torch.Tensor, lead: int) -> torch.Tensor:
    """(lead..., C, *spatial) -> (lead..., C, S); a view for contiguous and channels-last
    maps alike."""
    return t.reshape(t.shape[:lead + 1] + (-1,))


def _normalised_input(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Normalised input of a norm layer as (n, C, S), C being the size of the affine
    parameters (a view where the layout allows)."""
    n = a.shape[0]
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
        return xhat.reshape(n, -1, _norm_width(module)).transpose(1, 2)
    if isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(a, module.num_groups, None, None, module.eps)
    else:  # BatchNorm in eval: a per-channel affine map of the running statistics
        # The module's own buffers may be float32 while the kernel is computed in float64.
        # (a - mean) * r, not a * r - mean * r as F.batch_norm does: no cancellation when
        # the mean is large against the spread.
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean = module.running_mean.to(a.dtype).reshape(shape)
        var = module.running_var.to(a.dtype).reshape(shape)
        xhat = (a - mean).mul_(torch.rsqrt(var + module.eps))
    return _positions_last(xhat, 1)


def _norm_width(module: nn.LayerNorm) -> int:
    width = 1
    for s in module.normalized_shape:
        width *= s
    return width


def _norm_cotangents(module: nn.Module, d: torch.Tensor) -> torch.Tensor:
    """Cotangents at a norm layer's output as (k, n, C, S), like its normalised input."""
    k, n = d.shape[:2]
    if isinstance(module, nn.LayerNorm):
        return d.reshape(k, n, -1, _norm_width(module)).transpose(2, 3)
    return _positions_last(d, 2)


def _terms(module: nn.Module, attrs: dict[str, str], a: torch.Tensor,
           d: torch.Tensor, memo: dict) -> list[Term]:
    """The terms of one module call; ``memo`` carries input-only values across the
    cotangent rows of the call."""
    k, n = d.shape[:2]
    terms: list[Term] = []
    if isinstance(module, nn.Linear):
        dd = d.reshape(k, n, -1, d.shape[-1])
        if "weight" in attrs and "bias" in attrs:
            # z = [W b] [a; 1]: one outer term on the input with a column of ones, so the
            # bias shares the cotangent Gram of the weight
            if "a1" not in memo:
                a2 = a.reshape(n, -1, a.shape[-1])
                memo["a1"] = torch.cat([a2, a2.new_ones(a2.shape[:2] + (1,))], dim=-1)
            terms.append(Term("outer", attrs["weight"], memo["a1"], dd))
        elif "weight" in attrs:
            terms.append(Term("outer", attrs["weight"], a.reshape(n, -1, a.shape[-1]), dd))
        elif "bias" in attrs:
            terms.append(Term("sum", attrs["bias"], None, dd.transpose(2, 3)))
    elif isinstance(module, _CONV):
        if "weight" in attrs:
            # Kept as (input, cotangent) maps: the rows route never unfolds the input.
            terms.append(Term("conv", attrs["weight"], a, d, module=module, memo=memo))
        if "bias" in attrs:
            terms.append(Term("sum", attrs["bias"], None, _positions_last(d, 2)))
    elif isinstance(module, _NORM):
        dd = _norm_cotangents(module, d)
        if ("weight" in attrs and memo.get("rows") == 1
                and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            # One row: (a - m) * D summed, scaled by r afterwards -- one temporary instead
            # of the normalised input and a product.
            terms.append(Term("bn", attrs["weight"], _positions_last(a, 1), dd, module=module))
        elif "weight" in attrs:
            if "xhat" not in memo:
                memo["xhat"] = _normalised_input(module, a)
            xhat = memo["xhat"]
            terms.append(Term("scale", attrs["weight"], xhat, dd))
        if "bias" in attrs:
            terms.append(Term("sum", attrs["bias"], None, dd))
    elif isinstance(module, nn.Embedding):
        tokens = a.reshape(n, -1).long()
        dd = d.reshape(k, n, -1, d.shape[-1])
        if module.padding_idx is not None:
            if "keep" not in memo:
                memo["keep"] = (tokens != module.padding_idx).unsqueeze(0).unsqueeze(-1).to(dd.dtype)
            dd = dd * memo["keep"]
        terms.append(Term("token", attrs["weight"], tokens, dd, extra=module.num_embeddings))
    return terms


def _conv_outer(term: Term) -> list[Term]:
    """A conv weight term as linear maps on unfolded input patches, one a group:
    ``z_l = W_g p_l`` with p_l the patch under output position l."""
    module, d = term.module, term.d
    k, n = d.shape[:2]
    if "patches" not in term.memo:
        term.memo["patches"] = _conv_patches(module, term.data)
    patches = term.memo["patches"]  # (n, L, C_in * kk)
    dd = _channels_last(d, 2)  # (k, n, L, C_out)
    g = module.groups
    if g == 1:
        return [Term("outer", term.key, patches, dd)]
    pg = patches.reshape(n, patches.shape[1], g, -1)
    dg = dd.reshape(k, n, dd.shape[2], g, -1)
    return [Term("outer", f"{term.key}#{gi}", pg[:, :, gi], dg[:, :, :, gi]) for gi in range(g)]


# Up to this many entries per patch (C_in/groups * kernel volume, e.g. a 3-channel stem
# 3x3 conv), per-probe conv weight gradients of several cotangent rows come from unfolded
# patches (unfolded once) and one batched matmul a row; beyond it the unfolded input gets
# too large and a grouped convolution backward is faster (measured on CPU, per row: 3.5x
# faster for a 3->16 3x3 stem, 2x slower for 16->16 3x3; with one row the unfold itself
# costs as much as the grouped backward). Pointwise convs need no unfold at all.
_UNFOLD_MAX_PATCH = 64


def _pointwise(module: nn.Module) -> bool:
    return (all(s == 1 for s in module.kernel_size) and not isinstance(module.padding, str)
            and not any(module.padding))


def _conv_rows(term: Term) -> torch.Tensor:
    """Per-probe conv weight gradients, (n, k, P): for pointwise convs, and for small
    patches when several cotangent rows share the input (``memo["rows"]``), a batched
    matmul of the cotangents with the (unfolded) input; otherwise one grouped convolution
    backward (the probes become groups), much faster than unfolding a wide input."""
    module, a, d, memo = term.module, term.data, term.d, term.memo
    k, n, c_out = d.shape[:3]
    pointwise = _pointwise(module)
    shared = memo.get("rows", 1) > 1
    if module.groups == 1 and (pointwise or (shared and _term_size(term)[3] <= _UNFOLD_MAX_PATCH)):
        if "patches" not in memo:
            if pointwise:  # the patches are the strided input itself: (n, L, C_in) view
                sub = a[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in module.stride)]
                memo["patches"] = sub.reshape(n, a.shape[1], -1).transpose(1, 2)
            else:
                memo["patches"] = _conv_patches(module, a)  # (n, L, C_in * kk)
        patches = memo["patches"]
        rows = [torch.bmm(d[j].reshape(n, c_out, -1), patches).reshape(n, 1, -1)
                for j in range(k)]
        return rows[0] if k == 1 else torch.cat(rows, dim=1)
    dims = a.dim() - 2
    if "x" not in memo:
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            memo["padding"] = list(module.padding)
        else:
            pad = module._reversed_padding_repeated_twice
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            a = F.pad(a, pad, mode=mode) if any(pad) else a
            memo["padding"] = [0] * dims
        # (a copy for channels-last maps: the grouped kernel is 3x slower on them)
        memo["x"] = a.reshape((1, n * a.shape[1]) + tuple(a.shape[2:])).contiguous()
    x, padding = memo["x"], memo["padding"]
    c_in, g = x.shape[1] // n, module.groups
    # only the shape of the weight matters for the weight gradient
    w = a.new_empty((n * c_out, c_in // g) + tuple(module.kernel_size))
    rows = []
    for j in range(k):
        go = d[j].reshape((1, n * c_out) + tuple(d.shape[3:])).contiguous()
        gw = torch.ops.aten.convolution_backward(
            go, x, w, None, list(module.stride), padding, list(module.dilation), False,
            [0] * dims, n * g, [False, True, False])[1]
        rows.append(gw.reshape(n, 1, -1))
    return rows[0] if k == 1 else torch.cat(rows, dim=1)


def _merge(terms: list[Term]) -> dict[str, Term]:
    """Repeated calls of one module become extra positions of one term."""
    counts: dict[str, int] = {}
    for t in terms:
        counts[t.key] = counts.get(t.key, 0) + 1
    flat: list[Term] = []
    for t in terms:
        flat.extend(_conv_outer(t) if t.kind == "conv" and counts[t.key] > 1 else [t])
    terms = flat
    merged: dict[str, Term] = {}
    for t in terms:
        if t.key not in merged:
            merged[t.key] = t
            continue
        m = merged[t.key]
        # positions are dim 1 of the data and dim 2 of D, or the last dim of both
        last = t.kind in _ROWS_ONLY
        data = None if t.data is None else torch.cat([m.data, t.data], dim=-1 if last else 1)
        merged[t.key] = Term(t.kind, t.key, data, torch.cat([m.d, t.d], dim=-1 if last else 2),
                             t.extra, t.module)
    return merged


# --------------------------------------------------------------------------- routes

def _rows(term: Term) -> torch.Tensor:
    """Per-probe gradient rows of a term, (n, k, P_term)."""
    if term.kind == "conv":
        return _conv_rows(term)
    d = term.d
    k, n = d.shape[:2]
    if term.kind == "sum":
        r = d.sum(-1)
    elif term.kind == "scale":
        r = (d * term.data).sum(-1)
    elif term.kind == "bn":
        m = term.module
        mean = m.running_mean.to(d.dtype).reshape(-1, 1)
        rstd = torch.rsqrt(m.running_var.to(d.dtype) + m.eps)
        r = torch.stack([(term.data - mean).mul_(d[j]).sum(-1) for j in range(k)]) * rstd
    elif term.kind == "outer":
        r = torch.einsum("kiso,isc->kioc", d, term.data).reshape(k, n, -1)
    else:  # token: scatter into (vocab, dim) rows
        onehot = F.one_hot(term.data, term.extra).to(d.dtype)  # (n, S, V)
        r = torch.einsum("kiso,isv->kivo", d, onehot).reshape(k, n, -1)
    return r.transpose(0, 1)


def _flat_cotangents(d: torch.Tensor) -> torch.Tensor:
    """(k, n, S, o) -> (n, S, k, o), contiguous: a block of probes is then a view whose
    rows are (probe, position) and whose columns are (cotangent row, output). No copy
    for terms stacked probe-major (:func:`_stack_rows`)."""
    return d.permute(1, 2, 0, 3).contiguous()


def _add_term_gram(out: torch.Tensor, t1: Term, t2: Term, mode: str, budget: int,
                   itemsize: int, symmetric: bool) -> None:
    """``out +=`` the kernel of an outer/token term by the Gram route, blocked over probes
    of set 1; a self-kernel (``symmetric``) only on upper panels (:mod:`.symmetric`).

    ``K[i, j] = sum_{s,t} (D_is . D_jt) (a_is . a_jt)``; trace mode sums the cotangent
    rows inside the first factor (one product over the (row, output) axis); full mode
    keeps them, ``K[i, j, p, q] = sum_{s,t} (D_isp . D_jtq) (a_is . a_jt)``.
    """
    k, n1, s1, o = t1.d.shape
    n2, s2 = t2.d.shape[1], t2.d.shape[2]
    d1 = _flat_cotangents(t1.d)
    d2 = d1 if t2 is t1 else _flat_cotangents(t2.d)
    per_row = n2 * s1 * s2 * itemsize * (3 + (k * k if mode == "full" else 0))
    rows_max = max(1, budget // max(1, per_row))
    if symmetric:
        rows_max = min(rows_max, panel_rows(n1))
    full = mode == "full"
    width = o if full else k * o
    for sl in blocks(n1, rows_max):
        cols = columns(sl, n2, symmetric)
        h, m = sl.stop - sl.start, cols.stop - cols.start
        dg = d1[sl].reshape(-1, width) @ d2[cols].reshape(-1, width).T
        if t1.kind == "outer":
            c = t1.data.shape[-1]
            ag = t1.data[sl].reshape(-1, c) @ t2.data[cols].reshape(-1, c).T
        else:
            ag = (t1.data[sl].reshape(-1, 1) == t2.data[cols].reshape(1, -1)).to(dg.dtype)
        target = out[sl, cols]
        if full:
            dg = dg.reshape(h, s1, k, m, s2, k)
            target += torch.einsum("isjt,isajtb->ijab", ag.reshape(h, s1, m, s2), dg)
        elif s1 == 1 and s2 == 1:
            target.addcmul_(dg, ag)
        else:
            target += (ag.mul_(dg)).reshape(h, s1, m, s2).sum(dim=(1, 3))


def _term_size(term: Term) -> tuple[int, int, int, int, int]:
    """(k rows, S positions, o outputs, c inputs, P parameters) of a term."""
    if term.kind == "conv":
        m = term.module
        k, o = term.d.shape[0], term.d.shape[2]
        s = 1
        for size in term.d.shape[3:]:
            s *= size
        c = term.data.shape[1] // m.groups
        for size in m.kernel_size:
            c *= size
        return k, s, o, c, o * c
    if term.kind in _ROWS_ONLY:
        k, _, o, s = term.d.shape
        return k, s, o, 1, o
    k, _, s, o = term.d.shape
    if term.kind == "outer":
        c = term.data.shape[-1]
        return k, s, o, c, o * c
    if term.kind == "token":
        return k, s, o, 1, o * term.extra
    return k, s, o, 1, o


def _rows_bytes(term: Term, k: int, n_all: int, itemsize: int) -> int:
    p = _term_size(term)[4]
    return n_all * k * p * itemsize


def _choose(term: Term, k: int, n1: int, n2: int | None, mode: str, budget: int,
            itemsize: int, forced: str | None) -> str:
    """Cost model for a term with ``k`` cotangent rows: flops of each route; the rows route
    only while its rows fit ``budget``."""
    if term.kind in _ROWS_ONLY:
        return "rows"
    _, s, o, c, p = _term_size(term)
    pairs = {"target": 1, "sum": 1, "trace": k, "full": k * k}[mode]
    n_all = n1 + (n2 if n2 is not None else 0)
    nn2 = n1 * (n2 if n2 is not None else n1)
    if forced in ("gram", "rows"):
        return forced
    linear = term.kind in ("outer", "conv")
    build = k * n_all * s * (o * c if linear else p)
    rows_flops = 2 * build + 2 * pairs * nn2 * p
    gram_flops = 2 * nn2 * s * s * ((c if linear else 1) + k * o + pairs)
    if _rows_bytes(term, k, n_all, itemsize) > budget:
        return "gram"
    return "rows" if rows_flops <= gram_flops else "gram"


# --------------------------------------------------------------------------- driver

# Gram-route outer/token cotangents are stacked probe-major -- (n, S, k, o) in memory,
# seen as (k, n, S, o) -- which is the layout their Gram products read
# (:func:`_flat_cotangents`), so the stacking copy is the only one.
_PROBE_MAJOR = ("outer", "token")


def _stack_rows(parts: list[Term]) -> Term:
    """One term from the per-row terms of one chunk: D stacked to (k, n, ...)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if first.kind in _PROBE_MAJOR:
        d = torch.stack([p.d[0] for p in parts], dim=2).permute(2, 0, 1, 3)
    else:
        d = torch.cat([p.d for p in parts])
    return Term(first.kind, first.key, first.data, d, first.extra, first.module, first.memo)


def _join_chunks(parts: list[Term]) -> Term:
    first = parts[0]
    if len(parts) == 1:
        return first
    data = None if first.data is None else torch.cat([p.data for p in parts])
    if first.kind in _PROBE_MAJOR:
        d = torch.cat([p.d.permute(1, 2, 0, 3) for p in parts]).permute(2, 0, 1, 3)
    else:
        d = torch.cat([p.d for p in parts], dim=1)
    return Term(first.kind, first.key, data, d, first.extra, first.module)


def compute(problem: Problem, plan: Plan, keys: dict[str, list[str]],
            budget: int) -> dict[str, torch.Tensor]:
    """Kernel contributions of the planned parameters, by layer key.

    The trial forward's activation size chunks the capture passes over probes within the
    budget; the first chunk fixes every term's route. Rows-route terms are
    turned into per-probe gradient rows chunk by chunk, so their activations and
    cotangents never exist for all probes at once; Gram-route terms keep theirs (small
    for the layers where that route wins). Raises ``_Fallback`` (caught by the caller)
    when a structural assumption fails.
    """
    mode = problem.mode
    itemsize = problem.itemsize()
    n_all = problem.n1 + (problem.n2 or 0)
    key_of = {name: key for key, names in keys.items() for name in names}
    module_of = {full: m for m, attrs in plan.params.items() for full in attrs.values()}

    # A capture pass holds the graph's activations, one row of cotangents and the
    # backward's buffers at a time (~6 activation sizes), plus the stacked cotangents of
    # Gram-route terms (at most one activation size a row).
    k = problem.cot1.shape[1]
    per_probe = max(1, problem.activation_numel * (6 + k) * itemsize)
    chunk = max(1, min(n_all, budget // (2 * per_probe)))
    routes: dict[str, str] = {}
    rows_left = budget

    def route(name: str, term: Term) -> str:
        nonlocal rows_left
        if name not in routes:
            param = name.split("#")[0]
            routes[name] = _choose(term, k, problem.n1, problem.n2, mode, rows_left, itemsize,
                                   plan.forced.get(module_of[param]))
            if routes[name] == "rows":
                rows_left -= _rows_bytes(term, k, n_all, itemsize)
        return routes[name]

    # Each rows-route term owns a fixed slice of its key's rows: rows are written in place
    # into one (n, k, P_key) buffer a key, never concatenated.
    slots: dict[str, tuple[str, int, int]] = {}  # term name -> (key, start, stop)
    widths: dict[str, int] = {}                   # key -> P of its rows-route terms

    def collect(x: Any, cot: torch.Tensor, n: int, label: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, Term]]:
        bufs: dict[str, torch.Tensor] = {}
        gram: dict[str, list[Term]] = {}
        layout: list[str] | None = None
        for sl in blocks(n, chunk):
            out, calls = _forward(problem, plan, B.take(x, sl), sl.stop - sl.start, label)
            entries = [(m, i, a, z) for m, lst in calls.items() for i, (a, z) in enumerate(lst)]
            memos = {(m, i): {"rows": k} for m, i, _, _ in entries}
            repeated = {m for m, lst in calls.items() if len(lst) > 1}
            held: dict[int, torch.Tensor] = {}   # cotangents of repeated modules' calls
            seen: list[str] = []                 # term names of the current row
            pending: list[tuple[int, str, torch.Tensor]] = []  # rows before bufs exist
            gram_parts: dict[str, list[Term]] = {}

            def take(r: int, name: str, term: Term) -> None:
                seen.append(name)
                if term.kind not in _ROWS_ONLY and route(name, term) != "rows":
                    gram_parts.setdefault(name, []).append(term)
                    return
                part = _rows(term)[:, 0]  # (n_chunk, P_term)
                if name not in slots:
                    key = key_of[name.split("#")[0]]
                    start = widths.get(key, 0)
                    slots[name] = (key, start, start + part.shape[1])
                    widths[key] = start + part.shape[1]
                if bufs:
                    key, start, stop = slots[name]
                    bufs[key][sl, r, start:stop] = part
                else:
                    pending.append((r, name, part))

            def terms_of(idx: int, grad: torch.Tensor) -> list[Term]:
                mname, i, a, _ = entries[idx]
                return _terms(plan.modules[mname], plan.params[mname], a,
                              grad.detach().unsqueeze(0), memos[mname, i])

            def consume(r: int, idx: int, grad: torch.Tensor) -> None:
                if entries[idx][0] in repeated:  # merged with its other calls at the row's end
                    held[idx] = grad
                    return
                for term in terms_of(idx, grad):
                    take(r, term.key, term)

            def finish(r: int) -> None:
                nonlocal layout, bufs
                if held:
                    terms = [t for idx in sorted(held) for t in terms_of(idx, held[idx])]
                    held.clear()
                    for name, term in _merge(terms).items():
                        take(r, name, term)
                names = sorted(seen)
                seen.clear()
                if layout is None:
                    layout = names
                elif names != layout:
                    raise _Fallback("data-dependent layers")
                if not bufs:
                    bufs = {key: torch.empty((n, k, width), dtype=problem.dtype,
                                             device=problem.device)
                            for key, width in widths.items()}
                    for row, name, part in pending:
                        key, start, stop = slots[name]
                        bufs[key][sl, row, start:stop] = part
                    pending.clear()

            # Cotangents are turned into rows inside the backward, one cotangent row at a
            # time: none is stacked, and each is freed right after its layer is done.
            _backward_rows(out, [z for _, _, _, z in entries], cot[sl], consume, finish)
            del out, calls, entries
            for name, parts in gram_parts.items():
                gram.setdefault(name, []).append(_stack_rows(parts))
        return bufs, {name: _join_chunks(parts) for name, parts in gram.items()}

    rows1, gram1 = collect(problem.x1, problem.cot1, problem.n1, "inputs")
    rows2, gram2 = (collect(problem.x2, problem.cot2, problem.n2, "inputs2")
                    if problem.cross else (rows1, gram1))
    plan.routes.update(routes)
    symmetric = not problem.cross
    shape = output_shape(problem)
    result: dict[str, torch.Tensor] = {}

    def acc(key: str) -> torch.Tensor:
        if key not in result:
            result[key] = torch.zeros(shape, dtype=problem.dtype, device=problem.device)
        return result[key]

    for key, j1 in rows1.items():
        add_gram(acc(key), mode, j1, None if symmetric else rows2[key])
    for name, t1 in gram1.items():
        t2 = gram2[name]
        pairs = zip(_conv_outer(t1), _conv_outer(t2)) if t1.kind == "conv" else [(t1, t2)]
        for a1, a2 in pairs:
            _add_term_gram(acc(key_of[name.split("#")[0]]), a1, a1 if symmetric else a2,
                           mode, budget, itemsize, symmetric)
    if symmetric:
        for value in result.values():
            mirror_lower(value)
    return result


__all__ = ["Plan", "plan", "compute", "ROUTES"]
