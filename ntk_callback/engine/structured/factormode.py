r"""Factor mode of :func:`.driver.compute` (``factors=`` a byte limit; a self-kernel of one
process): the per-probe factors of the kernel instead of the kernel, for the
kernel-vector products of :mod:`..factors`.

Each term keeps whichever of its two forms is smaller a probe (:func:`factor_route`): its
rows, ``k P`` numbers, in the driver's rows buffers (n, k, P_key), or its inputs and
cotangents, ``S (c + k o)``, as a Gram-route term (inputs (n, S, c), cotangents
(k, n, S, o)). After the first capture chunk, the rows buffers (allocated for all n
probes) plus that chunk's terms scaled to n must fit the limit (:func:`_factor_size`;
:class:`FactorsTooLarge` otherwise, before the other chunks run). At the end
(:func:`_factors_of`) the self-check's rule side is taken from them, then the fused
check's probe weights are divided out (powers of two: exactly), and :class:`Factors`
hold them: ``K = sum over parts of rows rows^T`` in the mode's pairing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .checkdata import CheckData, _rule_side
from .terms import BiasedOuterTerm, OuterTerm, Term, probe_sizes


@dataclass
class Factors:
    """The per-probe factors of one probe set's kernel, without the kernel (``compute``'s
    factor mode): ``rows[key]`` (n, k, P_key) rows-route gradient rows by layer key, and
    ``terms[name]`` the Gram-route terms as outer / token pieces (inputs and cotangents).
    ``K = sum over parts of rows rows^T`` in the mode's pairing; :mod:`..factors` takes
    products with them."""

    rows: dict[str, torch.Tensor]
    terms: dict[str, list[Term]]

    def parts(self) -> list[Any]:
        """Every part: a rows tensor or a term."""
        return list(self.rows.values()) + [t for ts in self.terms.values() for t in ts]

    def nbytes(self) -> int:
        return sum(part_nbytes(part) for part in self.parts())


def part_nbytes(part: torch.Tensor | Term) -> int:
    """Bytes held by a rows tensor, or by a term's inputs and cotangents."""
    tensors = (part,) if isinstance(part, torch.Tensor) else (part.data, part.d)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


class FactorsTooLarge(Exception):
    """Factor mode: the probes' factors would exceed the byte limit (``bytes`` estimated
    from the first capture chunk)."""

    def __init__(self, need: int, limit: int) -> None:
        super().__init__(f"the per-probe factors need ~{_size(need)}, over the limit of "
                         f"{_size(limit)}")
        self.bytes = need


def factor_route(term: Term, k: int, forced: str | None) -> str:
    """Factor mode's route: whichever representation of the term is smaller a probe, its
    rows (``k P``) or its inputs and cotangents (``S (c + k o)``, conv inputs unfolded)."""
    if term.rows_only:
        return "rows"
    if forced in ("gram", "rows"):
        return forced
    factors, rows = probe_sizes(term, k)
    return "rows" if rows <= factors else "gram"


def _factor_size(bufs: dict[str, torch.Tensor], gram: dict[str, Term], n: int,
                 seen: int, limit: int) -> None:
    """Factor mode, after the first chunk of ``seen`` probes: the rows buffers (allocated
    for all ``n``) plus the chunk's Gram-route terms scaled to ``n`` must fit ``limit``."""
    need = sum(part_nbytes(b) for b in bufs.values())
    need += sum(part_nbytes(t) for t in gram.values()) * n // max(1, seen)
    if need > limit:
        raise FactorsTooLarge(need, limit)


def _factors_of(checks: list[CheckData], bufs: dict[str, torch.Tensor], gram: dict[str, Term],
                slots: dict[str, tuple[str, int, int]], module_of: dict[str, str],
                fused: bool) -> Factors:
    """Factor mode's result from the probe set's rows buffers and Gram-route terms: the
    self-check's rule side, then the factors without the fused check's probe weights
    (powers of two: the division is exact)."""
    for data in checks:
        _rule_side(data, bufs, gram, slots, module_of, unit=fused)
    if fused and checks:
        w = checks[0].w[0]
        for buf in bufs.values():
            buf.div_(w.reshape(-1, 1, 1))
        for term in gram.values():
            term.d.div_(w.reshape((1, -1) + (1,) * (term.d.dim() - 2)))
    # (a biased term's ones column is appended once here: the products use it every time)
    terms = {name: [OuterTerm(p.key, p.inputs, p.d) if isinstance(p, BiasedOuterTerm) else p
                    for p in term.gram_pieces()] for name, term in gram.items()}
    return Factors(bufs, terms)
