"""Pictures of a kernel and of its evolution: heatmap, spectrum, drift curves.

* :func:`kernel_heatmap_image` needs numpy only and returns a ``uint8`` (3, H, W) image
  (the layout ``SummaryWriter.add_image`` takes by default).
* :func:`spectrum_figure`, :func:`drift_figure`, :func:`layers_figure` and
  :func:`dynamics_figure` need matplotlib (optional dependency,
  ``pip install matplotlib``); they build figures without ``pyplot`` (no global figure
  state, no GUI backend) and :func:`figure_to_image` rasterises them to (3, H, W) uint8.
* :func:`save_png` writes any of these to a PNG file with a tiny zlib encoder, so it
  works without matplotlib or Pillow.

A *history* is a sequence of report records as kept by
:class:`~ntk_callback.NTKReportCallback` (``callback.history``): mappings with ``"step"``
(int, the trainer's global step), ``"tag"`` (``"init"``, ``"epoch"`` or ``"final"``),
``"epoch"``, ``"eigenvalues"`` (descending, clamped at 0) and ``"metrics"`` (the flat
``NTKReport.to_dict()``, plus ``layer_share/<name>``, ``layer_drift/<name>`` and the
dynamics keys of :class:`ntk_callback.insight.DynamicsTracker` when the callback logs them).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Viridis sampled at 0, 1/8, ..., 1 (matplotlib's perceptually uniform map). Its luminance
# rises monotonically, so brighter always means larger; none of its colours is white,
# which is therefore free for the class-boundary lines.
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 82, 139],
        [44, 114, 142],
        [33, 145, 140],
        [40, 174, 128],
        [94, 201, 98],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
BOUNDARY_COLOR = (255, 255, 255)

# Text sizes (points at 100 dpi) of every picture. TensorBoard shows an image scaled to its
# card (~340 px wide in a 1400 px window): at ~420 px wide a 9 pt tick label stays ~10 px tall.
_FS_TICK = 9.0
_FS_LABEL = 9.5
_FS_TITLE = 10.0
_FS_NOTE = 8.5


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN -> 0) to viridis RGB, ``uint8`` of shape
    ``values.shape + (3,)``."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    v = np.clip(v, 0.0, 1.0)
    grid = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = np.stack([np.interp(v, grid, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "is_floating_point") and x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def class_order(labels: Any | None, n: int) -> tuple[np.ndarray, list[int]]:
    """Stable order that groups probes by label, and the class boundaries in that order.

    Returns ``(order, boundaries)``: ``order`` an (n,) index array, ``boundaries`` the
    positions ``b`` in the sorted order where a new class starts (``0 < b < n``). Without
    integer labels the order is the identity and there are no boundaries (regression
    targets are ordered by :func:`probe_layout`).
    """
    if labels is None:
        return np.arange(n), []
    y = _to_numpy(labels).reshape(-1)
    if y.shape[0] != n or y.dtype.kind not in "iub":
        return np.arange(n), []
    order = np.argsort(y, kind="stable")
    ys = y[order]
    boundaries = [int(i) for i in np.flatnonzero(ys[1:] != ys[:-1]) + 1]
    return order, boundaries


@dataclass
class ProbeLayout:
    """How the probes are laid out along both axes of a heatmap.

    ``kind`` is ``"class"`` (integer labels: grouped by class, stable), ``"input"`` (one
    scalar input per probe: sorted by it, so the kernel of a 1-D regression reads as a
    band instead of a plaid), ``"target"`` (one real target per probe, shape (N,) or
    (N, 1): sorted by value, stable) or ``"index"`` (the probes' own order).
    ``classes`` lists ``(start, end, label)`` per class in the sorted order;
    ``boundaries`` the ``start`` of every class but the first; ``sorted_values`` the
    input or target values in the sorted order (``"input"`` / ``"target"`` only).
    """

    order: np.ndarray
    kind: str = "index"
    boundaries: list[int] = field(default_factory=list)
    classes: list[tuple[int, int, Any]] = field(default_factory=list)
    sorted_values: np.ndarray | None = None


def _scalar_per_probe(values: Any | None, n: int) -> np.ndarray | None:
    """``values`` as an (n,) array when it holds exactly one number per probe, else None."""
    shape = getattr(
        values, "shape", None
    )  # tensors and arrays only (not dicts / tuples of model inputs)
    if shape is None or len(shape) == 0 or int(np.prod(tuple(shape))) != n or shape[0] != n:
        return None
    try:
        v = _to_numpy(values)
    except (TypeError, ValueError, RuntimeError):
        return None
    if v.dtype == object or v.size != n or v.ndim == 0 or v.shape[0] != n:
        return None
    return v.reshape(n)


def probe_layout(labels: Any | None, n: int, inputs: Any | None = None) -> ProbeLayout:
    """The :class:`ProbeLayout` of ``n`` probes.

    Order of preference: integer ``labels`` -> grouped by class; a scalar input per probe
    (``inputs`` of shape (N,) or (N, 1), ...) -> sorted by input; real ``labels`` with one
    value per probe (regression targets) -> sorted by target; otherwise the given order.
    A kernel of a 1-D regression is smooth in the input, not in the target (``sin(2x)``
    takes each value at several far-apart inputs), hence the input first.
    """
    y = _scalar_per_probe(labels, n)
    if y is not None and y.dtype.kind in "iub":
        order, boundaries = class_order(y, n)
        starts, ends = [0] + boundaries, boundaries + [n]
        ys = y[order]
        return ProbeLayout(
            order, "class", boundaries, [(s, e, ys[s].item()) for s, e in zip(starts, ends)]
        )
    for kind, v in (("input", _scalar_per_probe(inputs, n)), ("target", y)):
        if v is not None and v.dtype.kind in "iuf":
            v = v.astype(np.float64)
            order = np.argsort(
                np.where(np.isfinite(v), v, np.inf), kind="stable"
            )  # non-finite last
            return ProbeLayout(order, kind, sorted_values=v[order])
    return ProbeLayout(np.arange(n))


def _heatmap_cells(
    K: Any, labels: Any | None, inputs: Any | None, max_cells: int
) -> tuple[np.ndarray, ProbeLayout]:
    """The kernel in its :func:`probe_layout` order, block-averaged onto at most ``max_cells``
    cells per side."""
    A = _to_numpy(K).astype(np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(
            f"the kernel heatmap needs a non-empty square (N, N) kernel, got shape {A.shape}"
        )
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    n = A.shape[0]
    layout = probe_layout(labels, n, inputs)
    A = A[np.ix_(layout.order, layout.order)]
    if n > max_cells:
        groups = (np.arange(n) * max_cells) // n  # consecutive, near-equal groups
        counts = np.bincount(groups, minlength=max_cells).astype(np.float64)
        summed = np.zeros((max_cells, max_cells))
        np.add.at(summed, (groups[:, None], groups[None, :]), A)
        A = summed / np.outer(counts, counts)
    return A, layout


def _finite_range(A: np.ndarray) -> tuple[float, float]:
    finite = np.isfinite(A)
    if not finite.any():
        return 0.0, 0.0
    return float(A[finite].min()), float(A[finite].max())


def kernel_color_range(
    K0: Any, labels: Any | None = None, *, inputs: Any | None = None, max_cells: int = 256
) -> tuple[float, float]:
    """``(vmin, vmax)`` of a kernel as its heatmap draws it (same order, same block averaging).

    Passed as ``vmin``/``vmax`` to the heatmaps of later kernels, this fixes their colour
    scale to the initial kernel's (``heatmap_scale="initial"``), so that colours compare
    across steps; entries outside the range are clipped to the end colours.
    """
    A, _ = _heatmap_cells(K0, labels, inputs, max_cells)
    return _finite_range(A)


def _normalise(
    A: np.ndarray, vmin: float | None, vmax: float | None
) -> tuple[np.ndarray, float, float]:
    lo, hi = _finite_range(A)
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    span = hi - lo
    norm = (A - lo) / span if span > 0 else np.zeros_like(A)
    return np.where(np.isfinite(A), norm, 0.0), lo, hi


def kernel_heatmap_image(
    K: Any,
    labels: Any | None = None,
    *,
    inputs: Any | None = None,
    max_cells: int = 256,
    cell_px: int | None = None,
    target_px: int = 256,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Bare heatmap of a kernel as an RGB ``uint8`` image of shape (3, H, W), numpy only.

    The cells only (no title, ticks or colour bar): :func:`kernel_heatmap_figure` draws the
    annotated picture that the loggers get when matplotlib is installed; this one is their
    fallback without it.

    Args:
        K: (N, N) kernel (torch tensor or array).
        labels: optional (N,) integer labels: probes are then ordered by class (stable)
            and a 1-pixel white line is drawn where each new class starts; or (N,) /
            (N, 1) real regression targets (see ``inputs`` and :func:`probe_layout`).
        inputs: optional probe inputs; one scalar per probe ((N,) or (N, 1)) sorts
            regression probes by input.
        max_cells: when N exceeds it, the sorted kernel is block-averaged onto a
            ``max_cells x max_cells`` grid (groups of consecutive probes).
        cell_px: pixels per cell; default ``max(1, target_px // cells)``.
        vmin, vmax: fixed ends of the colour scale (e.g. :func:`kernel_color_range` of
            the initial kernel); default the displayed matrix's own min / max.

    Colour: viridis, linear from ``vmin`` (dark purple) to ``vmax`` (yellow), clipped
    outside; a constant matrix is drawn at the bottom of the scale. Non-finite entries are
    drawn as the bottom colour.
    """
    A, layout = _heatmap_cells(K, labels, inputs, max_cells)
    n, m = len(layout.order), A.shape[0]
    scale = int(cell_px) if cell_px is not None else max(1, target_px // m)
    if scale < 1:
        raise ValueError(f"cell_px must be >= 1, got {cell_px}")
    norm, _, _ = _normalise(A, vmin, vmax)
    rgb = colormap(norm)  # (m, m, 3)
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    side = m * scale
    for b in layout.boundaries:
        px = int(round(b * m * scale / n))
        if 0 < px < side:
            rgb[px, :, :] = BOUNDARY_COLOR
            rgb[:, px, :] = BOUNDARY_COLOR
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


HEATMAP_SCALES = ("per_report", "initial")
"""Colour scales of the logged heatmap: each report's own min..max, or the initial kernel's."""


def report_title(tag: str | None, step: int | None, epoch: int | None, what: str = "NTK") -> str:
    """``"initial NTK (step 0)"``, ``"NTK, epoch 3 (step 150)"``,
    ``"NTK at the end of training (step 157)"``."""
    where = f"step {step}" if step is not None else ""
    if tag == "init":
        return f"initial {what} ({where or 'before training'})"
    if tag == "final":
        return f"{what} at the end of training" + (f" ({where})" if where else "")
    if epoch is not None:
        return f"{what}, epoch {int(epoch)}" + (f" ({where})" if where else "")
    return f"{what} ({where})" if where else what


def _spaced_classes(
    classes: list[tuple[int, int, Any]], n: int, max_labels: int, min_gap: float = 0.0
) -> list[tuple[int, int, Any]]:
    """The classes to label: all of them when there are at most ``max_labels`` and no two centres
    are closer than ``min_gap`` probes; otherwise the first, then each next class whose centre is
    at least ``max(n / max_labels, min_gap)`` probes past the last labelled one (never two labels
    on top of each other, even with unequal class sizes)."""
    centres = [(s + e) / 2 for s, e, _ in classes]
    if len(classes) <= max_labels and all(b - a >= min_gap for a, b in zip(centres, centres[1:])):
        return list(classes)
    gap = max(n / max(1, max_labels), min_gap)
    shown: list[tuple[int, int, Any]] = []
    for c in classes:
        if not shown or (c[0] + c[1]) / 2 - (shown[-1][0] + shown[-1][1]) / 2 >= gap - 1e-9:
            shown.append(c)
    return shown[:max_labels]


def _value_labels(values: np.ndarray) -> list[str]:
    """Short tick labels for sorted input / target values: as many decimals as their spread needs
    (``-3.1 -1.8 -0.1 1.4 3.1`` rather than ``-0.056``), general format when far from 1."""
    finite = values[np.isfinite(values)]
    spread = float(np.ptp(finite)) if finite.size > 1 else 0.0
    top = float(np.max(np.abs(finite))) if finite.size else 0.0
    if spread > 0 and 1e-3 <= top < 1e4:
        decimals = int(min(4, max(0, 1 - np.floor(np.log10(spread)))))
        return [f"{x:.{decimals}f}" for x in values]
    return [f"{x:.2g}" for x in values]


def kernel_heatmap_figure(
    K: Any,
    labels: Any | None = None,
    *,
    inputs: Any | None = None,
    step: int | None = None,
    epoch: int | None = None,
    tag: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    scale_note: str | None = None,
    max_cells: int = 256,
    max_class_labels: int = 12,
    figsize: tuple[float, float] = (4.2, 3.8),
) -> Any:
    """Annotated kernel heatmap, the picture logged as ``<prefix>/kernel``. Needs matplotlib.

    The same cells and colours as :func:`kernel_heatmap_image` (probes grouped by class, or
    regression probes sorted by scalar input or target, see :func:`probe_layout`;
    block-averaged above ``max_cells``), plus:

    * a colour bar in the kernel's own units. By default each report uses its own
      min..max (structure always visible, values read off the bar); with a fixed range
      ``vmin``/``vmax`` (e.g. :func:`kernel_color_range` of the initial kernel K0) the
      colours compare across steps, and the bar gets arrows at the ends that clip;
    * class boundaries (white lines, left out when classes are thinner than 4 pixels) and
      the class labels at the class centres (all of them when there are at most
      ``max_class_labels`` and they do not collide; else spaced at least N /
      ``max_class_labels`` probes and ~12 px apart: 100 equal classes show every 9th); for
      regression probes,
      the tick labels give the input / target value at that position of the sorted order;
    * the report in the title (:func:`report_title` of ``tag``, ``epoch``, ``step``), N
      and the colour scale below it (``scale_note`` overrides the default wording).

    Reads from N = 8 to N = 1024 at TensorBoard's card size (~400 px wide). Returns a
    matplotlib ``Figure``; :func:`figure_to_image` rasterises it (460 x 410 px by default).
    """
    Figure = _require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    A, layout = _heatmap_cells(K, labels, inputs, max_cells)
    n = len(layout.order)
    norm, lo, hi = _normalise(A, vmin, vmax)
    fig = Figure(figsize=figsize, dpi=100)
    ax = fig.add_axes((0.16, 0.13, 0.62, 0.72))
    cax = fig.add_axes((0.81, 0.13, 0.035, 0.72))
    # RGB cells from our own colormap (no lookup inside matplotlib): the pixels are exactly
    # colormap(norm)
    ax.imshow(colormap(norm), interpolation="nearest", extent=(0, n, n, 0), aspect="equal")
    flo, fhi = _finite_range(A)
    extend = ("neither", "max", "min", "both")[int(fhi > hi) + 2 * int(flo < lo)]
    cmap = ListedColormap(colormap(np.linspace(0.0, 1.0, 256)) / 255.0)
    bar = fig.colorbar(
        ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1.0), cmap=cmap),
        cax=cax,
        extend=extend,
    )
    bar.ax.tick_params(labelsize=_FS_TICK)
    bar.formatter.set_powerlimits((-4, 5))  # offset notation only for very large / small entries
    axes_px = 0.62 * figsize[0] * fig.dpi
    if layout.kind == "class":
        k = len(layout.classes)
        if (
            layout.boundaries and axes_px / k >= 4
        ):  # thinner classes: the lines would hide the cells
            for b in layout.boundaries:
                ax.axhline(b, color="white", lw=0.7)
                ax.axvline(b, color="white", lw=0.7)
        # labels ~12 px apart at least (9 pt text), whatever the class sizes
        shown = _spaced_classes(layout.classes, n, max_class_labels, min_gap=12.0 * n / axes_px)
        ticks = [(s + e) / 2 for s, e, _ in shown]
        names = [str(c) for _, _, c in shown]
        ax.set_xticks(
            ticks, names, fontsize=_FS_TICK, rotation=90 if max(map(len, names)) > 3 else 0
        )
        ax.set_yticks(ticks, names, fontsize=_FS_TICK)
        xlabel = f"class ({k} classes" + (f", {len(shown)} labelled)" if len(shown) < k else ")")
        ylabel = "class"
    elif layout.sorted_values is not None:  # kind "input" or "target"
        v = layout.sorted_values
        pos = np.unique(np.linspace(0, n - 1, min(n, 5)).round().astype(int))
        names = _value_labels(v[pos])
        ax.set_xticks(pos + 0.5, names, fontsize=_FS_TICK)
        ax.set_yticks(pos + 0.5, names, fontsize=_FS_TICK)
        xlabel = ylabel = f"probe {layout.kind} (sorted)"
    else:
        ax.tick_params(labelsize=_FS_TICK)
        xlabel = ylabel = "probe index"
    ax.set_xlabel(xlabel, fontsize=_FS_LABEL)
    ax.set_ylabel(ylabel, fontsize=_FS_LABEL)
    if scale_note is None:
        scale_note = (
            "colour range: this report" if vmin is None and vmax is None else "colour range: fixed"
        )
    cells = A.shape[0]
    avg = f", {cells}x{cells} block means" if cells < n else ""
    fig.text(
        0.5, 0.975, report_title(tag, step, epoch), ha="center", va="top", fontsize=_FS_TITLE + 0.5
    )
    fig.text(
        0.5,
        0.925,
        f"N = {n}{avg}; {scale_note}",
        ha="center",
        va="top",
        fontsize=_FS_NOTE,
        color="0.3",
    )
    return fig


