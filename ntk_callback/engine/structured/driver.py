"""The driver: capture passes over probe chunks, rows and Gram terms, the kernel, and
the self-check data, for the parameters of a :class:`.planner.Plan`.

The check vectors and both sides of the self-check are :mod:`.checkdata`'s, factor mode
(the per-probe factors instead of the kernel) is :mod:`.factormode`'s, and the capture and
contraction of probes split across ranks are :mod:`.ranks`'; this module orchestrates
them: the capture chunk by chunk, every term's route, the rows buffers, the Gram
products and the final kernels with their check data."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .. import batch as B
from ..device import DeviceProfile, profile_for
from ..modes import KernelMode
from ..problem import Problem, blocks, output_shape
from ..symmetric import add_gram, columns, mirror_lower, panel_rows
from .capture import Calls, Fallback, InPlace, backward_rows, forward
from .checkdata import (
    CheckData,
    _accumulate,
    _add_ref,
    _check_weights,
    _independent,
    _quads,
    _reference,
    _rule_side,
    _separate_copies,
    check_vectors,
)
from .factormode import Factors, _factor_size, _factors_of, factor_route
from .planner import Plan, choose, rows_bytes
from .ranks import Collected, _contract_share, _split_collect
from .rowblocks import (
    CPU_BLOCK_BYTES,
    DEVICE_BLOCK_BYTES,
    Contracted,
    Scratch,
    contract,
    deferrable,
    factor_bytes,
)
from .rules import Call
from .terms import (
    ConvTerm,
    Memo,
    Term,
    TokenTerm,
    merge_calls,
    param_of,
    place_chunk,
    stack_rows,
)
from .tokens import add_token_kernel


@dataclass
class Result:
    kernels: dict[str, torch.Tensor]
    checks: list[CheckData]               # one per probe set (two for a cross kernel)
    # per check vector: layer key -> the kernel's quadratic form from the rows (self
    # kernels only; w^T K w in target/sum/trace mode, with the u weights in full mode)
    quads: list[dict[str, float]] = field(default_factory=list)
    factors: Factors | None = None        # factor mode only (no kernels)


def _forward(problem: Problem, plan: Plan, x: Any, n: int, label: str
             ) -> tuple[torch.Tensor, Calls]:
    watch = {}
    if plan.free:
        live = dict(problem.model.named_parameters())
        watch = {id(live[name]): name for name in plan.free}
    try:
        return forward(problem, plan.modules, plan.rules, plan.copy_outputs, x, n, label,
                       plan.broadcast, watch)
    except InPlace:
        plan.copy_outputs = True
    return forward(problem, plan.modules, plan.rules, True, x, n, label, plan.broadcast, watch)


def _add_term_gram(out: torch.Tensor, t1: Term, t2: Term, mode: KernelMode, budget: int,
                   itemsize: int, symmetric: bool) -> None:
    """``out +=`` the kernel of an outer/token term by the Gram route, blocked over probes
    of set 1; a self-kernel (``symmetric``) only on upper panels (:mod:`..symmetric`).

    ``K[i, j] = sum_{s,t} (D_is . D_jt) (a_is . a_jt)``; a mode of same-index row pairs
    sums the cotangent rows inside the first factor (one product over the (row, output)
    axis), a mode of all pairs keeps them, ``K[i, j, p, q] = sum_{s,t} (D_isp . D_jtq)
    (a_is . a_jt)`` (:meth:`..modes.KernelMode.add_term_block`).
    """
    k, n1, s1, o = t1.d.shape
    n2, s2 = t2.d.shape[1], t2.d.shape[2]
    # (k, n, S, o) -> (n, S, k, o): a block of probes is then a view whose rows are
    # (probe, position) and whose columns are (cotangent row, output); no copy for the
    # probe-major terms of :func:`.terms.stack_rows`
    d1 = t1.d.permute(1, 2, 0, 3).contiguous()
    d2 = d1 if t2 is t1 else t2.d.permute(1, 2, 0, 3).contiguous()
    per_row = n2 * s1 * s2 * itemsize * (3 + mode.term_gram_extra(k))
    rows_max = max(1, budget // max(1, per_row))
    if symmetric:
        rows_max = min(rows_max, panel_rows(n1))
    width = mode.term_gram_width(k, o)
    outer = t1.linear
    for sl in blocks(n1, rows_max):
        cols = columns(sl, n2, symmetric)
        h, m = sl.stop - sl.start, cols.stop - cols.start
        dg = d1[sl].reshape(-1, width) @ d2[cols].reshape(-1, width).T
        a1, a2 = t1.inputs, t2.inputs
        if outer:
            c = a1.shape[-1]
            ag = a1[sl].reshape(-1, c) @ a2[cols].reshape(-1, c).T
        else:
            ag = (a1[sl].reshape(-1, 1) == a2[cols].reshape(1, -1)).to(dg.dtype)
        mode.add_term_block(out[sl, cols], dg, ag, h, s1, m, s2, k)


#: with several cotangent rows (trace, full mode), hold the rows-route conv terms' output
#: cotangents of every row (within the chunk's budget, which counts k activation sizes a
#: probe) and compute their rows by one call for all rows instead of one call a row: on
#: devices where launches cost (CUDA) for every conv, on the CPU for grouped convs only
#: (measured, trace mode, one thread: MobileNetV3-small N = 16 0.75 -> 0.56 s; the
#: tutorial CNN N = 64, dense 3x3 convs, 1.03 -> 1.35 s, so those keep one call a row)
BATCH_CONV_ROWS = True


class RowGroups(Exception):
    """The Gram-route terms' cotangents of all cotangent rows would not fit what is left
    of the budget (measured on the first row of the first chunk): compute the kernel
    ``rows`` cotangent rows at a time (modes whose kernel sums same-index row pairs)."""

    def __init__(self, rows: int) -> None:
        super().__init__(f"{rows} cotangent rows at a time")
        self.rows = rows


def _check_row_memory(gram_parts: dict[str, list[Term]], seen: int, n_all: int, k: int,
                      budget: int, rows_left: int) -> None:
    """Raise :class:`RowGroups` when the Gram-route terms, which keep every row's
    cotangents for all ``n_all`` probes, would take more than what the rows route left of
    ``budget`` (at most half of it, at least an eighth): their one-row cotangents of
    ``seen`` probes scaled to ``n_all`` probes and ``k`` rows, plus their inputs."""
    per_row = inputs = 0
    for parts in gram_parts.values():
        for t in parts:
            per_row += t.d.numel() * t.d.element_size()
            if t.data is not None:
                inputs += t.data.numel() * t.data.element_size()
    per_row = per_row * n_all // max(1, seen)
    inputs = inputs * n_all // max(1, seen)
    room = max(budget // 8, min(budget // 2, rows_left)) - inputs
    if per_row * k > room:
        rows = max(1, room // max(1, per_row))
        if rows < k:
            raise RowGroups(rows)


@dataclass(frozen=True)
class Settings:
    """What a :func:`compute` call derives once from its arguments and never changes: the
    mode and sizes, the capture chunk, which optional paths run (the fused check, conv
    rows of all cotangent rows at once, row groups, the block-by-block rows route held or
    contracted in the backward), the device's profile and the contraction block, and the
    name maps with the checked and live parameters. Every object of the pass reads it."""

    problem: Problem
    plan: Plan
    budget: int
    check: int                              # check vectors (0: no self-check)
    factors: int | None                     # factor mode's byte limit
    mode: KernelMode
    k: int                                  # cotangent rows a probe
    itemsize: int
    n_all: int                              # the probes of both sets
    chunk: int                              # probes a capture pass
    device: DeviceProfile                   # what the routes cost there (planner.choose)
    fused: bool                             # the self-check rides on the capture pass
    batch_rows: bool                        # conv rows of all cotangent rows in one call
    row_groups: bool                        # RowGroups may be raised
    may_defer: bool                         # rows-route terms may take the rowblocks route
    eager: bool                             # ... and be contracted in the backward
    block: int                              # bytes of a rowblocks block
    shape: tuple[int, ...]                  # the kernel's
    key_of: dict[str, str]                  # parameter -> its layer key
    module_of: dict[str, str]               # parameter -> the unit its check pieces go to
    live: Mapping[str, torch.Tensor]        # the model's parameters by name
    checked: list[str]                      # the parameters the self-check covers

    @classmethod
    def of(cls, problem: Problem, plan: Plan, keys: dict[str, list[str]], budget: int,
           check: int, split: Any, factors: int | None, split_rows: bool) -> Settings:
        """The settings of :func:`compute`'s arguments (the device's profile read now)."""
        mode = problem.mode
        itemsize = problem.itemsize()
        n_all = problem.n1 + (problem.n2 or 0)
        key_of = {name: key for key, names in keys.items() for name in names}
        # the module a parameter's check pieces go to (modules sharing a tied one: one unit)
        unit = plan.units()
        module_of = {full: unit[m] for m, attrs in plan.params.items()
                     for full in attrs.values()}
        live = dict(problem.model.named_parameters())
        checked = sorted(plan.handled)

        # A capture pass holds the graph's activations, one row of cotangents and the
        # backward's buffers at a time (~6 activation sizes), plus the stacked cotangents
        # of Gram-route terms (at most one activation size a row). Chunks are sized at half
        # the budget by that estimate: smaller activations stay in cache (tutorial CNN,
        # N = 2,000: chunks 3x larger made the convolutions and the backward ~1.4x slower).
        # All probes go in one chunk when they fit the budget at the memory really measured
        # (~1.4 activation sizes a probe, HF BERT-like encoder, N = 64: 144 MiB extra;
        # counted here as 4 + k): the block-by-block rows route then runs inside the
        # backward.
        k = problem.cot1.shape[1]
        per_probe = max(1, problem.activation_numel * (6 + k) * itemsize)
        chunk = max(1, min(n_all, budget // (2 * per_probe)))
        if n_all * problem.activation_numel * (4 + k) * itemsize <= budget:
            chunk = n_all
        device = profile_for(problem.device)  # what the routes cost there (planner.choose)
        # With one cotangent row (target, sum mode) the self-check is fused into the capture
        # pass (one positive probe weighting); with several, it takes its own backward
        # passes (see compute for where the fused check is safe).
        fused = check > 0 and k == 1
        batch_rows = k > 1 and BATCH_CONV_ROWS
        # modes of same-index row pairs may be computed a group of rows at a time
        row_groups = (split_rows and k > 1 and not mode.all_pairs and factors is None
                      and split is None)
        # Rows-route outer terms whose factors are smaller than their rows keep the factors
        # and are contracted a block of rows at a time after the capture (:mod:`.rowblocks`);
        # not in factor mode (which keeps rows or factors itself) nor across ranks.
        may_defer = factors is None and split is None
        # One capture chunk of a self-kernel whose rows pair by index: each such term is
        # contracted right in the backward, while its cotangents are hot, and never held
        # (measured: holding them made the backward's own products ~1.5x slower, cold
        # memory)
        eager = may_defer and not problem.cross and chunk >= n_all and not mode.all_pairs
        block = CPU_BLOCK_BYTES if device.kind == "cpu" else \
            max(CPU_BLOCK_BYTES, min(DEVICE_BLOCK_BYTES, budget // 8))
        return cls(problem=problem, plan=plan, budget=budget, check=check, factors=factors,
                   mode=mode, k=k, itemsize=itemsize, n_all=n_all, chunk=chunk, device=device,
                   fused=fused, batch_rows=batch_rows, row_groups=row_groups,
                   may_defer=may_defer, eager=eager, block=block, shape=output_shape(problem),
                   key_of=key_of, module_of=module_of, live=live, checked=checked)


class Routes:
    """Every term's route and where its rows go, shared by all chunks and probe sets (the
    first chunk of the first set fixes them): ``routes`` (term name -> ``"rows"`` or
    ``"gram"``), ``rows_left`` (the budget the rows route leaves, charged as terms take
    it), ``deferred`` (rows-route terms kept as factors, :mod:`.rowblocks`), and the rows
    buffers' layout, ``slots`` and ``widths``."""

    __slots__ = ("s", "routes", "rows_left", "deferred", "slots", "widths")

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.routes: dict[str, str] = {}
        self.rows_left = s.budget
        # Rows-route outer terms whose factors are smaller than their rows keep the factors
        # and are contracted a block of rows at a time after the capture (Settings.may_defer)
        self.deferred: set[str] = set()
        # Each rows-route term owns a fixed slice of its key's rows: rows are written in
        # place into one (n, k, P_key) buffer a key, never concatenated.
        self.slots: dict[str, tuple[str, int, int]] = {}  # term name -> (key, start, stop)
        self.widths: dict[str, int] = {}                   # key -> P of its rows-route terms

    def route(self, name: str, term: Term) -> str:
        """The route of term ``name``, chosen on its first sight (factor mode: the smaller
        form; else :func:`.planner.choose` within ``rows_left``, which it then charges)."""
        s = self.s
        routes = self.routes
        if name in routes:
            return routes[name]
        forced = s.plan.forced.get(s.module_of[param_of(name)])
        if s.factors is not None:
            routes[name] = factor_route(term, s.k, forced)
        else:
            routes[name] = choose(term, s.k, s.problem.n1, s.problem.n2, s.mode,
                                  self.rows_left, s.itemsize, forced, s.device)
            if routes[name] == "rows" and s.may_defer and name not in s.plan.tied \
                    and deferrable(term, s.k):
                self.deferred.add(name)
                self.rows_left -= factor_bytes(term, s.k, s.n_all, s.itemsize)
            elif routes[name] == "rows":
                self.rows_left -= rows_bytes(term, s.k, s.n_all, s.itemsize)
        return routes[name]

    def tied_rows(self, name: str, term: Term) -> None:
        # a tied parameter takes the rows route (its uses' rows are summed); rows that do
        # not fit the budget send it to the exact path
        s = self.s
        if name in s.plan.tied and not term.rows_only and name not in self.routes:
            self.routes[name] = "rows"
            self.rows_left -= rows_bytes(term, s.k, s.n_all, s.itemsize)
            if self.rows_left < 0:
                raise Fallback(s.module_of[name], "a tied parameter's rows do not fit the "
                                                  "memory budget")

    def slot(self, name: str, term: Term) -> None:
        """Give the rows-route term ``name`` its slice of its key's rows, after the key's
        earlier terms."""
        key = self.s.key_of[param_of(name)]
        start = self.widths.get(key, 0)
        width = term.size()[4]
        self.slots[name] = (key, start, start + width)
        self.widths[key] = start + width
        self.tied_rows(name, term)


