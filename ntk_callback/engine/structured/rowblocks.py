r"""The rows route of outer (linear-layer) terms, one block of output features at a time.

For a linear layer with inputs ``A`` (n, S, c) and output cotangents ``D`` (k, n, S, o),
the per-probe gradient row of cotangent row r is ``g_ir = vec(D_ri^T A_i)`` (o x c).
Materialised for every probe and parameter, those rows are written to main memory and
read back by the kernel's product: for a BERT-like encoder at N = 64 that is ~200 MB a
call, and page faults and memory traffic made their construction ~2.5x slower than the
same arithmetic in cache (CPU, one thread). The layer's factors ``A`` and ``D`` take
``n S (c + k o)`` numbers, less than the rows' ``n k o c`` whenever the layer is wider
than it has positions; the driver keeps those instead (:func:`deferrable`) and this
module builds the rows of output features ``o0:o1`` -- ``R`` (n, k, (o1 - o0) c), one
batched product ``D_ri[:, o0:o1]^T A_i`` per cotangent row -- in a cache-sized scratch
block, contracts it into the kernel in the mode's pairing (``K += R R^T``,
:func:`..symmetric.add_gram`) and moves on. The flops are the rows route's, unchanged;
only the rows' trip through memory is gone.

The same blocks give the self-check's rule side, ``sum_i sum_r w_i u_r g_ir`` (the
term's piece of :class:`.checkdata.CheckData`), and the kernel's quadratic form from the
rows (``sum_r ||sum_i w_i g_ir||^2`` in modes of same-index row pairs), without a
second pass.

Below float64 every block's product (at most ``ACCUMULATE_CHUNK`` columns) is summed in
float64, as :func:`..symmetric.add_gram` does for long contractions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..modes import KernelMode
from ..symmetric import ACCUMULATE_CHUNK, add_gram
from .terms import BiasedOuterTerm, OuterTerm, Term, probe_sizes

#: bytes of one block of rows on the CPU (fits the caches: measured, BERT-like encoder,
#: N = 64, 1-4 MiB all within 10 % of each other, 256 KiB 2x slower); on other devices
#: launches cost, so blocks are larger (``DEVICE_BLOCK_BYTES``, within the budget)
CPU_BLOCK_BYTES = 2 << 20
DEVICE_BLOCK_BYTES = 256 << 20
#: a block has at least this many output features (many probes: the batched product's
#: matrices would otherwise be too small to run at speed)
MIN_FEATURES = 16


def deferrable(term: Term, k: int) -> bool:
    """Whether ``term``'s rows route should run block by block: an outer term (a Linear's
    weight, with or without its bias) whose factors (inputs and cotangents of ``k`` rows)
    are smaller than its rows."""
    if type(term) not in (OuterTerm, BiasedOuterTerm):
        return False
    factors, rows = probe_sizes(term, k)
    return factors <= rows


def factor_bytes(term: Term, k: int, n_all: int, itemsize: int) -> int:
    """Bytes the block-by-block rows route holds for ``term``: inputs and ``k`` rows of
    cotangents for ``n_all`` probes."""
    return n_all * probe_sizes(term, k)[0] * itemsize


@dataclass
class CheckWeights:
    """The self-check's weights of one probe set: probe weights ``w`` (n,) and row
    weights ``u`` (k,) per check vector (all ones for the fused check, whose rows carry
    the probe weights: ``unit``)."""

    w: list[torch.Tensor]
    u: list[torch.Tensor]
    #: the fused check's weights (one vector, all ones, one cotangent row): the rule side
    #: is then the plain sum of the rows over the probes
    unit: bool = False


@dataclass
class Contracted:
    """What :func:`contract` returns besides the kernel: ``pieces[s][c]`` the rule side
    (P,) of probe set s and check vector c; ``quads[c]`` the quadratic form of the term's
    kernel from its rows, ``w_c^T K w_c`` (self-kernels only)."""

    pieces: list[list[torch.Tensor]] = field(default_factory=list)
    quads: list[float] = field(default_factory=list)


class Scratch:
    """One reusable buffer for the blocks of every term of a computation."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        if (self.buf is None or self.buf.numel() < numel or self.buf.dtype != like.dtype
                or self.buf.device != like.device):
            self.buf = like.new_empty(numel)
        return self.buf[:numel].view(shape)


