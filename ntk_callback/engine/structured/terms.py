r"""Kernel terms: one parameter (or one conv group of it) in a normal form over positions.

For a layer ``z = layer(a; w)`` inside the network, the per-probe gradient of a
cotangent row ``<v, f(x_i)>`` with respect to ``w`` depends only on the layer's input
``a_i`` and the cotangent ``D_i = d <v, f(x_i)> / d z_i`` at its output (Novak et al.
2022, "Fast Finite Width Neural Tangent Kernel", structured derivatives). A rule turns
one module call into terms; each term kind is one class that knows its per-probe
gradient rows, its size for the cost model and, for the self-check, the gradient of
the probe-weighted sum ``sum_i w_i <v, f(x_i)>``.

With ``k`` cotangent rows, ``n`` probes, ``S`` positions (sequence, spatial or repeated
calls), ``o`` outputs and ``c`` inputs of the layer:

========  ===================  ===================  =========================================
kind      data                 cotangents D         per-probe gradient
========  ===================  ===================  =========================================
outer     A (n, S, c)          (k, n, S, o)         ``sum_s D_s a_s^T``  (Gram or rows route)
token     T (n, S) int         (k, n, S, o)         ``D_s`` scattered into row ``T_s``
conv      a (n, C, *sp)        (k, n, O, *sp')      conv weight gradient (kept as maps)
sum       --                   (k, n, o, S)         ``sum_s D_s``
scale     X (n, o, S)          (k, n, o, S)         ``sum_s D_s * x_s``
bn        a (n, o, S)          (k, n, o, S)         ``r * sum_s D_s * (a_s - m)`` (eval BN)
========  ===================  ===================  =========================================

The last three keep positions last so that channel-first maps are used without a copy;
they only have the rows route.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import convmath
from .convmath import conv_patches, kernel_volume, strided_input, weight_rows

# conv helpers that the rules and the package's public names read from here
PAD_MODES = convmath.PAD_MODES
UNFOLD_MAX_PATCH = convmath.UNFOLD_MAX_PATCH
pad_like = convmath.pad_like
pointwise = convmath.pointwise

#: values of one module call that depend only on its inputs, shared by the terms of every
#: cotangent row of the call (normalised inputs, padded conv inputs, patches); the driver
#: sets ``"rows"``, the number of cotangent rows
Memo = dict[str, object]
M = TypeVar("M", bound=nn.Module)


def cached(memo: Memo, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``memo[name]``, computed by ``make()`` the first time."""
    value = memo.get(name)
    if value is None:
        value = memo[name] = make()
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"memo[{name!r}] holds a {type(value).__name__}, not a tensor")
    return value


def expect(module: nn.Module | None, kind: type[M]) -> M:
    """``module`` as the layer type its rule was registered for."""
    if not isinstance(module, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(module).__name__}")
    return module