class Kernels:
    """The kernels being formed: ``result`` (layer key -> kernel, allocated on first use by
    :meth:`acc`) and ``contracted`` (term name -> the self-check pieces and quadratic forms
    of the block-by-block rows route's terms, from :func:`.rowblocks.contract`, which adds
    their kernels into ``result``), with the scratch buffer those contractions share."""

    __slots__ = ("s", "result", "contracted", "scratch")

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.contracted: dict[str, Contracted] = {}
        self.scratch = Scratch()
        self.result: dict[str, torch.Tensor] = {}

    def acc(self, key: str) -> torch.Tensor:
        """The kernel of layer ``key`` (zeros on first use)."""
        result = self.result
        if key not in result:
            s = self.s
            result[key] = torch.zeros(s.shape, dtype=s.problem.dtype, device=s.problem.device)
        return result[key]

    def contract_now(self, r: int, name: str, term: Term, data: CheckData | None) -> None:
        """Contract cotangent row ``r``'s piece of the deferred term ``name`` into its kernel
        inside the backward (Settings.eager), with its self-check data."""
        s = self.s
        weights = [] if data is None else [_check_weights(data, s.fused, r)]
        got = contract(self.acc(s.key_of[param_of(name)]), s.mode, term, None, weights,
                       bool(weights), s.block, self.scratch)
        _accumulate(self.contracted, name, got)


