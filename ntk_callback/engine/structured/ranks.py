r"""One kernel with its probes split across ranks: the ``split`` of :func:`.driver.compute`
(a :class:`..distributed.ProbeSplit`, used by duck typing; every function here is
collective).

Capture (:func:`_split_collect`): each rank runs the driver's capture of one probe set
on its share of the n probes, then every rank gets everything: the rows buffers
(n, k, P_key) and the Gram-route terms gathered along the probe axis
(:func:`_gather_term`: axis 0 of the inputs, axis 1 of the (k, n, S, o) cotangents), and
the self-check's autograd side summed over the ranks' probes (:func:`_reduce_refs`, one
all-reduce). Failures are agreed on before any exchange, so that every rank raises the
same thing and retries with the same plan.

Contraction (:func:`_contract_share`): each rank computes its rows ``a:b`` of every key's
kernel (:meth:`..distributed.ProbeSplit.rows`; equal areas of the upper triangle for a
self-kernel), the rest zero, and the kernels are summed over ranks, so that each entry is
one rank's product. The Gram-route products are the driver's, passed in.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import batch as B
from ..modes import KernelMode
from ..symmetric import add_gram
from .capture import Fallback
from .checkdata import CheckData
from .terms import Term, param_of

#: what the capture of one probe set yields: its rows buffers by layer key and its
#: Gram-route terms by name
Collected = tuple[dict[str, torch.Tensor], dict[str, Term]]

#: the driver's ``out +=`` kernel of two terms by the Gram route
#: (out, t1, t2, mode, budget, itemsize, symmetric)
AddTermGram = Callable[[torch.Tensor, Term, Term, KernelMode, int, int, bool], None]


def _split_collect(split: Any, collect: Callable[..., Collected], x: Any, cot: torch.Tensor,
                   n: int, label: str, data: CheckData | None, modules: list[str],
                   checked: list[str], live: Mapping[str, torch.Tensor]) -> Collected:
    """Collective :func:`.driver.compute` ``collect`` of one probe set under ``split``: this rank
    captures its share (rows-route rows, Gram-route terms, and for the self-check the
    autograd side of its probes, with the global probe weights), then every rank gets
    everything: rows and terms gathered along the probe axis, autograd's side summed.

    Failures are agreed on before any exchange (every rank raises the same thing): a
    :class:`.capture.Fallback` (or a run-time error, which a single process answers by
    dropping every module) on any rank becomes the same Fallback everywhere, so that all
    ranks retry with the same plan; any other error stops every rank."""
    usable = split.usable(n)
    share = split.share(n) if usable else slice(0, n)
    local = data
    if data is not None and usable:
        local = CheckData([w[share] for w in data.w], data.u, [{} for _ in data.w],
                          [{} for _ in data.w])
    code = 0
    error: BaseException | None = None
    bufs: dict[str, torch.Tensor] = {}
    gram: dict[str, Term] = {}
    try:
        bufs, gram = collect(B.take(x, share) if usable else x, cot[share],
                             share.stop - share.start, label, local, share.start == 0)
    except Fallback as exc:
        code = 2 + modules.index(exc.module) if exc.module in modules else 1
        error = exc
    except RuntimeError as exc:
        code, error = 1, exc
    except Exception as exc:  # noqa: BLE001 - raised below, after every rank knows
        code, error = split.stop_code(), exc
    got = split.agree(code)
    if error is not None and code == split.stop_code():
        raise split.stopped(error)
    if got:
        if error is not None and code == got:
            raise error
        module = modules[got - 2] if got >= 2 else ""
        raise Fallback(module, "the structured pass failed on another rank"
                       if got == 1 else "its calls did not match the trial forward's "
                       "on another rank")
    if not usable:
        return bufs, gram
    bufs = {key: split.gather(buf, n) for key, buf in bufs.items()}
    gram = {name: _gather_term(split, term, n) for name, term in gram.items()}
    if data is not None and local is not None:
        _reduce_refs(split, local, data, checked, live)
    return bufs, gram


def _gather_term(split: Any, term: Term, n: int) -> Term:
    """A Gram-route term of this rank's probes -> the term of all ``n`` probes (probe axis:
    0 of ``data``, 1 of ``d``; probe-major cotangents travel in their memory layout)."""
    data = None if term.data is None else split.gather(term.data.contiguous(), n)
    if term.probe_major:
        d = split.gather(term.d.permute(1, 2, 0, 3).contiguous(), n).permute(2, 0, 1, 3)
    else:
        d = split.gather(term.d.transpose(0, 1).contiguous(), n).transpose(0, 1)
    return term.like(data, d, {})


def _reduce_refs(split: Any, local: CheckData, data: CheckData, checked: list[str],
                 live: Mapping[str, torch.Tensor]) -> None:
    """Autograd's side of the self-check, summed over the ranks' probes into ``data.ref``
    (one all-reduce; a presence flag a parameter, as a rank's gradient may be None)."""
    parts = []
    for ref in local.ref:
        for name in checked:
            g = ref.get(name)
            flag = torch.ones(1, dtype=live[name].dtype, device=live[name].device)
            if g is None:
                flag, g = 0 * flag, torch.zeros_like(live[name])
            parts += [flag, g.reshape(-1)]
    if not parts:
        return
    total = split.reduce(torch.cat(parts))
    pos = 0
    for ref in data.ref:
        for name in checked:
            size = live[name].numel()
            if float(total[pos]) > 0:
                ref[name] = total[pos + 1:pos + 1 + size].reshape(live[name].shape)
            pos += 1 + size


def _contract_share(split: Any, acc: Callable[[str], torch.Tensor],
                    rows1: dict[str, torch.Tensor], rows2: dict[str, torch.Tensor],
                    gram1: dict[str, Term], gram2: dict[str, Term], key_of: dict[str, str],
                    mode: KernelMode, budget: int, itemsize: int, symmetric: bool,
                    add_term_gram: AddTermGram) -> None:
    """This rank's rows ``a:b`` of the kernel (:meth:`..distributed.ProbeSplit.rows`), the
    rest zero, then the sum over ranks (collective) into every key's kernel. A self-kernel:
    the diagonal block ``[a:b, a:b]`` on upper panels and ``[a:b, b:]`` as a cross block
    (exact on and above the diagonal, as :func:`..symmetric.mirror_lower` expects).
    ``add_term_gram``: the driver's Gram-route product of two terms."""
    keys = sorted(set(rows1) | {key_of[param_of(name)] for name in gram1})
    outs = {key: acc(key) for key in keys}
    n1 = next(iter(rows1.values())).shape[0] if rows1 else \
        (next(iter(gram1.values())).d.shape[1] if gram1 else 0)
    rows = split.rows(n1, symmetric)
    a, b = rows.start, rows.stop

    def part(term: Term, lo: int, hi: int | None) -> Term:
        return term.like(None if term.data is None else term.data[lo:hi],
                         term.d[:, lo:hi], {})

    if b > a:
        for key, j1 in rows1.items():
            if symmetric:
                add_gram(outs[key][a:b, a:b], mode, j1[a:b], None)
                if b < n1:
                    add_gram(outs[key][a:b, b:], mode, j1[a:b], j1[b:])
            else:
                add_gram(outs[key][a:b], mode, j1[a:b], rows2[key])
        for name, t1 in gram1.items():
            out = outs[key_of[param_of(name)]]
            for p1, p2 in zip(t1.gram_pieces(), gram2[name].gram_pieces()):
                if symmetric:
                    mine = part(p1, a, b)
                    add_term_gram(out[a:b, a:b], mine, mine, mode, budget, itemsize, True)
                    if b < n1:
                        add_term_gram(out[a:b, b:], mine, part(p1, b, None), mode, budget,
                                      itemsize, False)
                else:
                    add_term_gram(out[a:b], part(p1, a, b), p2, mode, budget, itemsize,
                                  False)
    split.agree(0)
    for key in keys:
        outs[key].copy_(split.reduce(outs[key]))
