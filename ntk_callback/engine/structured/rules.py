"""The rule table: which module types have a structured rule, and what each rule computes.

A rule turns one call of a module -- its positional and keyword inputs and the
cotangent at its output -- into kernel terms (:mod:`.terms`) for the parameters it
covers. Rules are looked up by module class along the MRO, but a subclass that overrides
``forward`` does not inherit its parent's rule (its call is no longer the one the rule
describes); register the subclass itself if its rule is known::

    from ntk_callback.engine import register_rule, Rule, OuterTerm

    @register_rule(MyDense)
    class MyDenseRule(Rule):
        params = ("kernel",)
        def terms(self, module, attrs, call, d, memo):
            a = call.args[0]
            n, k = a.shape[0], d.shape[0]
            return [OuterTerm(attrs["kernel"], a.reshape(n, -1, a.shape[-1]),
                              d.reshape(k, n, -1, d.shape[-1]))]

Whatever a rule claims is verified: the planner takes a parameter only when every use of
it in the forward happens inside its module's own call, and the self-check compares the
rule's gradients with autograd's, so a wrong rule costs speed, never a wrong kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .terms import (
    PAD_MODES,
    BatchNormTerm,
    BiasedOuterTerm,
    ConvTerm,
    GroupedConvTerm,
    Memo,
    OuterTerm,
    ScaleTerm,
    SumTerm,
    Term,
    TokenTerm,
    cached,
    expect,
    grouped_rows_fit,
)


@dataclass
class Call:
    """One call of a module: its inputs as passed to ``forward`` and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    # other output tensors the rule does not follow: their cotangent must be zero
    unfollowed: tuple[torch.Tensor, ...] = ()


class Rule:
    """Structured kernel terms of one module type.

    ``params``: the parameter attribute names the rule computes (others of the module
    take the exact generic path). ``terms`` receives the module, ``attrs`` (attribute ->
    full parameter name, the covered and trainable ones), the call, the cotangent ``d``
    at the call's output (shape ``(k, n, *output.shape[1:])``) and a ``memo`` dict
    shared by the cotangent rows of the call (for values that depend on the input only).
    """

    params: ClassVar[tuple[str, ...]] = ("weight", "bias")
    # parameters whose per-probe rows the rule writes in the parameter's own (row-major)
    # layout, unfolded: a parameter tied between modules whose rules all list it is
    # covered by summing the rows of its uses
    tieable: ClassVar[tuple[str, ...]] = ()

    def output(self, out: Any) -> Any:
        """The tensor of the call's output whose cotangent the rule needs (the output
        itself by default; e.g. the attention output of ``nn.MultiheadAttention``'s
        tuple). Cotangents reaching other parts of the output are not seen by the rule:
        the self-check catches a model that uses them."""
        return out

    def unfollowed(self, out: Any) -> tuple[torch.Tensor, ...]:
        """Tensors of the output the rule's terms ignore; a nonzero cotangent at one of
        them sends the module to the exact path."""
        return ()

    def supports(self, module: nn.Module) -> bool:
        """Whether this instance's configuration is covered."""
        return True

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        """Whether a recorded call is covered: by default one tensor input batched along
        dim 0 and a tensor output batched along dim 0, no keyword arguments."""
        return (len(call.args) == 1 and not call.kwargs
                and isinstance(call.args[0], torch.Tensor) and call.args[0].dim() >= 1
                and call.args[0].shape[0] == n
                and isinstance(call.output, torch.Tensor) and call.output.dim() >= 1
                and call.output.shape[0] == n)

    def broadcasts(self, module: nn.Module, call: Call, n: int) -> bool:
        """Whether a call that :meth:`accepts` refuses is a *broadcast call*: one tensor
        input and output of batch size 1 where the batch has ``n > 1`` probes (e.g.
        Hugging Face's ``position_ids`` of shape (1, S)), whose output the model adds to
        per-probe tensors. The capture pass then expands input and output to ``n`` (the
        same values, one copy a probe), so each probe's cotangent reaches its own copy.
        Whether the model really treats the copies as one a probe is not proven by the
        planner: such calls are taken only with the self-check on, which compares the
        rows with autograd. Default: no (a rule opts in)."""
        return False

    def expand(self, args: tuple[Any, ...], out: Any, n: int) -> tuple[tuple[Any, ...], Any]:
        """A broadcast call's input and output as ``n`` copies (expanded views, the same
        values): by default batch size 1 expanded to ``n``."""
        return (args[0].expand(n, *args[0].shape[1:]),), out.expand(n, *out.shape[1:])

    def for_calls(self, module: nn.Module, calls: list[Call], n: int) -> Rule:
        """The rule for a module whose recorded calls (trial batch of ``n`` probes) are
        ``calls``: this one, or a variant fixed to a form seen in them."""
        return self

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        raise NotImplementedError