class ProbeCapture:
    """One probe set's capture, chunk by chunk (:meth:`collect`): owns the rows buffers
    ``bufs`` (layer key -> (n, k, P_key), allocated at the end of the first cotangent row,
    once ``Routes.widths`` is known), the Gram-route terms ``gram`` (placed chunk by chunk
    for all ``n`` probes) and the ``layout`` (a cotangent row's sorted term names) that
    every row of every chunk must repeat. ``first``: the probes start their set (not a
    later rank's share), so its first chunk runs :func:`.checkdata._independent` under
    the check."""

    __slots__ = ("s", "routes", "kernels", "x", "cot", "n", "label", "data", "first", "bufs",
                 "gram", "layout")

    def __init__(self, s: Settings, routes: Routes, kernels: Kernels, x: Any,
                 cot: torch.Tensor, n: int, label: str, data: CheckData | None,
                 first: bool) -> None:
        self.s, self.routes, self.kernels = s, routes, kernels
        self.x, self.cot, self.n, self.label, self.data, self.first = \
            x, cot, n, label, data, first
        self.bufs: dict[str, torch.Tensor] = {}
        self.gram: dict[str, Term] = {}
        self.layout: list[str] | None = None

    def collect(self) -> Collected:
        """Capture every chunk of the probes (:class:`ChunkCapture`); the rows buffers and
        the Gram-route terms of all ``n`` probes."""
        s = self.s
        for sl in blocks(self.n, s.chunk):
            terms = {name: stack_rows(parts)
                     for name, parts in ChunkCapture(self, sl).run().items()}
            if s.factors is not None and sl.start == 0:
                _factor_size(self.bufs, terms, self.n, sl.stop, s.factors)
            for name, term in terms.items():
                self.gram[name] = place_chunk(self.gram.get(name), term, sl, self.n)
        return self.bufs, self.gram