# ----------------------------------------------------------------------------- figures


def _require_matplotlib() -> Any:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the annotated heatmap and the spectrum/drift/layers/dynamics figures need matplotlib: "
            "pip install matplotlib (the bare kernel heatmap and the scalars work without it)"
        ) from err
    return Figure


def _record_label(rec: Mapping[str, Any]) -> str:
    tag = rec.get("tag", "")
    step = rec.get("step", "?")
    if tag == "init":
        return f"init (step {step})"
    if tag == "epoch":
        return f"epoch {int(rec.get('epoch', 0))} (step {step})"
    return f"{tag or 'step'} (step {step})"


def _subsample(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    idx = np.unique(np.rint(np.linspace(0, n - 1, k)).astype(int))
    return [int(i) for i in idx]


# Pictures are laid out for TensorBoard's image cards (~400 px wide): about 480 px wide at
# 100 dpi, one panel per row, 8-10 pt text (so ~7-9 px tall at card size).
_WIDTH_IN = 4.2
_PANEL_IN = 2.05


def _stacked(
    Figure: Any, rows: int, extra_in: float = 0.0, bottom_in: float = 0.45
) -> tuple[Any, list[Any]]:
    """A figure of ``rows`` panels stacked vertically sharing the x axis (global step)."""
    height = rows * _PANEL_IN + extra_in + bottom_in + 0.1
    fig = Figure(figsize=(_WIDTH_IN, height), dpi=100)
    axes: list[Any] = []
    for i in range(rows):
        ax = fig.add_subplot(rows, 1, i + 1, sharex=axes[0] if axes else None)
        ax.tick_params(labelsize=_FS_TICK)
        ax.grid(True, alpha=0.3)
        if i < rows - 1:
            ax.tick_params(labelbottom=False)
        axes.append(ax)
    axes[-1].set_xlabel("global step", fontsize=_FS_LABEL)
    # fixed margins: tight_layout would render the figure twice (the dominant cost)
    fig.subplots_adjust(
        left=0.15,
        right=0.97,
        top=1 - 0.32 / height,
        bottom=(bottom_in + extra_in) / height,
        hspace=0.42 * 2.05 / _PANEL_IN,
    )
    return fig, axes


def _numerically_zero_floor(lam: np.ndarray) -> float:
    """``lambda_max * N * eps64``: a float64 eigenvalue of the kernel below it is round-off."""
    return max(
        float(np.max(lam)) * lam.size * float(np.finfo(np.float64).eps),
        float(np.finfo(np.float64).tiny),
    )


def spectrum_figure(history: Sequence[Mapping[str, Any]], *, max_curves: int = 10) -> Any:
    """Eigenvalue spectra of the reports in ``history`` on one plot (``<prefix>/spectrum``).

    x: eigenvalue index i = 1..N (descending); y: log10 lambda_i. At most ``max_curves``
    reports are drawn, evenly spaced, first and last always included; the colour encodes
    the report's global step (dark: early, yellow: late), read off the colour bar (no
    legend over the curves; each line keeps its report as its label, e.g.
    ``"epoch 3 (step 150)"``). Eigenvalues at or below ``lambda_max * N * eps64`` are
    numerically zero (round-off of a float64 eigensolver): a curve stops at its last
    eigenvalue above that level, marked with a down triangle, and the note in the corner
    says how many are numerically zero (first and last report drawn). Returns a
    matplotlib ``Figure`` (500 x 340 px).
    """
    Figure = _require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    fig = Figure(figsize=(4.4, 3.3), dpi=100)
    ax = fig.add_axes((0.13, 0.14, 0.66, 0.75))
    recs = [r for r in history if len(r.get("eigenvalues", ())) > 0]
    chosen = [recs[i] for i in _subsample(len(recs), max_curves)]
    steps = [float(r.get("step", 0) or 0) for r in chosen]
    s0, s1 = (min(steps), max(steps)) if steps else (0.0, 1.0)
    span = (s1 - s0) or 1.0
    zeros = []
    for rec, s in zip(chosen, steps):
        lam = np.asarray(rec["eigenvalues"], dtype=np.float64)
        lam = lam[np.isfinite(lam)]
        if lam.size == 0:
            continue
        keep = lam > _numerically_zero_floor(lam)
        zeros.append((rec, int(lam.size - keep.sum()), lam.size))
        c = colormap(np.asarray(0.9 * (s - s0) / span)) / 255.0
        idx = np.flatnonzero(keep) + 1
        # log10 on a linear axis: log-scale tick labels go through mathtext, ~10x slower to draw
        ax.plot(idx, np.log10(lam[keep]), color=c, lw=1.4, label=_record_label(rec))
        if keep.sum() < lam.size and idx.size:
            ax.scatter([idx[-1]], [np.log10(lam[keep][-1])], marker="v", s=28, color=[c], zorder=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("eigenvalue index (descending)", fontsize=_FS_LABEL)
    ax.set_ylabel("log10 eigenvalue", fontsize=_FS_LABEL)
    ax.tick_params(labelsize=_FS_TICK)
    ax.set_title("NTK spectrum of each report", fontsize=_FS_TITLE)
    ax.grid(True, which="major", alpha=0.3)
    if any(z for _, z, _ in zeros):
        first, last = zeros[0], zeros[-1]
        note = (
            f"\u25bc rest numerically 0:\n{last[1]} of {last[2]} at step {last[0].get('step', '?')}"
        )
        if len(zeros) > 1:
            note += f"\n{first[1]} at step {first[0].get('step', '?')}"
        ax.text(
            0.98,
            0.97,
            note,
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=_FS_NOTE,
            color="0.25",
            bbox=dict(facecolor="white", edgecolor="0.8", alpha=0.85, pad=2.0),
        )
    if len(chosen) > 1:
        cax = fig.add_axes((0.83, 0.14, 0.03, 0.75))
        cmap = ListedColormap(colormap(np.linspace(0.0, 0.9, 256)) / 255.0)
        bar = fig.colorbar(ScalarMappable(norm=Normalize(s0, s0 + span), cmap=cmap), cax=cax)
        bar.ax.tick_params(labelsize=_FS_TICK)
        bar.set_label("global step of the report", fontsize=_FS_NOTE)
    elif chosen:
        ax.set_title(f"NTK spectrum, {_record_label(chosen[0])}", fontsize=_FS_TITLE)
    return fig


ALIGNMENT_KEYS = ("kta", "cka")


def drift_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """Kernel drift and alignment against the trainer's global step, logged as ``<prefix>/drift``.

    Three panels stacked vertically (one column, so the picture reads at TensorBoard's
    card width, ~400 px), sharing the step axis:

    1. ``kernel_distance`` = 1 - <K_t, K_0>_F / (||K_t||_F ||K_0||_F) (change of the
       kernel's shape, scale-free; Fort et al. 2020);
    2. ``relative_change`` = ||K_t - K_0||_F / ||K_0||_F (how much the kernel moved,
       magnitude included; 0 in the lazy / NTK regime; dominated by scale changes such as
       BatchNorm statistics);
    3. ``kta`` and ``cka`` (kernel-target alignment, centred alignment).

    Missing or non-finite values are left out. Returns a matplotlib ``Figure`` (480 x 760 px).
    """
    Figure = _require_matplotlib()
    panels = (
        (("kernel_distance",), "kernel distance 1 - cos(K, K0)  (scale-free)"),
        (("relative_change",), "relative change ||K - K0|| / ||K0||"),
        (ALIGNMENT_KEYS, "alignment with the labels"),
    )
    fig, axes = _stacked(Figure, len(panels))
    colors = ("#2c728e", "#d95f02")
    for ax, (keys, title) in zip(axes, panels):
        for key, color in zip(keys, colors):
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=color, label=key)
        ax.set_title(title, fontsize=_FS_TITLE)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=_FS_NOTE, frameon=False, loc="best")
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[Any], list[float]]:
    """(steps, values) of ``metrics[key]`` over the history, non-finite and missing left out."""
    xs, ys = [], []
    for rec in history:
        v = rec.get("metrics", {}).get(key)
        if v is not None and np.isfinite(v):
            xs.append(rec.get("step", 0))
            ys.append(float(v))
    return xs, ys


