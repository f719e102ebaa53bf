r"""Kernel modes: what ``"target"``, ``"trace"``, ``"sum"`` and ``"full"`` mean, in one place.

Every kernel the engine computes is a Gram matrix of per-probe vector-Jacobian products.
For probe ``i`` and a cotangent ``v`` (a vector over the O outputs of ``f(x_i)``) let
``g(i, v) = d <v, f(x_i)> / d theta``. A mode is two choices:

1. its **cotangent rows**: ``k`` vectors ``v_i1 .. v_ik`` a probe, a tensor (N, k, O)
   (:meth:`KernelMode.cotangent_rows`);
2. its **pairing**, which pairs of rows meet in the kernel:

   * :class:`DiagonalPairs`: ``K[i, j] = sum_r <g(i, v_ir), g(j, v_jr)>``, shape (N, N);
     rows never meet other rows, so they can be computed apart (the generic path splits
     them into chunks) and the Gram products sum them inside one matrix product;
   * :class:`AllPairs`: ``K[i, j, r, s] = <g(i, v_ir), g(j, v_js)>``, shape (N, N, k, k).

The four built-in modes (with ``e_a`` the unit vectors and ``t_i`` the label of probe i):

========  ==================  ========  ==============================================
mode      rows ``v_ir``       pairing   kernel
========  ==================  ========  ==============================================
target    ``e_{t_i}`` (k=1)   diagonal  NTK of each probe's own label logit, (N, N)
trace     ``e_1 .. e_O``      diagonal  ``sum_a full[i, j, a, a]``, (N, N)
sum       ``1`` (k=1)         diagonal  NTK of ``sum_a f_a``, (N, N)
full      ``e_1 .. e_O``      all       ``full[i, j, a, b]``, (N, N, O, O)
========  ==================  ========  ==============================================

Everything else in the engine -- the generic torch.func path, the structured rules on
both their routes, the symmetric panels, the cost model and the self-check -- reads the
mode only through this type, so a new mode is one class here.

Adding a mode (e.g. neural-tangents' averaged trace, or a random projection of the
outputs by given weights): subclass :class:`DiagonalPairs` (an (N, N) kernel, which the
analysis and the callback accept) or :class:`AllPairs`, give it a ``name``, set
``needs_targets`` if its rows depend on labels, implement :meth:`cotangent_rows`, and
either pass an instance as ``mode=`` or call :func:`register_mode` so that its name is
accepted as a string too. ``tests/test_engine_modes.py`` adds such a mode and checks it
against the float64 reference.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import torch

from .errors import NTKError

if TYPE_CHECKING:
    from .structured.terms import Term


class KernelMode:
    """One kernel mode: its cotangent rows and how pairs of rows contract.

    Instances are compared by identity (never with strings: use :meth:`parse` on user
    input and the attributes below in the engine).
    """

    #: the string users pass as ``mode=``
    name: str = ""
    #: the rows depend on the probes' class labels (``targets`` / ``targets2``)
    needs_targets: bool = False
    #: every pair of cotangent rows meets (an (N, N, k, k) kernel) rather than only
    #: same-index rows (an (N, N) kernel)
    all_pairs: bool = False

    # ------------------------------------------------------------------ definition
    def cotangent_rows(self, targets: torch.Tensor | None, n: int, num_outputs: int,
                       name: str, dtype: torch.dtype) -> torch.Tensor:
        """The (n, k, O) cotangent rows of n probes whose model has O = ``num_outputs``
        outputs, on the CPU in ``dtype``; ``targets`` (validated here when the mode needs
        them; ``name`` is the argument to name in errors) is a tensor or None."""
        raise NotImplementedError

    def cotangents(self, targets: torch.Tensor | None, n: int, num_outputs: int,
                   name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """:meth:`cotangent_rows` on ``device``, contiguous, shape checked."""
        cot = self.cotangent_rows(targets, n, num_outputs, name, dtype)
        if cot.dim() != 3 or cot.shape[0] != n or cot.shape[2] != num_outputs \
                or cot.shape[1] < 1:
            raise NTKError(f"mode {self.name!r} gave cotangent rows of shape "
                           f"{tuple(cot.shape)}; expected ({n}, k, {num_outputs}) with k >= 1.")
        return cot.to(device=device, dtype=dtype).contiguous()

    @property
    def scalar(self) -> bool:
        """One number a probe pair, an (N, N) kernel: what the analysis, the callback and
        the finite-step check accept."""
        return not self.all_pairs

    def kernel_shape(self, n1: int, n2: int, k: int) -> tuple[int, ...]:
        """Shape of an (n1, n2) kernel block with ``k`` cotangent rows a probe."""
        raise NotImplementedError

    # ------------------------------------------------------------------ costs
    def pairs(self, k: int) -> int:
        """Row pairs that meet for one probe pair (flops of a Gram product per entry)."""
        raise NotImplementedError

    def row_chunk(self, k: int, fit: int) -> int:
        """Rows a probe computed together when ``fit`` of them fit the memory budget."""
        raise NotImplementedError

    # ------------------------------------------------------------------ contractions
    def gram_operand(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-probe gradient rows (n, k, P) in the layout :meth:`add_gram_block` takes."""
        raise NotImplementedError

    def add_gram_block(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``out +=`` the kernel block of two :meth:`gram_operand` blocks of h and m probes
        (``out`` a view of shape :meth:`kernel_shape` (h, m, k))."""
        raise NotImplementedError

    def term_gram_width(self, k: int, o: int) -> int:
        """Columns of the cotangent Gram of a structured term: its (row, output) pairs
        summed inside one product (diagonal pairing), or only the outputs (all pairs)."""
        raise NotImplementedError

    def term_gram_extra(self, k: int) -> int:
        """Extra floats an entry of :meth:`add_term_block` holds (for its memory bound)."""
        raise NotImplementedError

    def add_term_block(self, out: torch.Tensor, dg: torch.Tensor, ag: torch.Tensor,
                       h: int, s1: int, m: int, s2: int, k: int) -> None:
        """``out +=`` a term's kernel block from the cotangent Gram ``dg`` (columns
        :meth:`term_gram_width`) and the input Gram ``ag`` of h x s1 against m x s2
        (probe, position) pairs: ``K[i, j] = sum_{s,t} (D_is . D_jt) (a_is . a_jt)``.
        ``ag`` may be overwritten."""
        raise NotImplementedError

    # ------------------------------------------------------------------ self-check
    def quad(self, kernel: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> float:
        """The kernel's quadratic form for probe weights w (n,) and row weights u (k,)."""
        raise NotImplementedError

    def rows_quad(self, h: torch.Tensor, u: torch.Tensor) -> float:
        """The same form from ``H = sum_i w_i rows_i`` (k, P) of one term's rows."""
        raise NotImplementedError

    def term_quad(self, term: Term, w: torch.Tensor, u: torch.Tensor, budget: int) -> float:
        """The same form for a Gram-route term (without its per-probe rows)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lookup
    @staticmethod
    def parse(mode: str | KernelMode) -> KernelMode:
        """The mode named by ``mode`` (a registered name or an instance); an
        :class:`.errors.NTKError` naming the valid modes otherwise."""
        if isinstance(mode, KernelMode):
            return mode
        found = _REGISTRY.get(mode) if isinstance(mode, str) else None
        if found is None:
            labelled = [m.name for m in _REGISTRY.values() if m.needs_targets]
            hint = (f" ({', '.join(map(repr, labelled))} needs class labels; the others do not)"
                    if labelled else "")
            raise NTKError(f"unknown mode {mode!r}; choose one of "
                           f"{', '.join(map(repr, mode_names()))}{hint}, or pass a "
                           "KernelMode instance.")
        return found

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            # a comparison with a string is a leftover of the string modes: fail loudly
            # rather than silently pick the wrong branch
            raise TypeError(f"compare KernelMode {self.name!r} by its attributes "
                            "(all_pairs, needs_targets, scalar) or by identity, not with the "
                            f"string {other!r}; KernelMode.parse(...) turns a name into a mode.")
        return self is other

    def __hash__(self) -> int:
        return id(self)


class DiagonalPairs(KernelMode):
    """Modes whose rows meet only their own index: ``K[i, j] = sum_r <g_ir, g_jr>``."""

    all_pairs = False

    def kernel_shape(self, n1: int, n2: int, k: int) -> tuple[int, ...]:
        return (n1, n2)

    def pairs(self, k: int) -> int:
        return k

    def row_chunk(self, k: int, fit: int) -> int:
        return max(1, min(k, fit))

    def gram_operand(self, rows: torch.Tensor) -> torch.Tensor:
        # (n, k, P) -> (n, k * P): the sum over rows is part of one matrix product
        return rows.reshape(rows.shape[0], -1)

    def add_gram_block(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        out.addmm_(a, b.T)

    def term_gram_width(self, k: int, o: int) -> int:
        return k * o

    def term_gram_extra(self, k: int) -> int:
        return 0

    def add_term_block(self, out: torch.Tensor, dg: torch.Tensor, ag: torch.Tensor,
                       h: int, s1: int, m: int, s2: int, k: int) -> None:
        if s1 == 1 and s2 == 1:
            out.addcmul_(dg, ag)
        else:
            out += (ag.mul_(dg)).reshape(h, s1, m, s2).sum(dim=(1, 3))

    def quad(self, kernel: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> float:
        return float(w @ kernel @ w)

    def rows_quad(self, h: torch.Tensor, u: torch.Tensor) -> float:
        flat = h.reshape(-1)
        return float(torch.vdot(flat, flat))

    def term_quad(self, term: Term, w: torch.Tensor, u: torch.Tensor, budget: int) -> float:
        return term.quad(w, term, w, budget)


class AllPairs(KernelMode):
    """Modes whose rows all meet: ``K[i, j, r, s] = <g_ir, g_js>``."""

    all_pairs = True

    def kernel_shape(self, n1: int, n2: int, k: int) -> tuple[int, ...]:
        return (n1, n2, k, k)

    def pairs(self, k: int) -> int:
        return k * k

    def row_chunk(self, k: int, fit: int) -> int:
        return k

    def gram_operand(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def add_gram_block(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        h, k, p = a.shape
        m = b.shape[0]
        g = a.reshape(h * k, p) @ b.reshape(m * k, p).T
        out += g.reshape(h, k, m, k).permute(0, 2, 1, 3)

    def term_gram_width(self, k: int, o: int) -> int:
        return o

    def term_gram_extra(self, k: int) -> int:
        return k * k

    def add_term_block(self, out: torch.Tensor, dg: torch.Tensor, ag: torch.Tensor,
                       h: int, s1: int, m: int, s2: int, k: int) -> None:
        dg = dg.reshape(h, s1, k, m, s2, k)
        out += torch.einsum("isjt,isajtb->ijab", ag.reshape(h, s1, m, s2), dg)

    def quad(self, kernel: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> float:
        return float(torch.einsum("i,a,ijab,j,b->", w, u, kernel, w, u))

    def rows_quad(self, h: torch.Tensor, u: torch.Tensor) -> float:
        g = u @ h
        return float(torch.vdot(g, g))

    def term_quad(self, term: Term, w: torch.Tensor, u: torch.Tensor, budget: int) -> float:
        g = term.weighted(w, u)
        return float(torch.vdot(g, g))


def check_targets(targets: torch.Tensor | None, n: int, num_outputs: int,
                  name: str) -> torch.Tensor:
    """Validated class index of every probe, shape (n,) int64 on the CPU; a model with one
    output needs none (index 0)."""
    if num_outputs == 1:
        if targets is not None and targets.shape[:1] != (n,):
            raise NTKError(f"`{name}` has length {targets.shape[0] if targets.dim() else 0} "
                           f"but there are {n} probes; pass one target per probe, shape ({n},).")
        return torch.zeros(n, dtype=torch.long)
    if targets is None:
        others = [m.name for m in _REGISTRY.values() if not m.needs_targets]
        raise NTKError(f"mode='target' needs `{name}` for a model with {num_outputs} outputs: "
                       "pass the int64 class label of every probe, or use "
                       f"{' / '.join(f'mode={m!r}' for m in others)}, which need no labels.")
    if targets.dim() == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.dim() != 1:
        raise NTKError(f"`{name}` has shape {tuple(targets.shape)}; target mode needs one class "
                       f"label a probe, shape ({n},) int64 (for one-hot targets pass "
                       "`targets.argmax(1)`).")
    if targets.shape[0] != n:
        raise NTKError(f"`{name}` has length {targets.shape[0]} but there are {n} probes; pass "
                       "exactly one label per probe.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise NTKError(f"`{name}` has dtype {targets.dtype}; for a model with {num_outputs} "
                       "outputs target mode needs integer class labels (int64). Convert with "
                       "`targets.long()`, or use mode='trace' for regression-style targets.")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_outputs:
        bad = lo if lo < 0 else hi
        raise NTKError(f"label {bad} in `{name}` is out of range for a model with "
                       f"{num_outputs} outputs (valid labels: 0..{num_outputs - 1}); check the "
                       "label encoding or the model's output size.")
    return targets.long().cpu()


class TargetMode(DiagonalPairs):
    """The NTK of each probe's own label logit: one row ``e_{t_i}`` (O = 1: ``e_0``)."""

    name = "target"
    needs_targets = True

    def cotangent_rows(self, targets: torch.Tensor | None, n: int, num_outputs: int,
                       name: str, dtype: torch.dtype) -> torch.Tensor:
        labels = check_targets(targets, n, num_outputs, name)
        cot = torch.zeros(n, 1, num_outputs, dtype=dtype)
        cot[torch.arange(n), 0, labels] = 1
        return cot


