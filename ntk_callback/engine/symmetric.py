"""Self-kernels are symmetric: compute the upper panels, copy the lower part.

Without a second probe set the kernel satisfies ``K[i, j] = K[j, i]`` (full mode:
``K[i, j, a, b] = K[j, i, b, a]``). Every Gram product ``X X^T`` of the engine is then
taken on *upper panels* only: rows ``i0:i1`` against the columns ``i0:``. With panels of
h rows that costs ``(1 + h / N) / 2`` of the square product (5/8 for four panels), and
:func:`mirror_lower` afterwards overwrites the strictly lower part with the transposed
upper part, which also makes the kernel exactly symmetric (a square BLAS product is not,
to the last bit).

Contract of the helpers: a kernel accumulated with ``symmetric=True`` is exact on and
above the diagonal (``j >= i``) -- below it, entries are partial -- until
:func:`mirror_lower` has run.
"""
from __future__ import annotations

import torch

from .modes import KernelMode
from .problem import blocks, ceil_div

# Narrow panels lose more to BLAS efficiency and per-call overhead than they save.
PANEL_ROWS_MIN = 128
PANELS_MAX = 8
_MIRROR_ROWS = 128
#: columns of one float32 partial product; the partial products are summed in float64
ACCUMULATE_CHUNK = 1 << 15


def panel_rows(n: int) -> int:
    """Rows of a panel for an n x n self-kernel: at most ``PANELS_MAX`` panels, none
    narrower than ``PANEL_ROWS_MIN`` rows (one panel, the square product, for n <= 128)."""
    return max(PANEL_ROWS_MIN, ceil_div(n, PANELS_MAX))


def columns(rows: slice, n: int, symmetric: bool) -> slice:
    """The columns a block of rows needs: from its first row on for a self-kernel."""
    return slice(rows.start if symmetric else 0, n)


def transpose_pairs(block: torch.Tensor) -> torch.Tensor:
    """(n1, n2) -> (n2, n1); full mode (n1, n2, O, O) -> (n2, n1, O, O) with the output
    axes swapped too."""
    return block.permute(1, 0, 3, 2) if block.dim() == 4 else block.T


def mirror_lower(kernel: torch.Tensor) -> torch.Tensor:
    """Fill ``kernel[i, j]`` for ``j < i`` from ``kernel[j, i]`` (full mode:
    ``kernel[i, j, a, b] = kernel[j, i, b, a]``, and on the diagonal ``kernel[i, i, a, b]``
    for ``a > b`` from ``kernel[i, i, b, a]``), in place; returns ``kernel``."""
    n = kernel.shape[0]
    for sl in blocks(n, _MIRROR_ROWS):
        if sl.stop < n:
            kernel[sl.stop:, sl] = transpose_pairs(kernel[sl, sl.stop:])
        diag = kernel[sl, sl]
        h = sl.stop - sl.start
        ones = torch.ones(h, h, dtype=torch.bool, device=kernel.device)
        if kernel.dim() == 4:
            # (i, i) blocks: the upper triangle of the output axes too
            o = kernel.shape[2]
            tri = torch.ones(o, o, dtype=torch.bool, device=kernel.device).triu()
            eye = torch.eye(h, dtype=torch.bool, device=kernel.device)
            upper = ones.triu(1)[:, :, None, None] | (eye[:, :, None, None] & tri)
        else:
            upper = ones.triu()
        diag.copy_(torch.where(upper, diag, transpose_pairs(diag)))
    return kernel


def add_gram(out: torch.Tensor, mode: KernelMode, a: torch.Tensor,
             b: torch.Tensor | None) -> None:
    """``out +=`` the kernel block of the Jacobian row blocks a (n_a, k, P) and
    b (n_b, k, P); with ``b=None`` the self block of ``a`` on upper panels only (see the
    module doc). The mode contracts the rows (:meth:`.modes.KernelMode.add_gram_block`):
    ``sum_r a[:, r] b[:, r]^T`` as one product over the flattened (r, p) axis, or every
    row pair, ``out[i, j, r, s] += <a[i, r], b[j, s]>``. Below float64, contractions over
    more than ``ACCUMULATE_CHUNK`` entries are split into products of that many columns
    whose sum is taken in float64 (the float32 error then stays ~1e-7 relative instead of
    growing with the parameter count).
    """
    x = mode.gram_operand(a)
    y = x if b is None else mode.gram_operand(b)
    n = y.shape[0]
    width = x.shape[-1]
    split = x.element_size() < 8 and width > ACCUMULATE_CHUNK
    for rows in blocks(x.shape[0], panel_rows(n) if b is None else x.shape[0]):
        cols = columns(rows, n, b is None)
        target = out[rows, cols]
        if not split:
            mode.add_gram_block(target, x[rows], y[cols])
            continue
        # A float32 dot product over millions of parameters loses ~1e-4 relative (a
        # ResNet-18): sum float32 products of ACCUMULATE_CHUNK columns in float64.
        total = torch.zeros(target.shape, dtype=torch.float64, device=target.device)
        part = torch.empty_like(target)
        for c in blocks(width, ACCUMULATE_CHUNK):
            part.zero_()
            mode.add_gram_block(part, x[rows][..., c], y[cols][..., c])
            total += part
        target += total.to(target.dtype)


__all__ = ["PANEL_ROWS_MIN", "PANELS_MAX", "panel_rows", "columns", "transpose_pairs",
           "mirror_lower", "add_gram"]
