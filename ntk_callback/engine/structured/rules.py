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

from .terms import (BatchNormTerm, ConvTerm, OuterTerm, ScaleTerm, SumTerm, Term, TokenTerm)


@dataclass
class Call:
    """One call of a module: its inputs as passed to ``forward`` and its output."""

    args: tuple
    kwargs: dict
    output: Any


class Rule:
    """Structured kernel terms of one module type.

    ``params``: the parameter attribute names the rule computes (others of the module
    take the exact generic path). ``terms`` receives the module, ``attrs`` (attribute ->
    full parameter name, the covered and trainable ones), the call, the cotangent ``d``
    at the call's output (shape ``(k, n, *output.shape[1:])``) and a ``memo`` dict
    shared by the cotangent rows of the call (for values that depend on the input only).
    """

    params: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def supports(self, module: nn.Module) -> bool:
        """Whether this instance's configuration is covered."""
        return True

    def accepts(self, call: Call, n: int) -> bool:
        """Whether a recorded call is covered: by default one tensor input batched along
        dim 0 and a tensor output batched along dim 0, no keyword arguments."""
        return (len(call.args) == 1 and not call.kwargs
                and isinstance(call.args[0], torch.Tensor) and call.args[0].dim() >= 1
                and call.args[0].shape[0] == n
                and isinstance(call.output, torch.Tensor) and call.output.dim() >= 1
                and call.output.shape[0] == n)

    def terms(self, module: nn.Module, attrs: dict[str, str], call: Call, d: torch.Tensor,
              memo: dict) -> list[Term]:
        raise NotImplementedError


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


def rule_for(module: nn.Module) -> Rule | None:
    """The rule covering ``module``, or None. The nearest registered class in the MRO
    counts only if ``module``'s ``forward`` is that class's ``forward``."""
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base)
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
    cotangent Gram of the weight."""

    def terms(self, module, attrs, call, d, memo):
        a = call.args[0]
        k, n = d.shape[:2]
        dd = d.reshape(k, n, -1, d.shape[-1])
        if "weight" in attrs and "bias" in attrs:
            if "a1" not in memo:
                a2 = a.reshape(n, -1, a.shape[-1])
                memo["a1"] = torch.cat([a2, a2.new_ones(a2.shape[:2] + (1,))], dim=-1)
            return [OuterTerm(attrs["weight"], memo["a1"], dd)]
        if "weight" in attrs:
            return [OuterTerm(attrs["weight"], a.reshape(n, -1, a.shape[-1]), dd)]
        return [SumTerm(attrs["bias"], None, dd.transpose(2, 3))]


def _positions_last(t: torch.Tensor, lead: int) -> torch.Tensor:
    """(lead..., C, *spatial) -> (lead..., C, S); a view for contiguous and channels-last
    maps alike."""
    return t.reshape(t.shape[:lead + 1] + (-1,))


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    """Convolution weight as maps (rows by a grouped backward or a batched matmul; Gram
    route on unfolded patches), bias ``sum_s D_s``."""

    def supports(self, module):
        return module.padding_mode in ("zeros", "reflect", "replicate", "circular")

    def accepts(self, call, n):
        # an unbatched (C, L) input to Conv1d has no probe dimension
        return super().accepts(call, n) and call.args[0].dim() == call.output.dim() >= 3

    def terms(self, module, attrs, call, d, memo):
        out: list[Term] = []
        if "weight" in attrs:
            out.append(ConvTerm(attrs["weight"], call.args[0], d, module, memo))
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

    def terms(self, module, attrs, call, d, memo):
        dd = self.cotangents(module, d)
        out: list[Term] = []
        if "weight" in attrs:
            if "xhat" not in memo:
                memo["xhat"] = self.normalised(module, call.args[0])
            out.append(ScaleTerm(attrs["weight"], memo["xhat"], dd))
        if "bias" in attrs:
            out.append(SumTerm(attrs["bias"], None, dd))
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    def supports(self, module):
        return module.elementwise_affine

    def normalised(self, module, a):
        n = a.shape[0]
        xhat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
        return xhat.reshape(n, -1, _norm_width(module)).transpose(1, 2)

    def cotangents(self, module, d):
        k, n = d.shape[:2]
        return d.reshape(k, n, -1, _norm_width(module)).transpose(2, 3)


@register_rule(nn.GroupNorm)
class GroupNormRule(_NormRule):
    def supports(self, module):
        return module.affine

    def accepts(self, call, n):
        return super().accepts(call, n) and call.args[0].dim() >= 2

    def normalised(self, module, a):
        xhat = F.group_norm(a, module.num_groups, None, None, module.eps)
        return _positions_last(xhat, 1)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(_NormRule):
    """Eval-mode BatchNorm with running statistics: a per-channel affine map."""

    def supports(self, module):
        return (module.affine and module.track_running_stats
                and module.running_mean is not None and not module.training)

    def accepts(self, call, n):
        return super().accepts(call, n) and call.args[0].dim() >= 2

    def normalised(self, module, a):
        # The module's own buffers may be float32 while the kernel is computed in float64;
        # (a - mean) * r, not a * r - mean * r as F.batch_norm does: no cancellation.
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean = module.running_mean.to(a.dtype).reshape(shape)
        var = module.running_var.to(a.dtype).reshape(shape)
        return _positions_last((a - mean).mul_(torch.rsqrt(var + module.eps)), 1)

    def terms(self, module, attrs, call, d, memo):
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

    def supports(self, module):
        # max_norm renormalises the weight in place; scale_grad_by_freq makes autograd
        # return a rescaled, batch-dependent gradient instead of the derivative
        return module.max_norm is None and not module.scale_grad_by_freq

    def accepts(self, call, n):
        return super().accepts(call, n) and not call.args[0].is_floating_point()

    def terms(self, module, attrs, call, d, memo):
        k, n = d.shape[:2]
        tokens = call.args[0].reshape(n, -1).long()
        dd = d.reshape(k, n, -1, d.shape[-1])
        if module.padding_idx is not None:
            if "keep" not in memo:
                memo["keep"] = (tokens != module.padding_idx).unsqueeze(0).unsqueeze(-1).to(dd.dtype)
            dd = dd * memo["keep"]
        return [TokenTerm(attrs["weight"], tokens, dd, module)]