@dataclass
class Term:
    """Base class: a kernel term of one parameter (see the module docstring)."""

    key: str                      # parameter full name (+ "#group" suffix)
    data: torch.Tensor | None
    d: torch.Tensor
    module: nn.Module | None = None
    memo: Memo = field(default_factory=dict)

    rows_only: ClassVar[bool] = False
    # Gram-route cotangents stored probe-major, (n, S, k, o) in memory seen as (k, n, S, o)
    probe_major: ClassVar[bool] = False
    # Kernel linear in the layer input (outer, conv): the rows route builds o * c a row
    linear: ClassVar[bool] = False
    # positions are the last axis of data and D (else dim 1 of data and dim 2 of D)
    positions_last: ClassVar[bool] = False

    def like(self, data: torch.Tensor | None, d: torch.Tensor,
             memo: Memo | None = None) -> Term:
        """The same kind of term on other data (stacked rows, joined chunks)."""
        return type(self)(self.key, data, d, self.module, self.memo if memo is None else memo)

    @property
    def inputs(self) -> torch.Tensor:
        """``data`` of the kinds that have some (all but the plain sum term)."""
        if self.data is None:
            raise TypeError(f"a {type(self).__name__} of {self.key!r} has no data")
        return self.data

    def size(self) -> tuple[int, int, int, int, int]:
        """(k rows, S positions, o outputs, c inputs, P parameters)."""
        k, _, s, o = self.d.shape
        return k, s, o, 1, o

    def rows(self) -> torch.Tensor:
        """Per-probe gradient rows, (n, k, P)."""
        raise NotImplementedError

    def rows_into(self, out: torch.Tensor, add: bool = False) -> None:
        """Write (``add``: add) the rows of a one-row term (k = 1) into ``out`` (n, P), a
        view of the rows buffer whose last axis is contiguous; kinds that can compute
        straight into it override this (no temporary, no copy)."""
        rows = self.rows()[:, 0]
        if rows.shape != out.shape:
            raise ValueError(f"rows of {self.key!r}: {tuple(rows.shape)}, slot "
                             f"{tuple(out.shape)}")
        if add:
            out.add_(rows)
        else:
            out.copy_(rows)

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        """``H = sum_i w_i rows_i`` for probe weights ``w`` (n,), shape (k, P), without the
        per-probe rows where the term avoids them."""
        return torch.einsum("i,ikp->kp", w, self.rows())

    def weighted(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``u^T H`` for row weights ``u`` (k,): shape (P,)."""
        return u @ self.row_weighted(w)

    def quad(self, w: torch.Tensor, other: Term, w2: torch.Tensor, budget: int) -> float:
        """``sum_r <H_r(w), H'_r(w2)>`` with ``H'`` of ``other`` (the same term of the
        second probe set): the kernel's bilinear form ``w^T K_term w2`` (trace over rows)."""
        h1 = self.row_weighted(w)
        h2 = h1 if other is self and w2 is w else other.row_weighted(w2)
        return float(torch.vdot(h1.reshape(-1), h2.reshape(-1)))

    def pull(self, w: torch.Tensor) -> torch.Tensor:
        """``H_r = sum_i w_ir rows_ir`` for weights ``w`` (n, k) a (probe, row): shape
        (k, P), the transposed Jacobian's product of a kernel-vector product
        (:mod:`..factors`)."""
        return torch.einsum("ir,irp->rp", w, self.rows())

    def push(self, h: torch.Tensor) -> torch.Tensor:
        """``out_ir = <rows_ir, h_r>`` for ``h`` (k, P): shape (n, k), the Jacobian's
        product of a kernel-vector product."""
        return torch.einsum("irp,rp->ir", self.rows(), h)

    def sq_norms(self) -> torch.Tensor:
        """``||g(i, r)||^2`` of every probe's gradient rows, (n, k), float64 (the kernel's
        diagonal; its sum is the trace)."""
        return self.rows().double().pow(2).sum(-1)

    def merge(self, other: Term) -> Term:
        """Another call of the same module as extra positions."""
        axis_d = -1 if self.positions_last else 2
        axis_a = -1 if self.positions_last else 1
        data = None if self.data is None else torch.cat([self.data, other.inputs], dim=axis_a)
        return self.like(data, torch.cat([self.d, other.d], dim=axis_d), {})

    def gram_pieces(self) -> list[Term]:
        """The term as Gram-route pieces (itself; conv terms unfold into outer terms)."""
        return [self]


class OuterTerm(Term):
    probe_major = True
    linear = True

    def size(self) -> tuple[int, int, int, int, int]:
        k, _, s, o = self.d.shape
        c = self.inputs.shape[-1]
        return k, s, o, c, o * c

    def rows(self) -> torch.Tensor:
        k, n = self.d.shape[:2]
        return torch.einsum("kiso,isc->kioc", self.d, self.inputs).reshape(k, n, -1).transpose(0, 1)

    def rows_into(self, out: torch.Tensor, add: bool = False) -> None:
        # one batched matmul a probe, D_i^T (o, S) @ A_i (S, c), written straight into the
        # (o, c) block of each probe's slot (a strided out= view: no temporary, no copy;
        # 1.3-2x faster than the einsum and its copy, measured on CPU)
        n, _, o = self.d.shape[1:]
        c = self.inputs.shape[-1]
        if self.d.shape[0] != 1 or out.shape != (n, o * c) or out.stride(-1) != 1:
            super().rows_into(out, add)
            return
        target = out.view(n, o, c)
        dt = self.d[0].transpose(1, 2)
        if add:
            target.baddbmm_(dt, self.inputs)
        else:
            torch.bmm(dt, self.inputs, out=target)

    def _scaled_inputs(self, w: torch.Tensor) -> torch.Tensor:
        return (self.inputs * w.reshape(-1, 1, 1)).reshape(-1, self.inputs.shape[-1])  # (nS, c)

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        k, _, _, o = self.d.shape
        return torch.matmul(self.d.reshape(k, -1, o).transpose(1, 2),
                            self._scaled_inputs(w)).reshape(k, -1)

    def weighted(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        o = self.d.shape[-1]
        du: torch.Tensor = torch.tensordot(u, self.d, dims=1).reshape(-1, o)  # (nS, o)
        return (du.T @ self._scaled_inputs(w)).reshape(-1)

    def pull(self, w: torch.Tensor) -> torch.Tensor:
        # H_r = sum_{i,s} w_ir D_ris a_is^T: one (o, nS) @ (nS, c) product a row
        k, n, s, o = self.d.shape
        dw = (self.d * w.T.reshape(k, n, 1, 1)).reshape(k, n * s, o)
        return torch.matmul(dw.transpose(1, 2), self.inputs.reshape(n * s, -1)).reshape(k, -1)

    def push(self, h: torch.Tensor) -> torch.Tensor:
        # out_ir = sum_s D_ris . (H_r a_is): (nS, c) @ (c, o) a row, then a dot over (s, o)
        k, n, s, o = self.d.shape
        c = self.inputs.shape[-1]
        z = torch.matmul(self.inputs.reshape(n * s, c), h.reshape(k, o, c).transpose(1, 2))
        return (z.reshape(k, n, s, o) * self.d).sum(dim=(2, 3)).T

    def sq_norms(self) -> torch.Tensor:
        # ||sum_s D_ris a_is^T||^2 = sum_{s,t} (D_ris . D_rit)(a_is . a_it)
        def input_gram(sl: slice) -> torch.Tensor:
            a = self.inputs[sl].double()
            return torch.matmul(a, a.transpose(-1, -2))
        return position_sq_norms(self.d, input_gram)

    def quad(self, w: torch.Tensor, other: Term, w2: torch.Tensor, budget: int) -> float:
        # per-row products cost k n S o c; the Gram form (nS)^2 (k o + c) is cheaper for
        # wide layers with few positions (and must fit the budget)
        k, n1, s1, o = self.d.shape
        n2, s2 = other.d.shape[1:3]
        c = self.inputs.shape[-1]
        rows_cost = k * (n1 * s1 + n2 * s2) * o * c
        gram_cost = n1 * s1 * n2 * s2 * (k * o + c)
        if gram_cost >= rows_cost or n1 * s1 * n2 * s2 * self.d.element_size() * 2 > budget:
            return super().quad(w, other, w2, budget)
        d1 = (self.d * w.reshape(1, -1, 1, 1)).permute(1, 2, 0, 3).reshape(n1 * s1, k * o)
        d2 = other.d.permute(1, 2, 0, 3).reshape(n2 * s2, k * o)
        a1 = self.inputs.reshape(n1 * s1, c)
        a2 = (other.inputs * w2.reshape(-1, 1, 1)).reshape(n2 * s2, c)
        return float(((d1 @ d2.T) * (a1 @ a2.T)).sum())


class BiasedOuterTerm(OuterTerm):
    """A Linear's weight and bias as one outer term on ``[a; 1]`` (the bias shares the
    cotangent Gram of the weight). ``data`` holds ``a`` itself; ``inputs`` appends the
    ones column on first use (cached for the call's terms of every cotangent row). Every
    route that forms rows or Grams uses it; sizes, the merge of repeated calls and the
    Gram route's chunk stacking work on ``a`` without the copy."""

    @property
    def inputs(self) -> torch.Tensor:
        a = super().inputs
        return cached(self.memo, f"ones:{self.key}",
                      lambda: torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1))

    def size(self) -> tuple[int, int, int, int, int]:
        k, _, s, o = self.d.shape
        c = self.raw.shape[-1] + 1
        return k, s, o, c, o * c

    def merge(self, other: Term) -> Term:
        if not isinstance(other, BiasedOuterTerm):
            return OuterTerm(self.key, self.inputs, self.d).merge(other)
        return self.like(torch.cat([self.raw, other.raw], dim=1),
                         torch.cat([self.d, other.d], dim=2), {})

    @property
    def raw(self) -> torch.Tensor:
        """The layer input ``a`` (n, S, c), without the ones column."""
        return super().inputs


class TokenTerm(Term):
    probe_major = True

    @property
    def vocab(self) -> int:
        return expect(self.module, nn.Embedding).num_embeddings

    def size(self) -> tuple[int, int, int, int, int]:
        k, _, s, o = self.d.shape
        return k, s, o, 1, o * self.vocab

    def rows(self) -> torch.Tensor:
        k, n = self.d.shape[:2]
        onehot = F.one_hot(self.inputs, self.vocab).to(self.d.dtype)  # (n, S, V)
        return torch.einsum("kiso,isv->kivo", self.d, onehot).reshape(k, n, -1).transpose(0, 1)

    def rows_into(self, out: torch.Tensor, add: bool = False) -> None:
        # each position's cotangent added into its token's row of the probe's (V, o)
        # block, straight into the slot: n S o additions (a one-hot product costs V times
        # more: GPT-2's tied 1,024-token table at N = 64, 0.5 GFLOP)
        n, s, o = self.d.shape[1:]
        v = self.vocab
        if self.d.shape[0] != 1 or out.shape != (n, v * o) or out.stride(-1) != 1:
            super().rows_into(out, add)
            return
        target = out.view(n, v, o)
        if not add:
            target.zero_()
        probe = torch.arange(n, device=out.device).unsqueeze(1).expand(n, s)
        target.index_put_((probe, self.inputs.to(out.device)), self.d[0], accumulate=True)

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        return self.pull(w.reshape(-1, 1).expand(-1, self.d.shape[0]))

    def pull(self, w: torch.Tensor) -> torch.Tensor:
        k, n, _, o = self.d.shape
        dw = (self.d * w.T.reshape(k, n, 1, 1)).reshape(k, -1, o)
        out = self.d.new_zeros(k, self.vocab, o)
        out.index_add_(1, self.inputs.reshape(-1), dw)
        return out.reshape(k, -1)

    def sq_norms(self) -> torch.Tensor:
        # sum_{s,t} (D_ris . D_rit) [T_is == T_it]: tokens that share a row add up
        def same_token(sl: slice) -> torch.Tensor:
            ids = self.inputs[sl]
            return (ids[:, :, None] == ids[:, None, :]).double()
        return position_sq_norms(self.d, same_token)

    def push(self, h: torch.Tensor) -> torch.Tensor:
        # out_ir = sum_s D_ris . H_r[T_is]: the embedding rows the probe's tokens read
        k, n, s, o = self.d.shape
        picked = h.reshape(k, self.vocab, o)[:, self.inputs.reshape(-1)]  # (k, nS, o)
        return (picked.reshape(k, n, s, o) * self.d).sum(dim=(2, 3)).T


class SumTerm(Term):
    rows_only = True
    positions_last = True

    def size(self) -> tuple[int, int, int, int, int]:
        k, _, o, s = self.d.shape
        return k, s, o, 1, o

    def rows(self) -> torch.Tensor:
        return self.d.sum(-1).transpose(0, 1)

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kios,i->ko", self.d, w)


class ScaleTerm(SumTerm):
    def rows(self) -> torch.Tensor:
        return (self.d * self.inputs).sum(-1).transpose(0, 1)

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kios,ios->ko", self.d, self.inputs * w.reshape(-1, 1, 1))


class BatchNormTerm(SumTerm):
    """Eval BatchNorm weight with one cotangent row: ``(a - m) * D`` summed, scaled by
    ``r = 1/sqrt(var + eps)`` afterwards -- one temporary instead of the normalised input
    and a product; ``(a - m) * r``, not ``a * r - m * r`` as ``F.batch_norm`` does, so no
    cancellation when the mean is large against the spread."""

    def _mean_rstd(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, dtype = expect(self.module, _BatchNorm), self.d.dtype
        if m.running_mean is None or m.running_var is None:
            raise TypeError("BatchNormTerm needs running statistics")
        return (m.running_mean.to(dtype).reshape(-1, 1),
                torch.rsqrt(m.running_var.to(dtype) + m.eps))

    def rows(self) -> torch.Tensor:
        mean, rstd = self._mean_rstd()
        k = self.d.shape[0]
        r = torch.stack([(self.inputs - mean).mul_(self.d[j]).sum(-1) for j in range(k)]) * rstd
        return r.transpose(0, 1)

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        mean, rstd = self._mean_rstd()
        centred = (self.inputs - mean) * w.reshape(-1, 1, 1)
        return torch.einsum("kios,ios->ko", self.d, centred) * rstd


def channels_last(t: torch.Tensor, lead: int) -> torch.Tensor:
    """(lead..., C, *spatial) -> (lead..., S, C)."""
    c = t.shape[lead]
    return t.reshape(t.shape[:lead + 1] + (-1,)).transpose(-1, -2).reshape(t.shape[:lead] + (-1, c))


def _patches(module: _ConvNd, a: torch.Tensor, memo: Memo) -> torch.Tensor:
    """The call's unfolded input (n, L, C_in * kk), once a call (memo)."""
    return cached(memo, "patches", lambda: strided_input(module, a) if pointwise(module)
                  else conv_patches(module, a))


class ConvTerm(Term):
    """A convolution weight, kept as (input, cotangent) maps: the rows route never unfolds
    a wide input (:func:`.convmath.weight_rows`); the Gram route unfolds it into one outer
    term a group."""

    linear = True

    @property
    def conv(self) -> _ConvNd:
        return expect(self.module, _ConvNd)

    def size(self) -> tuple[int, int, int, int, int]:
        m = self.conv
        k, o = self.d.shape[0], self.d.shape[2]
        s = 1
        for extent in self.d.shape[3:]:
            s *= extent
        c = self.inputs.shape[1] // m.groups * kernel_volume(m)
        return k, s, o, c, o * c

    def merge(self, other: Term) -> Term:  # repeated conv calls merge as outer terms
        raise NotImplementedError

    def gram_pieces(self) -> list[Term]:
        """Linear maps on unfolded input patches, one a group: ``z_l = W_g p_l``."""
        module, d = self.conv, self.d
        k, n = d.shape[:2]
        patches = _patches(module, self.inputs, self.memo)  # (n, L, C_in * kk)
        dd = channels_last(d, 2)  # (k, n, L, C_out)
        g = module.groups
        if g == 1:
            return [OuterTerm(self.key, patches, dd)]
        pg = patches.reshape(n, patches.shape[1], g, -1)
        dg = dd.reshape(k, n, dd.shape[2], g, -1)
        return [OuterTerm(f"{self.key}#{gi}", pg[:, :, gi], dg[:, :, :, gi]) for gi in range(g)]

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.row_weighted(w) for p in self.gram_pieces()], dim=1)

    def weighted(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.weighted(w, u) for p in self.gram_pieces()])

    def quad(self, w: torch.Tensor, other: Term, w2: torch.Tensor, budget: int) -> float:
        return sum((p.quad(w, q, w2, budget)
                    for p, q in zip(self.gram_pieces(), other.gram_pieces())), 0.0)

    def rows(self) -> torch.Tensor:
        """Per-probe conv weight gradients, (n, k, P), every cotangent row in one call
        (:func:`.convmath.weight_rows`: a batched matmul on the unfolded input for
        pointwise, small-patch and, in float64, depthwise convs; otherwise one grouped
        convolution backward whose groups are the probes' conv groups)."""
        rows = self.memo.get("rows", 1)
        shared = isinstance(rows, int) and rows > 1
        return weight_rows(self.conv, self.inputs, self.d, self.memo, shared)


