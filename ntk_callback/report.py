"""``NTKReport``: every metric of one kernel in a dataclass, for loggers and the console.

:func:`analyze_ntk` builds the report from a kernel (one float64 eigendecomposition,
shared by all spectral metrics); :meth:`NTKReport.to_dict` gives the flat scalars that the
callback logs under ``ntk/``; :meth:`NTKReport.format` renders the compact console text
(heatmap of |K|, spectrum, conditioning, alignment, effective rank, drift, log10
histogram). Pure PyTorch/numpy: no Lightning, no engine import.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import analysis as A
from .analysis import ArrayLike

__all__ = ["NTKReport", "analyze_ntk", "RAMP"]

#: Glyph ramp of the text heatmap, from 0 (space) to the largest cell value ('@').
RAMP = " .:-=+*#%@"

# to_dict() key order; a key whose field is None (no targets / no init kernel / no gamma)
# is left out.
_SCALAR_KEYS = (
    "num_probes",
    "lambda_max",
    "lambda_min",
    "min_raw_eigenvalue",
    "condition_number",
    "log10_condition_number",
    "trace",
    "frobenius_norm",
    "symmetry_residual",
    "effective_rank",
    "entropy_effective_rank",
    "effective_dimension",
    "kta",
    "kta_uncentered",
    "cka",
    "kta_chance",
    "cka_chance",
    "relative_change",
    "kernel_distance",
    "log10_scale_change",
    "kta_change",
    "lambda_max_change",
)


@dataclass
class NTKReport:
    """All metrics of one (N, N) kernel; conventions of :mod:`ntk_callback.analysis`.

    Always present: ``num_probes`` (N), ``eigenvalues`` (float64 (N,), descending,
    clamped), ``lambda_max``, ``lambda_min``, ``min_raw_eigenvalue``, ``condition_number``
    (inf when singular), ``log10_condition_number`` (finite when singular), ``trace``,
    ``frobenius_norm``, ``symmetry_residual``, ``effective_rank`` (participation ratio),
    ``entropy_effective_rank``.

    With ``targets``: ``kta`` (centred targets, uncentred kernel: the default),
    ``kta_uncentered`` (raw targets), ``cka`` (centred kernel and targets), computed on the
    alignment kernel (``K`` itself unless :func:`analyze_ntk` got ``alignment_kernel``;
    ``alignment_source`` names it for the console), and their chance levels ``kta_chance``,
    ``cka_chance``: the mean of ``kta`` / ``cka`` over all permutations of the targets
    (:func:`ntk_callback.analysis.alignment_chance_level`).
    With ``gamma``: ``effective_dimension``.
    With ``init_kernel`` (K_0, same probes): ``relative_change``, ``kernel_distance``,
    ``log10_scale_change = log10(tr K / tr K_0)`` (NaN when a trace is 0),
    ``init_lambda_max``, ``lambda_max_change = (lambda_max - lambda_max_0) / lambda_max_0``
    (relative; NaN when lambda_max_0 = 0), and with targets as well ``init_kta`` and
    ``kta_change = kta - kta_0`` (absolute, same targets, both on the alignment kernel;
    left out when an alignment kernel was given for K but not for K_0).
    ``init_label`` (e.g. ``"step 0, train start"``) says which K_0 the drift is against.
    Fields that do not apply are ``None``.

    ``kernel`` (float64 symmetrised K) and ``targets`` are kept for :meth:`format`;
    ``title`` (e.g. ``"epoch 5, step 120"``) heads the console text.
    """

    num_probes: int
    eigenvalues: torch.Tensor = field(repr=False)
    lambda_max: float
    lambda_min: float
    min_raw_eigenvalue: float
    condition_number: float
    log10_condition_number: float
    trace: float
    frobenius_norm: float
    symmetry_residual: float
    effective_rank: float
    entropy_effective_rank: float
    kta: float | None = None
    kta_uncentered: float | None = None
    cka: float | None = None
    kta_chance: float | None = None
    cka_chance: float | None = None
    gamma: float | None = None
    effective_dimension: float | None = None
    relative_change: float | None = None
    kernel_distance: float | None = None
    log10_scale_change: float | None = None
    init_lambda_max: float | None = None
    lambda_max_change: float | None = None
    init_kta: float | None = None
    kta_change: float | None = None
    kernel: torch.Tensor | None = field(default=None, repr=False)
    targets: torch.Tensor | None = field(default=None, repr=False)
    title: str = ""
    alignment_source: str = ""
    init_label: str = ""

    def to_dict(self) -> dict[str, float]:
        """Flat ``{name: float}`` for loggers; names are the logged scalar keys without ``ntk/``.

        Keys: ``num_probes, lambda_max, lambda_min, min_raw_eigenvalue, condition_number,
        log10_condition_number, trace, frobenius_norm, symmetry_residual, effective_rank,
        entropy_effective_rank`` always; ``kta, kta_uncentered, cka, kta_chance,
        cka_chance`` only with targets;
        ``effective_dimension`` only with gamma; ``relative_change, kernel_distance,
        log10_scale_change, lambda_max_change`` only with an initial kernel, and
        ``kta_change`` only with both.
        Missing inputs omit keys rather than logging NaN. Values may be ``inf``
        (``condition_number`` of a singular kernel) or ``nan`` (undefined, e.g. one class).
        ``init_lambda_max`` / ``init_kta`` are constant over a run and stay fields only.
        """
        out: dict[str, float] = {}
        for key in _SCALAR_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value)
        return out

    def format(self, *, max_cells: int = 32, bins: int = 6, title: str | None = None) -> str:
        """The compact console report (at most ``max_cells + 13`` lines, deterministic).

        A heatmap of |K| (probes ordered by class when integer class labels were given,
        rows labelled by class, ``~`` for a block mixing classes), with ``b x b`` blocks
        averaged, ``b = ceil(N / max_cells)``, each cell drawn as two glyphs of ``RAMP`` on a
        linear scale from 0 to the largest cell; then the spectrum, conditioning and
        effective rank, alignment, drift versus the initial kernel, and a ``bins``-bin
        histogram of log10(lambda) drawn with ``#`` bars.
        """
        if int(max_cells) != max_cells or max_cells < 1:
            raise ValueError(f"max_cells must be a positive integer; got {max_cells!r}.")
        if int(bins) != bins or bins < 1:
            raise ValueError(f"bins must be a positive integer; got {bins!r}.")
        n = self.num_probes
        head = title if title is not None else self.title
        lines = [f"NTK report{' -- ' + head if head else ''} -- {n} probes"]
        if self.kernel is not None:
            lines += _heatmap_lines(self.kernel, _class_labels(self.targets, n), int(max_cells))

        lines.append(
            f"spectrum   lambda_max {_g(self.lambda_max)}  lambda_min {_g(self.lambda_min)}"
            f"  trace {_g(self.trace)}"
            + (
                f"  eff. dim (gamma={self.gamma:.3g}) {_f(self.effective_dimension, 2)}"
                if self.effective_dimension is not None
                else ""
            )
        )
        kappa = "inf (singular)" if math.isinf(self.condition_number) else _g(self.condition_number)
        lines.append(
            f"condition  kappa {kappa}  log10 {_f(self.log10_condition_number, 2)}"
            f"   eff. rank {_f(self.effective_rank, 2)} / {n}"
            f" (entropy {_f(self.entropy_effective_rank, 2)} / {n})"
        )
        if self.kta is not None:
            source = f" ({self.alignment_source})" if self.alignment_source else ""
            lines.append(
                f"alignment{source}  KTA {_f(self.kta, 4)} (chance {_f(self.kta_chance, 4)}, "
                f"uncentred {_f(self.kta_uncentered, 4)})  CKA {_f(self.cka, 4)} "
                f"(chance {_f(self.cka_chance, 4)})"
            )
        if self.relative_change is not None:
            against = f" vs K0 at {self.init_label}" if self.init_label else ""
            lines.append(f"drift{against}  " + "  ".join(self._drift_cells()))
        lines += _histogram_lines(self, int(bins))
        return "\n".join(lines)

    def _drift_cells(self) -> list[str]:
        """Drift versus K_0, the scale-free kernel distance first (the raw relative change and
        lambda_max change also carry the change of the kernel's overall scale)."""
        cells = [f"kernel distance {_g(self.kernel_distance)}"]
        scale = self.log10_scale_change
        if scale is not None:
            cells.append("scale n/a" if not math.isfinite(scale)
                         else f"scale x{10 ** scale:.3g} (log10 {scale:+.2f})")
        if self.kta_change is not None:
            cells.append(f"KTA change {_f(self.kta_change, 4, sign=True)}")
        cells.append(f"rel. change {_f(self.relative_change, 4)}")
        change = self.lambda_max_change
        cells.append(
            "lambda_max change "
            + ("nan" if change is None or math.isnan(change) else f"{100 * change:+.2f}%")
        )
        return cells

    def format_compact(self, *, title: str | None = None) -> str:
        """The report in one or two lines (for long runs): spectrum, conditioning and effective
        rank on the first; alignment and drift on the second (when present)."""
        head = title if title is not None else self.title
        first = (
            f"{head or 'NTK'} ({self.num_probes} probes): lambda_max {_g(self.lambda_max)}"
            f"  log10 kappa {_f(self.log10_condition_number, 2)}"
            f"  eff. rank {_f(self.effective_rank, 2)}  trace {_g(self.trace)}"
        )
        cells = []
        if self.kta is not None:
            cells.append(
                f"KTA {_f(self.kta, 4)} (chance {_f(self.kta_chance, 3)})  CKA {_f(self.cka, 4)}"
                f" (chance {_f(self.cka_chance, 3)})"
            )
        if self.relative_change is not None:
            cells.append(" ".join(self._drift_cells()[:3]).replace("kernel distance", "distance"))
        return first if not cells else first + "\n    " + "  |  ".join(cells)

    def __str__(self) -> str:
        return self.format()


def analyze_ntk(
    K: ArrayLike,
    targets: ArrayLike | None = None,
    *,
    init_kernel: ArrayLike | None = None,
    num_classes: int | None = None,
    gamma: float | None = None,
    title: str = "",
    alignment_kernel: ArrayLike | None = None,
    init_alignment_kernel: ArrayLike | None = None,
    alignment_source: str = "",
    init_label: str = "",
) -> NTKReport:
    """Gather every metric of :mod:`ntk_callback.analysis` for the (N, N) kernel ``K``.

    Args:
        K: (N, N) kernel (torch or numpy, any real dtype/device); analysed in float64 on
            the CPU after symmetrisation ``(K + K^T)/2``.
        targets: (N,) int class labels, or (N,) / (N, O) float regression targets of the
            same probes; enables ``kta``, ``kta_uncentered``, ``cka`` (and ``kta_change``).
        init_kernel: (N, N) kernel of the same probes at initialisation; enables the drift
            fields.
        num_classes: number of classes for validating int labels (does not change values).
        gamma: ridge for ``effective_dimension`` (omitted when None).
        title: heading of :meth:`NTKReport.format`, e.g. ``"epoch 5, step 120"``.
        alignment_kernel: (N, N) kernel of the same probes the alignments (``kta``,
            ``kta_uncentered``, ``cka``) are computed on instead of ``K``. A kernel that
            does not depend on the labels is needed for a meaningful alignment: the
            target-mode kernel uses each probe's own label logit and is aligned with the
            labels before any training; pass the trace kernel (or its projected estimate).
            Default: ``K`` itself.
        init_alignment_kernel: the same kind of kernel at initialisation, for
            ``kta_change``; default ``init_kernel`` when ``alignment_kernel`` is None (with
            an ``alignment_kernel`` but no ``init_alignment_kernel``, ``kta_change`` is
            left out rather than mixing two kinds of kernel).
        alignment_source: which kernel the alignments come from, shown on the console
            (e.g. ``"trace kernel"``).
        init_label: which K_0 the drift is measured against, shown on the console (e.g.
            ``"step 0, train start"``).

    Undefined alignments (one class, equal targets, N = 1, zero kernel) become NaN with a
    single :class:`~ntk_callback.analysis.AlignmentUndefinedWarning` naming the cause.
    """
    raw = A._raw_kernel(K)
    Ks = A._sym(raw)
    n = Ks.shape[0]
    lam_raw = A._raw_eigenvalues_desc(Ks)
    lam = lam_raw.clamp_min(0.0)
    report = NTKReport(
        num_probes=n,
        eigenvalues=lam,
        lambda_max=float(lam[0]),
        lambda_min=float(lam[-1]),
        min_raw_eigenvalue=float(lam_raw[-1]),
        condition_number=A._condition_from(lam),
        log10_condition_number=A._log10_condition_from(lam),
        trace=float(torch.diagonal(raw).sum()),
        frobenius_norm=float(torch.linalg.matrix_norm(Ks)),
        symmetry_residual=A.symmetry_residual(raw),
        effective_rank=A._effective_rank_from(lam),
        entropy_effective_rank=A._entropy_effective_rank_from(lam),
        kernel=Ks,
        title=title,
        alignment_source=alignment_source,
        init_label=init_label,
    )
    if gamma is not None:
        report.gamma = float(gamma)
        report.effective_dimension = A.effective_dimension(Ks, gamma)

    reasons: list[str] = []
    Ks0: torch.Tensor | None = None
    if init_kernel is not None:
        Ks0 = A._kernel(init_kernel, "init_kernel")
        if Ks0.shape != Ks.shape:
            raise ValueError(
                f"init_kernel has shape {tuple(Ks0.shape)} but K has {tuple(Ks.shape)}; the "
                "initial kernel must be computed on the same probes in the same order."
            )
        report.relative_change = A.relative_change(Ks, Ks0)
        report.kernel_distance = A.kernel_distance(Ks, Ks0)
        report.log10_scale_change = A.log10_scale_change(Ks, Ks0)
        lmax0 = float(A._raw_eigenvalues_desc(Ks0)[0])
        lmax0 = max(lmax0, 0.0)
        report.init_lambda_max = lmax0
        report.lambda_max_change = (
            (report.lambda_max - lmax0) / lmax0 if lmax0 > 0.0 else math.nan
        )

    if targets is not None:
        Y, is_labels = A._target_matrix(targets, n, num_classes)

        def align(kernel: torch.Tensor, name: str, **how: bool) -> float:
            value, reason = A._alignment(kernel, Y, is_labels, **how)
            if reason is not None and not how.get("chance"):
                reasons.append(f"{name} ({reason})")
            return value

        Ka, Ka0 = Ks, Ks0
        if alignment_kernel is not None:
            Ka = _same_probes(alignment_kernel, "alignment_kernel", n)
            Ka0 = None
        if init_alignment_kernel is not None:
            Ka0 = _same_probes(init_alignment_kernel, "init_alignment_kernel", n)
        report.targets = A._to_tensor(targets, "targets")
        report.kta = align(Ka, "kta", center_targets=True, center_kernel=False)
        report.kta_uncentered = align(Ka, "kta_uncentered", center_targets=False,
                                      center_kernel=False)
        report.cka = align(Ka, "cka", center_targets=True, center_kernel=True)
        report.kta_chance = align(Ka, "kta", center_targets=True, center_kernel=False, chance=True)
        report.cka_chance = align(Ka, "cka", center_targets=True, center_kernel=True, chance=True)
        if Ks0 is not None and Ka0 is not None:
            report.init_kta = align(Ka0, "init kta", center_targets=True, center_kernel=False)
            report.kta_change = report.kta - report.init_kta
    if reasons:
        warnings.warn(
            "analyze_ntk: alignment undefined, set to NaN: " + "; ".join(reasons)
            + ". Use probes from at least two classes (or with varying targets).",
            A.AlignmentUndefinedWarning,
            stacklevel=2,
        )
    return report


def _same_probes(K: ArrayLike, name: str, n: int) -> torch.Tensor:
    Ks = A._kernel(K, name)
    if Ks.shape != (n, n):
        raise ValueError(
            f"{name} has shape {tuple(Ks.shape)} but K is ({n}, {n}); it must be computed on "
            "the same probes in the same order."
        )
    return Ks


# ------------------------------------------------------------------ rendering


def _g(x: float | None) -> str:
    """Scientific notation for magnitudes (eigenvalues, traces, distances)."""
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.3e}"