def _collect(s: Settings, routes: Routes, kernels: Kernels, x: Any, cot: torch.Tensor,
             n: int, label: str, data: CheckData | None, first: bool = True) -> Collected:
    """One probe set's rows buffers and Gram-route terms (:class:`ProbeCapture`)."""
    return ProbeCapture(s, routes, kernels, x, cot, n, label, data, first).collect()


class ChunkCapture:
    """One capture pass over the probes ``sl`` of a probe set (:meth:`run`): the forward,
    then a backward a cotangent row whose hooks hand each captured call's output cotangent
    to :meth:`consume` and close each row with :meth:`finish`. Owns the chunk's state
    between those calls: the captured calls ``entries`` and their rules' ``memos``, the
    ``repeated`` modules, the cotangents ``held`` of their calls until the row's end, the
    term names ``seen`` in the row, the terms ``pending`` before the rows buffers exist,
    the Gram-route ``gram_parts`` (returned) and the rows-route conv terms ``conv_rows``
    held for the last row. Rows go into the probe set's ``bufs``, shared by reference."""

    __slots__ = ("s", "routes", "kernels", "probes", "bufs", "sl", "data", "entries", "memos",
                 "repeated", "held", "seen", "pending", "gram_parts", "conv_rows",
                 "unfollowed")

    def __init__(self, probes: ProbeCapture, sl: slice) -> None:
        self.s, self.routes, self.kernels = probes.s, probes.routes, probes.kernels
        self.probes = probes
        self.bufs = probes.bufs
        self.sl = sl
        self.data = probes.data
        self.entries: list[tuple[str, int, Call]] = []
        self.memos: dict[tuple[str, int], Memo] = {}
        self.repeated: set[str] = set()
        self.held: dict[int, torch.Tensor] = {}   # cotangents of repeated modules' calls
        self.seen: list[str] = []                 # term names of the current row
        # terms of the first row before the buffers exist (their widths are known
        # once the row is done); their rows are then computed straight into them
        self.pending: list[tuple[int, str, Term, bool]] = []
        self.gram_parts: dict[str, list[Term]] = {}
        # rows-route conv terms of every cotangent row, turned into rows by one call
        # at the last row (:func:`.convmath.weight_rows` takes all k rows at once)
        self.conv_rows: dict[str, list[tuple[int, Term]]] = {}
        self.unfollowed: list[str] = []           # modules of the unfollowed outputs

    def run(self) -> dict[str, list[Term]]:
        """Capture the probes ``sl``: rows-route rows go into ``bufs`` in place; returns
        the chunk's Gram-route terms (its graph is freed with this object, when the caller
        drops it)."""
        s, probes, sl, data = self.s, self.probes, self.sl, self.data
        problem, plan = s.problem, s.plan
        out, calls = _forward(problem, plan, B.take(probes.x, sl), sl.stop - sl.start,
                              probes.label)
        if s.check and sl.start == 0 and probes.label == "inputs" and probes.first:
            _independent(problem, out)
        for mname, expected in plan.calls.items():
            if len(calls[mname]) != expected:
                raise Fallback(mname)
        self.entries = [(m, i, c) for m, lst in calls.items() for i, c in enumerate(lst)]
        self.memos = {(m, i): {"rows": s.k, "tied": plan.tied} for m, i, _ in self.entries}
        self.repeated = {m for m, lst in calls.items() if len(lst) > 1}

        on_params: Callable[[tuple[torch.Tensor | None, ...]], None] | None = None
        row_cot = probes.cot[sl]
        if data is not None and s.checked and s.fused:
            # One cotangent row: the check rides on the capture backward. Each probe's
            # cotangent is scaled by its weight w_i > 0, so the same backward gives
            # autograd's side (the gradient of sum_i w_i <cot_i, f(x_i)>) and rows
            # w_i rows_i (the kernel is divided by w_i w_j at the end, exactly).
            row_cot = row_cot * data.w[0][sl].reshape(-1, 1, 1)
            on_params = partial(_add_ref, data.ref[0], s.checked)
        elif data is not None and s.checked:
            _reference(out, probes.cot[sl], sl, data, [s.live[p] for p in s.checked],
                       s.checked)
        # Cotangents are turned into rows inside the backward, one cotangent row at a
        # time: none is stacked, and each is freed right after its layer is done.
        extra = [(m, t) for m, _, c in self.entries for t in c.unfollowed]
        self.unfollowed = [m for m, _ in extra]
        backward_rows(out, [c.output for _, _, c in self.entries] + [t for _, t in extra],
                      row_cot, self.consume, self.finish,
                      params=[s.live[p] for p in s.checked] if on_params is not None else None,
                      on_params=on_params)
        return self.gram_parts

    def write(self, r: int, name: str, term: Term, add: bool) -> None:
        """Row ``r`` of term ``name``'s rows into its slot (``add``: onto what is there)."""
        key, start, stop = self.routes.slots[name]
        target = self.bufs[key][self.sl, r, start:stop]
        try:
            if term.d.shape[0] == 1:
                term.rows_into(target, add)  # computed in place
            elif add:
                target += term.rows()[:, 0]
            else:
                target.copy_(term.rows()[:, 0])
        except ValueError as exc:  # a rule whose rows do not match its size
            raise Fallback(self.s.module_of[param_of(name)], str(exc)) from exc

    def take(self, r: int, name: str, term: Term) -> None:
        """Route row ``r``'s term ``name``: contracted now, held for the Gram route or the
        rowblocks route, held for the conv rows of all rows, or written into its rows."""
        # a tied parameter's terms of several modules share one slot: the rows of
        # its uses are summed (its per-probe gradient)
        s, routes = self.s, self.routes
        seen = self.seen
        add = name in seen
        seen.append(name)
        tied = s.plan.tied
        if name not in tied and not term.rows_only and (
                routes.route(name, term) != "rows" or name in routes.deferred):
            if name in routes.deferred and s.eager:
                self.kernels.contract_now(r, name, term, self.data)
                return
            self.gram_parts.setdefault(name, []).append(term)  # held for all probes
            return
        if name not in routes.slots:
            routes.slot(name, term)
        if s.batch_rows and not add and isinstance(term, ConvTerm) \
                and (s.device.flops_per_launch > 0 or term.conv.groups > 1) \
                and name not in tied and term.d.shape[0] == 1:
            self.conv_rows.setdefault(name, []).append((r, term))
        elif self.bufs:
            self.write(r, name, term, add)
        else:
            self.pending.append((r, name, term, add))

    def write_conv_rows(self) -> None:
        """The held conv terms' rows of all cotangent rows, one call a term."""
        for name, held_rows in self.conv_rows.items():
            if [r for r, _ in held_rows] != list(range(self.s.k)):  # not one a row
                for r, term in held_rows:
                    self.write(r, name, term, False)
                continue
            first = held_rows[0][1]
            both = first.like(first.data, torch.cat([t.d for _, t in held_rows]), first.memo)
            key, start, stop = self.routes.slots[name]
            try:
                self.bufs[key][self.sl, :, start:stop].copy_(both.rows())
            except RuntimeError as exc:  # rows of the wrong size
                raise Fallback(self.s.module_of[param_of(name)], str(exc)) from exc
        self.conv_rows.clear()

    def terms_of(self, idx: int, grad: torch.Tensor) -> list[Term]:
        """The terms of captured call ``idx`` for the output cotangent ``grad`` (its rule)."""
        mname, i, c = self.entries[idx]
        plan = self.s.plan
        try:
            return plan.rules[mname].terms(plan.modules[mname], plan.params[mname], c,
                                           grad.detach().unsqueeze(0), self.memos[mname, i])
        except Exception as exc:  # noqa: BLE001 - a failing rule costs speed only
            raise Fallback(mname, f"rule raised {type(exc).__name__}: {exc}") from exc

    def consume(self, r: int, idx: int, grad: torch.Tensor) -> None:
        """:func:`.capture.backward_rows`' consumer: the cotangent ``grad`` of captured
        output ``idx`` in row ``r``."""
        entries = self.entries
        if idx >= len(entries):  # an output the module's rule does not follow
            if bool(grad.ne(0).any()):
                raise Fallback(self.unfollowed[idx - len(entries)],
                               "the model uses an output its rule does not follow")
            return
        if entries[idx][0] in self.repeated:  # merged with its other calls at the row's end
            self.held[idx] = grad
            return
        for term in self.terms_of(idx, grad):
            self.take(r, term.key, term)

    def finish(self, r: int) -> None:
        """:func:`.capture.backward_rows`' end of row ``r``: the repeated modules' merged
        terms, the layout check, the rows buffers (first row), the held conv rows (last
        row), and the row-groups memory check (first row of the first chunk)."""
        s, probes, held = self.s, self.probes, self.held
        if held:
            terms = [t for idx in sorted(held) for t in self.terms_of(idx, held[idx])]
            held.clear()
            for name, term in merge_calls(terms).items():
                self.take(r, name, term)
        names = sorted(self.seen)
        self.seen.clear()
        if probes.layout is None:
            probes.layout = names
        elif names != probes.layout:
            raise Fallback("", "data-dependent layers")
        if not self.bufs:
            for key, width in self.routes.widths.items():
                self.bufs[key] = torch.empty((probes.n, s.k, width), dtype=s.problem.dtype,
                                             device=s.problem.device)
            for row, name, term, add in self.pending:
                self.write(row, name, term, add)
            self.pending.clear()
        if r == s.k - 1 and self.conv_rows:
            self.write_conv_rows()
        sl = self.sl
        if r == 0 and sl.start == 0 and s.row_groups and self.gram_parts:
            _check_row_memory(self.gram_parts, sl.stop - sl.start, s.n_all, s.k, s.budget,
                              self.routes.rows_left)