def broadcast_call(call: Call, n: int) -> bool:
    """One tensor input and one tensor output, both of batch size 1 (dim >= 2), no keyword
    arguments, for a batch of ``n > 1`` probes."""
    return (n > 1 and len(call.args) == 1 and not call.kwargs
            and isinstance(call.args[0], torch.Tensor) and call.args[0].dim() >= 2
            and call.args[0].shape[0] == 1
            and isinstance(call.output, torch.Tensor) and call.output.dim() >= 2
            and call.output.shape[0] == 1)


_RULES: dict[type, Rule] = {}
R = TypeVar("R", bound=Rule)


def register_rule(*module_types: type) -> Callable[[type[R]], type[R]]:
    """Class decorator: use this :class:`Rule` for modules of ``module_types`` (and their
    subclasses that keep the parent's ``forward``). A later registration replaces an
    earlier one for the same type."""
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module)
                                   for t in module_types):
        raise TypeError("register_rule takes nn.Module subclasses, e.g. "
                        "@register_rule(nn.Linear).")

    def deco(cls: type[R]) -> type[R]:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"@register_rule decorates a Rule subclass, got {cls!r}.")
        instance = cls()
        for t in module_types:
            _RULES[t] = instance
        return cls

    return deco


# Rules for classes of optional packages, keyed by (module, qualified name) so that the
# package is never imported here; registered the first time such a module is met.
_LAZY_RULES: dict[tuple[str, str], type[Rule]] = {}


def rule_for(module: nn.Module) -> Rule | None:
    """The rule covering ``module``, or None. The nearest registered class in the MRO
    counts only if ``module``'s ``forward`` is that class's ``forward``."""
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base)
        lazy = _LAZY_RULES.get((base.__module__, base.__qualname__))
        if rule is None and lazy is not None:
            rule = _RULES[base] = lazy()
        if rule is None:
            continue
        if getattr(cls, "forward", None) is not getattr(base, "forward", None):
            return None
        return rule if rule.supports(module) else None
    return None


def registered_types() -> tuple[type, ...]:
    return tuple(_RULES)


# --------------------------------------------------------------------------- built-ins

@register_rule(nn.Linear)
class LinearRule(Rule):
    """``z = a W^T + b`` over any leading positions: weight ``sum_s D_s a_s^T``, bias
    ``sum_s D_s``; with both, one outer term on ``[a; 1]`` so the bias shares the
    cotangent Gram of the weight (not for a tied weight, whose rows are summed with
    another module's)."""

    tieable = ("weight",)

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        # (a leaf: weight and bias share one per-layer key, and one term)
        leaf = next(module.children(), None) is None
        return linear_terms(attrs, "weight", "bias", "", call.args[0], d, memo, fold=leaf)


def linear_terms(attrs: dict[str, str], weight: str, bias: str, tag: str, a: torch.Tensor,
                 d: torch.Tensor, memo: Memo, fold: bool = True) -> list[Term]:
    """Terms of ``z = a W^T + b`` for inputs a (n, ..., c) and cotangents d (k, n, ..., o):
    an outer term on ``a`` for ``attrs[weight]`` and a sum term for ``attrs[bias]``, or
    with ``fold`` and both covered one outer term on ``[a; 1]``
    (:class:`.terms.BiasedOuterTerm`, the ones column appended only where a route needs
    it). ``tag`` suffixes the term names."""
    k, n = d.shape[:2]
    dd = d.reshape(k, n, -1, d.shape[-1])
    tied = memo.get("tied")
    if weight in attrs and isinstance(tied, (set, frozenset)) and attrs[weight] in tied:
        fold = False  # its rows are summed with other modules': (o, c), no bias column
    if fold and weight in attrs and bias in attrs:
        return [BiasedOuterTerm(attrs[weight] + tag, a.reshape(n, -1, a.shape[-1]), dd,
                                memo=memo)]
    out: list[Term] = []
    if weight in attrs:
        out.append(OuterTerm(attrs[weight] + tag, a.reshape(n, -1, a.shape[-1]), dd))
    if bias in attrs:
        out.append(SumTerm(attrs[bias] + tag, None, dd.transpose(2, 3)))
    return out