LAYER_SHARE = "layer_share/"
LAYER_DRIFT = "layer_drift/"


def layer_names(history: Sequence[Mapping[str, Any]], max_layers: int | None = None) -> list[str]:
    """Layers with a ``layer_share/<name>`` metric in ``history``, largest first.

    Ranked by the largest share each layer reached in any report (ties: first seen),
    truncated to ``max_layers`` when given.
    """
    best: dict[str, float] = {}
    for rec in history:
        for key, v in rec.get("metrics", {}).items():
            if key.startswith(LAYER_SHARE):
                name = key[len(LAYER_SHARE) :]
                v = float(v) if v is not None and np.isfinite(v) else -np.inf
                best[name] = max(best.get(name, -np.inf), v)
    names = sorted(best, key=lambda k: -best[k])  # stable: ties keep first-seen order
    return names if max_layers is None else names[: int(max_layers)]


def _short(name: str, width: int = 30) -> str:
    """A long module path shortened from the left (``'...layers.3.attn.out_proj'``): the tail
    names the layer."""
    return name if len(name) <= width else "\u2026" + name[-(width - 1) :]


def layers_figure(history: Sequence[Mapping[str, Any]], *, max_layers: int = 8) -> Any:
    """Which layers make the kernel and which move it, logged as ``<prefix>/layers``.

    Two panels stacked vertically against the global step, and one legend below them:

    1. ``layer_share/<name>`` = tr K_l / tr K (the layers' shares of the kernel trace; they
       sum to 1 because the NTK is a sum over parameters);
    2. ``layer_drift/<name>`` = ||K_l - K0_l||_F / ||K0_l||_F (each layer's own drift).

    One line per layer for the ``max_layers`` layers with the largest share (at any
    report), the same colour in both panels (each line labelled with the full layer name;
    the legend shortens long names from the left); the legend's title says how many
    smaller layers were left out. Returns a matplotlib ``Figure`` (480 px wide).
    """
    Figure = _require_matplotlib()
    names = layer_names(history)
    shown = names[: int(max_layers)]
    hidden = len(names) - len(shown)
    ncol = 2 if shown and max(len(_short(n)) for n in shown) <= 24 else 1
    legend_rows = -(-max(len(shown), 1) // ncol) + (1 if hidden else 0)
    fig, axes = _stacked(Figure, 2, extra_in=0.2 + 0.16 * legend_rows, bottom_in=0.45)
    colors = colormap(np.linspace(0.0, 0.9, max(len(shown), 1))) / 255.0
    panels = (
        (LAYER_SHARE, "share of the kernel  tr K_l / tr K"),
        (LAYER_DRIFT, "layer drift  ||K_l - K0_l|| / ||K0_l||"),
    )
    for ax, (prefix, title) in zip(axes, panels):
        for c, name in zip(colors, shown):
            xs, ys = _series(history, prefix + name)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=c, label=name)
        ax.set_title(title, fontsize=_FS_TITLE)
    if axes[0].lines:
        handles = axes[0].lines
        fig.legend(
            handles,
            [_short(h.get_label()) for h in handles],
            loc="lower center",
            ncol=ncol,
            fontsize=_FS_NOTE,
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
            title=f"{hidden} smaller layers not shown" if hidden else None,
            title_fontsize=_FS_NOTE,
        )
    return fig