def compute(problem: Problem, plan: Plan, keys: dict[str, list[str]], budget: int,
            check: int = 0, split: Any = None, factors: int | None = None,
            split_rows: bool = True) -> Result:
    """Kernel contributions of the planned parameters, by layer key, and (``check`` > 0
    vectors) the self-check data.

    The trial forward's activation size chunks the capture passes over probes within the
    budget; the first chunk fixes every term's route. Rows-route terms are turned into
    per-probe gradient rows chunk by chunk, so their activations and cotangents never
    exist for all probes at once; Gram-route terms keep theirs (small for the layers where
    that route wins). Raises :class:`.capture.Fallback` (naming the module when one is
    to blame) when a structural assumption fails at run time.

    ``split`` (a :class:`..distributed.ProbeSplit`, collective): every rank captures its
    share of the probes, the rows and terms are gathered, each rank contracts its rows of
    the kernel and the kernels are summed (:func:`.ranks._split_collect`,
    :func:`.ranks._contract_share`).

    ``split_rows``: raise :class:`RowGroups` when the Gram-route cotangents of all
    cotangent rows would not fit what the rows route left of the budget (trace mode;
    :func:`_check_row_memory`; the caller then computes groups of rows,
    :func:`..api._structured`).

    ``factors`` (bytes; self-kernels of one process only): factor mode. No kernel is
    formed; the result's :class:`.factormode.Factors` hold the probes' rows and Gram-route
    terms, each term in its smaller form (:func:`.factormode.factor_route`), unweighted;
    the self-check data is filled as usual. Raises :class:`.factormode.FactorsTooLarge`
    when the first capture chunk shows that they would exceed ``factors`` bytes.
    """
    s = Settings.of(problem, plan, keys, budget, check, split, factors, split_rows)
    # The fused check cannot see a probe's cotangent reaching another probe's rows (the
    # weights travel with it), so it runs only where that cannot happen: the capture pass
    # gives the trial forward's rows for the same probes (outputs that do not depend on
    # the other probes of the batch; see `_independent`), and the per-probe copies of
    # broadcast calls receive no other probe's cotangent (`_separate_copies`, a backward
    # a probe on the first three probes). Without the check, that test is the broadcast
    # rules' premise and runs all the same; the two-vector check verifies it itself.
    if plan.broadcasting and (s.fused or not check):
        _separate_copies(problem, plan, _forward)
    routes, kernels = Routes(s), Kernels(s)
    collect = partial(_collect, s, routes, kernels)
    checks: list[CheckData] = []
    collected: list[Collected] = []
    for idx, (x, label, n, cot) in enumerate(problem.probe_sets()):
        data = None
        if check:
            data = _check_data(s, n, idx)
            checks.append(data)
        if split is None:
            collected.append(collect(x, cot, n, label, data))
        else:
            collected.append(_split_collect(split, collect, x, cot, n, label, data,
                                            list(plan.modules), s.checked, s.live))
    if factors is not None:
        bufs, gram = collected[0]
        return Result({}, checks, factors=_factors_of(checks, bufs, gram, routes.slots,
                                                      s.module_of, s.fused))
    _add_kernels(s, routes, kernels, collected, checks, split)
    return _checked_result(s, routes, kernels, collected, checks)