def _positions_last(t: torch.Tensor, lead: int) -> torch.Tensor:
    """(lead..., C, *spatial) -> (lead..., C, S); a view for contiguous and channels-last
    maps alike."""
    return t.reshape(t.shape[:lead + 1] + (-1,))


class TransposedLinearRule(Rule):
    """Hugging Face's ``Conv1D`` (GPT-2, OpenAI GPT): ``z = addmm(b, a, W)`` with ``W``
    stored (in, out), i.e. a Linear layer with a transposed weight. A kernel only needs
    inner products of per-probe gradients, which do not depend on the order of a
    parameter's entries, so the Linear terms apply as they are (rows in (out, in) order)."""

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        leaf = next(module.children(), None) is None
        return linear_terms(attrs, "weight", "bias", "", call.args[0], d, memo, fold=leaf)


_LAZY_RULES[("transformers.pytorch_utils", "Conv1D")] = TransposedLinearRule


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Convolution weight as maps (rows by a grouped backward or a batched matmul; Gram
    route on unfolded patches), bias ``sum_s D_s``. Grouped and depthwise convs whose
    per-probe rows are small take the rows route only (:class:`.terms.GroupedConvTerm`)."""

    def supports(self, module: nn.Module) -> bool:
        return expect(module, _ConvNd).padding_mode in PAD_MODES

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        # an unbatched (C, L) input to Conv1d has no probe dimension
        return super().accepts(module, call, n) and call.args[0].dim() == call.output.dim() >= 3

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        out: list[Term] = []
        if "weight" in attrs:
            m = expect(module, _ConvNd)
            rows = memo.get("rows", 1)
            grouped = grouped_rows_fit(m, rows if isinstance(rows, int) else 1,
                                       d.element_size())
            kind = GroupedConvTerm if grouped else ConvTerm
            out.append(kind(attrs["weight"], call.args[0], d, module, memo))
        if "bias" in attrs:
            out.append(SumTerm(attrs["bias"], None, _positions_last(d, 2)))
        return out


def _norm_width(module: nn.LayerNorm) -> int:
    width = 1
    for s in module.normalized_shape:
        width *= s
    return width


class _NormRule(Rule):
    """Affine weight ``sum_s D_s * xhat_s`` with ``xhat`` the normalised input, bias
    ``sum_s D_s`` (channel-first, positions last)."""

    def normalised(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cotangents(self, module: nn.Module, d: torch.Tensor) -> torch.Tensor:
        return _positions_last(d, 2)

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        dd = self.cotangents(module, d)
        out: list[Term] = []
        if "weight" in attrs:
            xhat = cached(memo, "xhat", lambda: self.normalised(module, call.args[0]))
            out.append(ScaleTerm(attrs["weight"], xhat, dd))
        if "bias" in attrs:
            out.append(SumTerm(attrs["bias"], None, dd))
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    def supports(self, module: nn.Module) -> bool:
        return expect(module, nn.LayerNorm).elementwise_affine

    def normalised(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        m = expect(module, nn.LayerNorm)
        n = a.shape[0]
        xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
        return xhat.reshape(n, -1, _norm_width(m)).transpose(1, 2)

    def cotangents(self, module: nn.Module, d: torch.Tensor) -> torch.Tensor:
        k, n = d.shape[:2]
        return d.reshape(k, n, -1, _norm_width(expect(module, nn.LayerNorm))).transpose(2, 3)


@register_rule(nn.GroupNorm)
class GroupNormRule(_NormRule):
    def supports(self, module: nn.Module) -> bool:
        return expect(module, nn.GroupNorm).affine

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        return super().accepts(module, call, n) and call.args[0].dim() >= 2

    def normalised(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        m = expect(module, nn.GroupNorm)
        xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
        return _positions_last(xhat, 1)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(_NormRule):
    """Eval-mode BatchNorm with running statistics: a per-channel affine map."""

    def supports(self, module: nn.Module) -> bool:
        m = expect(module, _BatchNorm)
        return (m.affine and m.track_running_stats
                and m.running_mean is not None and not m.training)

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        return super().accepts(module, call, n) and call.args[0].dim() >= 2

    def normalised(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        # The module's own buffers may be float32 while the kernel is computed in float64;
        # (a - mean) * r, not a * r - mean * r as F.batch_norm does: no cancellation.
        m = expect(module, _BatchNorm)
        if m.running_mean is None or m.running_var is None:
            raise TypeError("eval BatchNorm without running statistics")
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean = m.running_mean.to(a.dtype).reshape(shape)
        var = m.running_var.to(a.dtype).reshape(shape)
        return _positions_last((a - mean).mul_(torch.rsqrt(var + m.eps)), 1)

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        if "weight" in attrs and memo.get("rows") == 1:
            dd = self.cotangents(module, d)
            out: list[Term] = [BatchNormTerm(attrs["weight"], _positions_last(call.args[0], 1),
                                             dd, module)]
            if "bias" in attrs:
                out.append(SumTerm(attrs["bias"], None, dd))
            return out
        return super().terms(module, attrs, call, d, memo)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """``K[i,j] = sum_{s,t} [tok_is = tok_jt] (D_is . D_jt)``; ``padding_idx`` rows get no
    gradient; ``max_norm`` (which renormalises the weight in place) is not covered."""

    params = ("weight",)
    tieable = ("weight",)

    def supports(self, module: nn.Module) -> bool:
        # max_norm renormalises the weight in place; scale_grad_by_freq makes autograd
        # return a rescaled, batch-dependent gradient instead of the derivative
        m = expect(module, nn.Embedding)
        return m.max_norm is None and not m.scale_grad_by_freq

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        return super().accepts(module, call, n) and not call.args[0].is_floating_point()

    def broadcasts(self, module: nn.Module, call: Call, n: int) -> bool:
        # position / token-type ids of shape (1, S) shared by every probe
        return broadcast_call(call, n) and not call.args[0].is_floating_point()

    def for_calls(self, module: nn.Module, calls: list[Call], n: int) -> Rule:
        # ids without a batch dimension, the same shape at every call (position ids
        # ``arange(S)`` of shape (S,)): :class:`UnbatchedEmbeddingRule` for that shape
        shapes = {tuple(c.args[0].shape) for c in calls
                  if len(c.args) == 1 and not c.kwargs and isinstance(c.args[0], torch.Tensor)}
        if n < 2 or len(shapes) != 1 or not all(_unbatched(c, n) for c in calls):
            return self
        return UnbatchedEmbeddingRule(shapes.pop())

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        k, n = d.shape[:2]
        tokens = call.args[0].reshape(n, -1).long()
        dd = d.reshape(k, n, -1, d.shape[-1])
        pad = expect(module, nn.Embedding).padding_idx
        if pad is not None:
            dd = dd * cached(memo, "keep",
                             lambda: (tokens != pad).unsqueeze(0).unsqueeze(-1).to(dd.dtype))
        return [TokenTerm(attrs["weight"], tokens, dd, module)]


def _unbatched(call: Call, n: int) -> bool:
    """An embedding call on integer ids without a batch dimension (e.g. ``(S,)`` position
    ids) in a trial forward of ``n > 1`` probes: one input whose first size is neither
    ``n`` nor (as in a batch-size-1 broadcast call) 1 with more axes, the output of shape
    ``ids.shape + (dim,)``."""
    ids, out = call.args[0], call.output
    return (len(call.args) == 1 and not call.kwargs and isinstance(ids, torch.Tensor)
            and not ids.is_floating_point() and ids.dim() >= 1 and ids.shape[0] != n
            and not broadcast_call(call, n) and isinstance(out, torch.Tensor)
            and out.dim() == ids.dim() + 1 and tuple(out.shape[:-1]) == tuple(ids.shape))


class UnbatchedEmbeddingRule(EmbeddingRule):
    """An embedding every call of which the trial forward saw on the same ids of shape
    ``shape`` with no batch dimension (plain position embeddings ``pos(arange(S))``, whose
    (S, dim) output the model adds to every probe's (S, dim) tokens). A broadcast call of
    a particular kind: the capture pass gives each probe its own copy, ids ``(n, *shape)``
    and output ``(n, *shape, dim)`` (expanded views), so each probe's cotangent reaches
    its copy; taken only with the self-check on, like every broadcast call. The form is
    fixed by the trial forward, not read off a chunk's shapes: a chunk of exactly S probes
    is never taken for a batched call."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        return False

    def broadcasts(self, module: nn.Module, call: Call, n: int) -> bool:
        return (len(call.args) == 1 and not call.kwargs
                and isinstance(call.args[0], torch.Tensor)
                and tuple(call.args[0].shape) == self.shape
                and not call.args[0].is_floating_point()
                and isinstance(call.output, torch.Tensor)
                and tuple(call.output.shape[:-1]) == self.shape)

    def expand(self, args: tuple[Any, ...], out: Any, n: int) -> tuple[tuple[Any, ...], Any]:
        return ((args[0].unsqueeze(0).expand(n, *self.shape),),
                out.unsqueeze(0).expand(n, *out.shape))

    def for_calls(self, module: nn.Module, calls: list[Call], n: int) -> Rule:
        return self


class BroadcastUseRule(Rule):
    """A parameter used once, through ``p.expand(n, ...)`` or ``x + p`` broadcast over the
    probes (ViT's cls token and position embeddings): the call is that op, its output the
    op's (n, ...) result, and the per-probe gradient of ``p`` is the result's cotangent
    for the probe, summed over the axes along which ``p`` is broadcast. Not in the rule
    table: the planner makes one for such a parameter (:func:`.planner.plan`)."""

    params = ()

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        return isinstance(call.output, torch.Tensor) and call.output.shape[0] == n

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        ((attr, full),) = attrs.items()
        p = module.get_parameter(attr)
        k, n = d.shape[:2]
        per = tuple(p.shape) if p.dim() < d.dim() - 1 else tuple(p.shape[1:])
        if p.dim() == d.dim() - 1 and p.shape[0] != 1:
            raise TypeError("the parameter is not broadcast over the probes")
        lead = d.dim() - 2 - len(per)   # result axes p has no axis for
        g = d.sum(dim=tuple(range(2, 2 + lead))) if lead else d
        axes = tuple(2 + i for i, (a, b) in enumerate(zip(per, g.shape[2:])) if a == 1 and b != 1)
        if axes:
            g = g.sum(dim=axes, keepdim=True)
        return [SumTerm(full, None, g.reshape(k, n, -1, 1))]


@dataclass
class _AttentionCore:
    """The attention core of one ``nn.MultiheadAttention`` call as a function of its
    projections: ``core`` (the out-projection input, call layout) computed from the
    leaves ``proj`` (q', k', v'), and the probes-first inputs and core output."""

    core: torch.Tensor
    proj: list[torch.Tensor]
    inputs: list[torch.Tensor]
    o: torch.Tensor

    @staticmethod
    def of(m: nn.MultiheadAttention, bound: dict[str, Any],
           probes_first: Callable[[torch.Tensor], torch.Tensor]) -> _AttentionCore:
        e = m.embed_dim
        w_in = m.in_proj_weight.detach()
        b_in = None if m.in_proj_bias is None else m.in_proj_bias.detach()
        xs = [bound[x] for x in ("query", "key", "value")]
        proj = []
        for j, x in enumerate(xs):
            bias = None if b_in is None else b_in[j * e:(j + 1) * e]
            proj.append(F.linear(x, w_in[j * e:(j + 1) * e], bias).detach().requires_grad_(True))
        eye = torch.eye(e, dtype=w_in.dtype, device=w_in.device)
        identity = {"in_proj_weight": torch.cat([eye, eye, eye])}
        if m.in_proj_bias is not None:
            identity["in_proj_bias"] = torch.zeros(3 * e, dtype=w_in.dtype, device=w_in.device)
        identity["out_proj.weight"] = eye
        if m.out_proj.bias is not None:
            identity["out_proj.bias"] = torch.zeros(e, dtype=w_in.dtype, device=w_in.device)
        rest = {k: v for k, v in bound.items() if k not in ("query", "key", "value")}
        rest["need_weights"] = False
        with torch.enable_grad():
            core: torch.Tensor = torch.func.functional_call(m, identity, tuple(proj), rest,
                                                            strict=False)[0]
        return _AttentionCore(core, proj, [probes_first(x) for x in xs],
                              probes_first(core.detach()))


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention`` (packed q/k/v projection, no ``bias_k``/``add_zero_attn``),
    which reads its projection weights directly instead of calling Linear modules.

    The call's query, key and value ``x_q, x_k, x_v`` are captured; the projections
    ``q' = x_q W_q^T + b_q`` (likewise k', v') are recomputed, and the attention core is
    run by the module's own ``forward`` with identity projections and zero biases (so
    masks, causal flags, batch layout and scaling are exactly torch's; a product with an
    identity matrix is exact in floating point). One local backward a cotangent row gives
    the cotangents at q', k', v' and the out-projection input ``o``: the in-projection
    is three outer terms (one per block of ``in_proj_weight``, the bias folded in), the
    out-projection one outer term on ``[o; 1]``. The attention weights output is not
    followed (discarded in practice; a model that uses it fails the self-check and takes
    the exact path).
    """

    params = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    _NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
              "average_attn_weights", "is_causal")

    def supports(self, module: nn.Module) -> bool:
        m = expect(module, nn.MultiheadAttention)
        return (m._qkv_same_embed_dim and m.bias_k is None
                and not m.add_zero_attn and not m.training)

    def output(self, out: Any) -> Any:
        return out[0] if isinstance(out, tuple) and out else out

    def unfollowed(self, out: Any) -> tuple[torch.Tensor, ...]:
        # the attention weights (need_weights=True): followed by no term
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
            return (out[1],)
        return ()

    def _bound(self, call: Call) -> dict[str, Any] | None:
        if len(call.args) > len(self._NAMES) or set(call.kwargs) - set(self._NAMES):
            return None
        bound = dict(zip(self._NAMES, call.args))
        if set(bound) & set(call.kwargs):
            return None
        bound.update(call.kwargs)
        return bound

    def accepts(self, module: nn.Module, call: Call, n: int) -> bool:
        bound = self._bound(call)
        out = self.output(call.output)
        if bound is None or not all(isinstance(bound.get(x), torch.Tensor)
                                    for x in ("query", "key", "value")):
            return False
        dim = 0 if expect(module, nn.MultiheadAttention).batch_first else 1
        qkv = [bound[x] for x in ("query", "key", "value")]
        kpm, mask = bound.get("key_padding_mask"), bound.get("attn_mask")
        return (all(t.dim() == 3 and t.shape[dim] == n for t in qkv)
                and isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[dim] == n
                and (kpm is None or (kpm.dim() == 2 and kpm.shape[0] == n))
                and (mask is None or mask.dim() == 2))

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: Memo) -> list[Term]:
        bound = self._bound(call)
        if bound is None:
            raise TypeError("a call accepts() refused")
        m = expect(module, nn.MultiheadAttention)
        first = m.batch_first
        w_out = m.out_proj.weight.detach()

        def probes_first(t: torch.Tensor) -> torch.Tensor:  # (n, L, E)
            return t if first else t.transpose(0, 1)

        att = memo.get("core")
        if not isinstance(att, _AttentionCore):
            att = memo["core"] = _AttentionCore.of(m, bound, probes_first)
        core, proj = att.core, att.proj
        k = d.shape[0]
        terms: list[Term] = []
        for r in range(k):
            dz = d[r]                                   # cotangent at the output, call layout
            d_core = dz @ w_out                         # ... at the out-projection input
            grads = torch.autograd.grad(core, proj, d_core, retain_graph=True, allow_unused=True)
            for j, (tag, x) in enumerate(zip("qkv", att.inputs)):
                g = grads[j]
                g = torch.zeros_like(proj[j]) if g is None else probes_first(g)
                # (in_proj_weight and in_proj_bias are separate per-layer keys: no fold)
                terms += linear_terms(attrs, "in_proj_weight", "in_proj_bias", f"#{tag}",
                                      x, g.unsqueeze(0), memo, fold=False)
            terms += linear_terms(attrs, "out_proj.weight", "out_proj.bias", "",
                                  att.o, probes_first(dz).unsqueeze(0), memo)
        if k > 1:
            raise RuntimeError("one cotangent row a call expected")
        return terms