def _f(x: float | None, digits: int, sign: bool = False) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:{'+' if sign else ''}.{digits}f}"


def _class_labels(targets: torch.Tensor | None, n: int) -> np.ndarray | None:
    """Integer class labels (N,) when the targets are 1-D ints, else None."""
    if targets is None or targets.ndim != 1 or targets.is_floating_point() or targets.shape[0] != n:
        return None
    return targets.to(torch.int64).numpy()


def _heatmap_lines(Ks: torch.Tensor, labels: np.ndarray | None, max_cells: int) -> list[str]:
    n = Ks.shape[0]
    order = np.argsort(labels, kind="stable") if labels is not None else np.arange(n)
    M = np.abs(Ks.numpy())[np.ix_(order, order)]
    b = -(-n // max_cells)  # ceil: block size so that at most max_cells cells per side
    starts = np.arange(0, n, b)
    sizes = np.diff(np.append(starts, n))
    sums = np.add.reduceat(np.add.reduceat(M, starts, axis=0), starts, axis=1)
    cells = sums / np.outer(sizes, sizes)
    vmax = float(cells.max())
    if vmax > 0.0:
        idx = np.minimum((cells / vmax * len(RAMP)).astype(np.int64), len(RAMP) - 1)
    else:
        idx = np.zeros(cells.shape, dtype=np.int64)

    if labels is not None:
        sorted_labels = labels[order]
        row_names = []
        for s, size in zip(starts, sizes):
            block = sorted_labels[s : s + size]
            row_names.append(str(block[0]) if (block == block[0]).all() else "~")
        mixed = any(name == "~" for name in row_names)
        how = "probes ordered by class" + (", ~ = mixed block" if mixed else "")
    else:
        row_names = [""] * len(starts)
        how = "probes in input order"
    width = max(len(name) for name in row_names)
    per_cell = f"{b}x{b} probes per cell" if b > 1 else "1 probe per cell"
    lines = [f"|K| heatmap ({how}; {per_cell}; '{RAMP}' = 0 .. {vmax:.3g})"]
    for name, row in zip(row_names, idx):
        lines.append(f"{name:>{width}} |" + "".join(RAMP[i] * 2 for i in row) + "|")
    return lines


def _histogram_lines(report: NTKReport, bins: int) -> list[str]:
    hist = A._histogram_from(report.eigenvalues, bins)
    n_pos = report.num_probes - hist.num_zero
    lines = [
        f"log10(lambda) histogram: {n_pos} > 0, {hist.num_zero} numerically zero;"
        f" min raw eigenvalue {_g(report.min_raw_eigenvalue)},"
        f" asymmetry {_g(report.symmetry_residual)}"
    ]
    if n_pos == 0:
        return lines
    counts = hist.counts.tolist()
    edges = hist.edges.tolist()
    top = max(counts)
    for i, c in enumerate(counts):
        bar = "#" * (0 if c == 0 else max(1, round(30 * c / top)))
        close = "]" if i == len(counts) - 1 else ")"
        lines.append(f"  [{edges[i]:6.2f}, {edges[i + 1]:6.2f}{close} {bar:<30} {c}")
    return lines