def _check_data(s: Settings, n: int, idx: int) -> CheckData:
    """Probe set ``idx``'s check vectors (one for the fused check), with empty sides."""
    w, u = check_vectors(n, s.k, 1 if s.fused else s.check, 1 + idx, s.problem.dtype,
                         s.problem.device)
    if s.fused:
        # Positive powers of two, 2^-6 .. 2^6: scaling a cotangent by one and
        # dividing the kernel by w_i w_j afterwards are exact in floating point,
        # so the kernel is bit for bit the unweighted one.
        w = [torch.exp2(torch.round(2.5 * w[0]).clamp_(-6, 6))]
    return CheckData(w, u, [{} for _ in w], [{} for _ in w])


def _add_kernels(s: Settings, routes: Routes, kernels: Kernels, collected: list[Collected],
                 checks: list[CheckData], split: Any) -> None:
    """Every key's kernel into ``kernels.result`` from the captured probe sets: the rows
    Grams, the Gram-route terms (token terms by the tokens probes share), the held
    block-by-block terms (their check data into ``kernels.contracted``), then a
    self-kernel's lower triangle mirrored. Under ``split``, :func:`_contract_share` takes
    the place of the first two."""
    problem, mode, budget, itemsize, key_of = s.problem, s.mode, s.budget, s.itemsize, s.key_of
    acc = kernels.acc
    # the block-by-block rows route's terms leave the Gram-route dicts
    held = [{name: gram.pop(name) for name in sorted(routes.deferred) if name in gram}
            for _, gram in collected]
    rows1, gram1 = collected[0]
    rows2, gram2 = collected[1] if problem.cross else collected[0]
    symmetric = not problem.cross
    if split is not None:
        _contract_share(split, acc, rows1, rows2, gram1, gram2, key_of, mode, budget,
                        itemsize, symmetric, _add_term_gram)
    for key, j1 in rows1.items() if split is None else ():
        add_gram(acc(key), mode, j1, None if symmetric else rows2[key])
    for name, t1 in gram1.items() if split is None else ():
        t2 = gram2[name]
        target = acc(key_of[param_of(name)])
        if symmetric and not mode.all_pairs and isinstance(t1, TokenTerm):
            add_token_kernel(target, t1, budget)  # the probe pairs that share a token
            continue
        for a1, a2 in zip(t1.gram_pieces(), t2.gram_pieces()):
            _add_term_gram(target, a1, a1 if symmetric else a2, mode, budget, itemsize,
                           symmetric)
    for name, got in _contract_held(held, acc, key_of, mode, checks, s.fused, symmetric,
                                    s.block, kernels.scratch).items():
        _accumulate(kernels.contracted, name, got)
    if symmetric:
        for value in kernels.result.values():
            mirror_lower(value)