class SumMode(DiagonalPairs):
    """The NTK of the summed output ``sum_a f_a``: one row of ones."""

    name = "sum"

    def cotangent_rows(self, targets: torch.Tensor | None, n: int, num_outputs: int,
                       name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.ones(n, 1, num_outputs, dtype=dtype)


def unit_rows(n: int, num_outputs: int, dtype: torch.dtype) -> torch.Tensor:
    """The O unit vectors as the rows of every probe, (n, O, O) (an expanded view)."""
    return torch.eye(num_outputs, dtype=dtype).expand(n, num_outputs, num_outputs)


class TraceMode(DiagonalPairs):
    """The trace over outputs, ``sum_a full[i, j, a, a]`` (a sum; neural-tangents'
    ``trace_axes`` averages): rows ``e_1 .. e_O``."""

    name = "trace"

    def cotangent_rows(self, targets: torch.Tensor | None, n: int, num_outputs: int,
                       name: str, dtype: torch.dtype) -> torch.Tensor:
        return unit_rows(n, num_outputs, dtype)


class FullMode(AllPairs):
    """Every output pair, ``K[i, j, a, b] = <d f_a(x_i), d f_b(x_j)>``: rows ``e_1 .. e_O``."""

    name = "full"

    def cotangent_rows(self, targets: torch.Tensor | None, n: int, num_outputs: int,
                       name: str, dtype: torch.dtype) -> torch.Tensor:
        return unit_rows(n, num_outputs, dtype)


_REGISTRY: dict[str, KernelMode] = {}


def register_mode(mode: KernelMode) -> KernelMode:
    """Make ``mode.name`` a valid ``mode=`` string (replacing a mode of that name);
    returns ``mode``."""
    if not isinstance(mode, KernelMode) or not mode.name:
        raise NTKError(f"register_mode expects a named KernelMode instance, got {mode!r}.")
    _REGISTRY[mode.name] = mode
    return mode


def mode_names(scalar_only: bool = False) -> tuple[str, ...]:
    """Names of the registered modes (with ``scalar_only``: those of (N, N) kernels)."""
    return tuple(n for n, m in _REGISTRY.items() if m.scalar or not scalar_only)


TARGET = register_mode(TargetMode())
TRACE = register_mode(TraceMode())
SUM = register_mode(SumMode())
FULL = register_mode(FullMode())

ModeLike = Union[str, KernelMode]

__all__ = ["KernelMode", "DiagonalPairs", "AllPairs", "TargetMode", "TraceMode", "SumMode",
           "FullMode", "TARGET", "TRACE", "SUM", "FULL", "ModeLike", "register_mode",
           "mode_names", "check_targets", "unit_rows"]