def dynamics_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """What the kernel predicted against what the network did, logged as ``<prefix>/dynamics``.

    Two panels stacked vertically against the global step:

    1. ``residual_norm`` ||f(X) - y|| on the probes (observed) and
       ``predicted_residual_norm``, the value linearised gradient descent under the
       previous report's kernel predicted for this step (plotted at the step it predicts;
       see :class:`ntk_callback.insight.DynamicsTracker`), on a log scale when the values
       span more than a decade;
    2. ``linearization_gap`` = ||f - f_lin|| / ||f - f_0|| on the held-out probes, f_lin
       the network linearised at initialisation (~0: lazy / kernel regime; O(1): rich
       regime).

    Missing or non-finite values are left out. Returns a matplotlib ``Figure`` (480 px wide).
    """
    Figure = _require_matplotlib()
    fig, (ax, gax) = _stacked(Figure, 2)
    xs, ys = _series(history, "residual_norm")
    px, py = _series(history, "predicted_residual_norm")
    if xs:
        ax.plot(xs, ys, marker="o", ms=4, lw=1.6, color="#2c728e", label="observed ||f - y||")
    if px:
        ax.plot(
            px,
            py,
            marker="x",
            ms=6,
            lw=1.2,
            ls="--",
            color="#d95f02",
            label="predicted by the kernel",
        )
    if (
        ys + py and min(ys + py) > 0 and max(ys + py) > 10 * min(ys + py)
    ):  # log scale over > 1 decade
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        # plain tick labels: the default mathtext ones (6 x 10^0) are slow to draw and hard to read
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("residual ||f - y||: observed vs NTK-predicted", fontsize=_FS_TITLE)
    if ax.lines:
        ax.legend(fontsize=_FS_NOTE, frameon=False)
    gx, gy = _series(history, "linearization_gap")
    if gx:
        gax.plot(gx, gy, marker="o", ms=4, lw=1.6, color="#5ec962")
    else:
        gax.text(
            0.5,
            0.5,
            "no held-out probes\n(needs a validation dataloader)",
            ha="center",
            va="center",
            transform=gax.transAxes,
            fontsize=_FS_LABEL,
            color="0.4",
        )
    gax.set_title("held-out linearisation gap ||f - f_lin|| / ||f - f_0||", fontsize=_FS_TITLE)
    return fig