def _checked_result(s: Settings, routes: Routes, kernels: Kernels,
                    collected: list[Collected], checks: list[CheckData]) -> Result:
    """The result with its self-check data completed: the block-by-block terms' pieces,
    the fused check's probe weights divided out of the kernels, the rule side of the rows
    and Gram-route terms, and a self-kernel's quadratic forms."""
    problem, key_of, module_of, slots = s.problem, s.key_of, s.module_of, routes.slots
    result, contracted = kernels.result, kernels.contracted
    symmetric = not problem.cross
    out = Result(result, checks)
    for name, got in contracted.items():
        for data, by_vector in zip(checks, got.pieces):
            for side, g in zip(data.G, by_vector):
                side.setdefault(module_of[param_of(name)], []).append(g)
    if s.fused:
        w1 = checks[0].w[0]
        ww = torch.outer(w1, checks[1].w[0] if problem.cross else w1)
        ww = ww.reshape(ww.shape + (1,) * (len(s.shape) - 2))
        for value in result.values():
            value.div_(ww)
        pieces = [_rule_side(data, bufs, gram, slots, module_of, unit=True)
                  for data, (bufs, gram) in zip(checks, collected)]
        if symmetric:
            quads: dict[str, float] = {}
            for name, g in pieces[0].items():
                key = key_of[param_of(name)]
                quads[key] = quads.get(key, 0.0) + float(torch.vdot(g, g))
            out.quads = [quads]
    else:
        for data, (bufs, gram) in zip(checks, collected):
            _rule_side(data, bufs, gram, slots, module_of)
        if checks and symmetric:
            rows1, gram1 = collected[0]
            out.quads = _quads(checks[0], rows1, gram1, slots, key_of, s.mode, s.budget)
    for name, got in contracted.items():
        key = key_of[param_of(name)]
        for forms, form in zip(out.quads, got.quads):
            forms[key] = forms.get(key, 0.0) + form
    return out


def _contract_held(held: list[dict[str, Term]], acc: Callable[[str], torch.Tensor],
                   key_of: dict[str, str], mode: KernelMode, checks: list[CheckData],
                   fused: bool, symmetric: bool, block: int, scratch: Scratch
                   ) -> dict[str, Contracted]:
    """The kernels of the block-by-block rows route's terms held for all probes
    (``held[s]``: probe set s's terms by name), with their self-check pieces and
    quadratic forms (:func:`.rowblocks.contract`; the fused check's rows carry the probe
    weights, so they are summed with weight 1)."""
    weights = [_check_weights(d, fused) for d in checks]
    out = {}
    for name, t1 in held[0].items():
        t2 = None if symmetric else held[1][name]
        out[name] = contract(acc(key_of[param_of(name)]), mode, t1, t2, weights,
                             symmetric and bool(checks), block, scratch)
    return out