def _features(n: int, k: int, c: int, o: int, itemsize: int, block_bytes: int,
              exact: bool) -> int:
    width = max(1, block_bytes // max(1, n * k * c * itemsize))
    width = max(width, MIN_FEATURES)
    if not exact:  # float32 products over at most ACCUMULATE_CHUNK columns
        width = min(width, max(1, ACCUMULATE_CHUNK // c))
    return max(1, min(o, width))


def _build(term: Term, features: slice, rows: torch.Tensor) -> torch.Tensor:
    """Rows of output features ``features`` into ``rows`` (n, k, f, c), returned as
    (n, k, f c): one batched product ``D_ri[:, features]^T a_i`` per cotangent row. A
    biased term's ``a`` carries the ones column, so each feature's bias entry (the
    cotangents' sum over positions) comes out of the same product: one product and one
    Gram a block instead of two each (BERT-like encoder's contraction replayed on the
    same terms: 3-6 % less time; end to end within the machine's noise)."""
    d = term.d
    a = term.inputs
    for r in range(d.shape[0]):
        torch.bmm(d[r, :, :, features].transpose(1, 2), a, out=rows[:, r])
    return rows.reshape(rows.shape[0], rows.shape[1], -1)


def contract(out: torch.Tensor, mode: KernelMode, t1: Term, t2: Term | None,
             checks: list[CheckWeights], quads: bool, block_bytes: int,
             scratch: Scratch) -> Contracted:
    """``out +=`` the kernel of an outer term by its rows, a block of output features at
    a time; ``t2`` the same term of the second probe set (None: a self-kernel, on upper
    panels, see :mod:`..symmetric`). ``checks``: the self-check's weights of each probe
    set (empty without the check); ``quads``: also the quadratic forms of the first set's
    check vectors (self-kernels).

    A biased term's rows are laid out feature by feature, each feature's weight row
    followed by its bias entry: the check compares squared norms, so any fixed layout
    will do."""
    k, n1, _, o = t1.d.shape
    c = t1.size()[3]  # input columns, with a biased term's ones column
    n2 = t2.d.shape[1] if t2 is not None else 0
    n = n1 + n2
    exact = out.dtype == torch.float64
    width = _features(n, k, c, o, out.element_size(), block_bytes, exact)
    total = out if exact else torch.zeros(out.shape, dtype=torch.float64, device=out.device)
    part = out if exact else torch.empty_like(out)
    result = Contracted(pieces=[[out.new_empty(o * c) for _ in ch.w] for ch in checks],
                        quads=[0.0] * (len(checks[0].w) if checks and quads else 0))
    # the fused check: each block's rows summed over the probes straight into the piece
    # (no weighted product a block), its squared norm taken once at the end
    unit = [ch.unit and k == 1 for ch in checks]
    buf = scratch.take((n * k * width * c,), out)
    for f0 in range(0, o, width):
        feats = slice(f0, min(o, f0 + width))
        block = buf[:n * k * (feats.stop - f0) * c].view(n, k, feats.stop - f0, c)
        sets = [_build(t1, feats, block[:n1])]
        if t2 is not None:
            sets.append(_build(t2, feats, block[n1:]))
        if not exact:
            part.zero_()
        add_gram(part, mode, sets[0], sets[1] if t2 is not None else None)
        if not exact:
            total += part
        cols = slice(f0 * c, feats.stop * c)
        for s, (weights_s, rows) in enumerate(zip(checks, sets)):
            if unit[s]:
                torch.sum(rows[:, 0], dim=0, out=result.pieces[s][0][cols])
                continue
            for v, (w, u) in enumerate(zip(weights_s.w, weights_s.u)):
                h = torch.einsum("i,irp->rp", w, rows)              # (k, columns)
                result.pieces[s][v][cols] = u @ h
                if s == 0 and quads:
                    result.quads[v] += mode.rows_quad(h, u)
    if not exact:
        out += total.to(out.dtype)
    if unit and unit[0] and quads:
        piece = result.pieces[0][0].double()
        result.quads[0] = float(torch.vdot(piece, piece))
    return result


__all__ = ["CPU_BLOCK_BYTES", "DEVICE_BLOCK_BYTES", "MIN_FEATURES", "CheckWeights",
           "Contracted", "Scratch", "contract", "deferrable", "factor_bytes"]