FIGURES = {
    "spectrum": spectrum_figure,
    "drift": drift_figure,
    "layers": layers_figure,
    "dynamics": dynamics_figure,
}
"""The history pictures by name (each ``history -> Figure``), logged as ``<prefix>/<name>``."""


def figure_to_image(fig: Any) -> np.ndarray:
    """Rasterise a matplotlib figure (Agg, no GUI) to an RGB ``uint8`` array of shape (3, H, W)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


# --------------------------------------------------------------------------------- PNG


def _as_hwc(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[2] not in (1, 3, 4):
        img = img.transpose(1, 2, 0)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(
            "expected an image of shape (H, W), (C, H, W) or (H, W, C) with C in 1/3/4, "
            f"got {img.shape}"
        )
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating):
            img = np.rint(np.clip(img, 0.0, 1.0) * 255.0)
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an RGB/RGBA image ((C, H, W) or (H, W, C); uint8, or float in [0, 1]) as PNG bytes."""
    img = _as_hwc(image)
    h, w, c = img.shape
    color_type = 6 if c == 4 else 2  # RGBA or RGB, 8 bits per channel
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def save_png(path: str | os.PathLike, image: Any) -> str:
    """Write ``image`` (an image array as for :func:`png_bytes`, or a matplotlib figure) to
    ``path``; returns the path."""
    if hasattr(image, "savefig") and hasattr(image, "add_subplot"):
        image = figure_to_image(image)
    data = png_bytes(image)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


__all__ = [
    "BOUNDARY_COLOR",
    "FIGURES",
    "class_order",
    "colormap",
    "drift_figure",
    "dynamics_figure",
    "figure_to_image",
    "kernel_heatmap_image",
    "layer_names",
    "layers_figure",
    "png_bytes",
    "save_png",
    "spectrum_figure",
]