class GroupedConvTerm(ConvTerm):
    """A grouped (e.g. depthwise) conv weight on the rows route only: its Gram route is
    one outer term a group (hundreds of small products for a depthwise conv), while its
    per-probe rows are small (``P = C_out * C_in / groups * kk``) and come from one call.
    :class:`.rules.ConvRule` uses it while the rows stay small (:func:`grouped_rows_fit`)."""

    rows_only = True

    def row_weighted(self, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("i,ikp->kp", w, self.rows())


#: per-probe bytes of a grouped conv's rows (k rows of P entries) up to which it takes
#: the rows route unconditionally (512 probes: 2 GiB); beyond it the cost model decides
GROUPED_ROWS_MAX_BYTES = 4 * 2 ** 20


def grouped_rows_fit(module: _ConvNd, k: int, itemsize: int) -> bool:
    """Whether a grouped conv's rows are small enough for :class:`GroupedConvTerm`."""
    p = module.out_channels * (module.in_channels // module.groups) * kernel_volume(module)
    return module.groups > 1 and k * p * itemsize <= GROUPED_ROWS_MAX_BYTES


def param_of(name: str) -> str:
    """The parameter a term name belongs to: a term covering part of a parameter (a
    grouped conv's group, attention's q/k/v slice of ``in_proj_weight``) is named
    ``"param#part"``."""
    return name.split("#")[0]


def merge_calls(terms: list[Term]) -> dict[str, Term]:
    """Repeated calls of one module become extra positions of one term (conv weights as
    outer terms on their patches)."""
    counts: dict[str, int] = {}
    for t in terms:
        counts[t.key] = counts.get(t.key, 0) + 1
    flat: list[Term] = []
    for t in terms:
        flat.extend(t.gram_pieces() if isinstance(t, ConvTerm) and counts[t.key] > 1 else [t])
    merged: dict[str, Term] = {}
    for t in flat:
        merged[t.key] = t if t.key not in merged else merged[t.key].merge(t)
    return merged


def stack_rows(parts: list[Term]) -> Term:
    """One term from the per-row terms of one chunk: D stacked to (k, n, ...)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if first.probe_major:
        d = torch.stack([p.d[0] for p in parts], dim=2).permute(2, 0, 1, 3)
    else:
        d = torch.cat([p.d for p in parts])
    return first.like(first.data, d)


def probe_sizes(term: Term, k: int) -> tuple[int, int]:
    """Numbers a probe of the term's two representations with ``k`` cotangent rows: its
    factors (inputs and cotangents, ``S (c + k o)``, conv inputs unfolded) and its
    per-probe gradient rows (``k P``)."""
    _, s, o, c, p = term.size()
    return s * (c + k * o), k * p


def position_sq_norms(d: torch.Tensor,
                      input_gram: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``sum_{s,t} (D_ris . D_rit) G_ist`` for cotangents ``d`` (k, n, S, o) and the
    probes' (m, S, S) input Grams ``G = input_gram(probes)``: the squared norms (n, k),
    float64, of gradient rows ``sum_s D_ris (x) a_is``, a chunk of probes at a time."""
    k, n, s, _ = d.shape
    out = torch.empty(n, k, dtype=torch.float64, device=d.device)
    step = max(1, (1 << 24) // max(1, k * s * s))
    for i in range(0, n, step):
        sl = slice(i, i + step)
        dd = d[:, sl].double()
        out[sl] = (torch.matmul(dd, dd.transpose(-1, -2)) * input_gram(sl)).sum((-1, -2)).T
    return out


def place_chunk(full: Term | None, part: Term, sl: slice, n: int) -> Term:
    """The term of all ``n`` probes, filled chunk by chunk: ``part`` (the probes ``sl``)
    copied into ``full`` (allocated on the first chunk, the cotangents in ``part``'s
    memory layout), so that the chunks are never held twice (no concatenation)."""
    if full is None:
        if sl.start == 0 and sl.stop == n:
            return part
        data = None if part.data is None else part.data.new_empty(
            (n,) + tuple(part.data.shape[1:]))
        if part.probe_major:  # (n, S, k, o) in memory, seen as (k, n, S, o)
            k, _, s, o = part.d.shape
            d = part.d.new_empty((n, s, k, o)).permute(2, 0, 1, 3)
        else:
            d = part.d.new_empty((part.d.shape[0], n) + tuple(part.d.shape[2:]))
        full = part.like(data, d, {})
    if full.data is not None and part.data is not None:
        full.data[sl] = part.data
    full.d[:, sl] = part.d
    return full
