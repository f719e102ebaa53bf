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
from typing import Any, Mapping, Optional, Sequence, Union

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


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN -> 0) to viridis RGB, ``uint8`` of shape ``values.shape + (3,)``."""
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


def class_order(labels: Optional[Any], n: int) -> tuple[np.ndarray, list[int]]:
    """Stable order that groups probes by label, and the class boundaries in that order.

    Returns ``(order, boundaries)``: ``order`` an (n,) index array, ``boundaries`` the
    positions ``b`` in the sorted order where a new class starts (``0 < b < n``). Without
    integer labels the order is the identity and there are no boundaries.
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


def kernel_heatmap_image(
    K: Any,
    labels: Optional[Any] = None,
    *,
    max_cells: int = 256,
    cell_px: Optional[int] = None,
    target_px: int = 256,
) -> np.ndarray:
    """Heatmap of a kernel as an RGB ``uint8`` image of shape (3, H, W), numpy only.

    Args:
        K: (N, N) kernel (torch tensor or array).
        labels: optional (N,) integer labels; probes are then ordered by class (stable)
            and a 1-pixel white line is drawn where each new class starts.
        max_cells: when N exceeds it, the sorted kernel is block-averaged onto a
            ``max_cells x max_cells`` grid (groups of consecutive probes).
        cell_px: pixels per cell; default ``max(1, target_px // cells)``.

    Colour: viridis, linear from ``min(K)`` (dark purple) to ``max(K)`` (yellow) of the
    displayed matrix; a constant matrix is drawn at the bottom of the scale. Non-finite
    entries are drawn as the bottom colour.
    """
    A = _to_numpy(K).astype(np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"kernel_heatmap_image needs a non-empty square (N, N) kernel, got shape {A.shape}")
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    n = A.shape[0]
    order, boundaries = class_order(labels, n)
    A = A[np.ix_(order, order)]
    if n > max_cells:
        groups = (np.arange(n) * max_cells) // n  # consecutive, near-equal groups
        counts = np.bincount(groups, minlength=max_cells).astype(np.float64)
        summed = np.zeros((max_cells, max_cells))
        np.add.at(summed, (groups[:, None], groups[None, :]), A)
        A = summed / np.outer(counts, counts)
    m = A.shape[0]
    scale = int(cell_px) if cell_px is not None else max(1, target_px // m)
    if scale < 1:
        raise ValueError(f"cell_px must be >= 1, got {cell_px}")
    finite = np.isfinite(A)
    lo = float(A[finite].min()) if finite.any() else 0.0
    hi = float(A[finite].max()) if finite.any() else 0.0
    span = hi - lo
    norm = (A - lo) / span if span > 0 else np.zeros_like(A)
    norm = np.where(finite, norm, 0.0)
    rgb = colormap(norm)  # (m, m, 3)
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    side = m * scale
    for b in boundaries:
        px = int(round(b * m * scale / n))
        if 0 < px < side:
            rgb[px, :, :] = BOUNDARY_COLOR
            rgb[:, px, :] = BOUNDARY_COLOR
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- figures


def _require_matplotlib() -> Any:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "spectrum/drift figures need matplotlib: pip install matplotlib "
            "(the kernel heatmap and the scalars work without it)"
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


def spectrum_figure(history: Sequence[Mapping[str, Any]], *, max_curves: int = 10) -> Any:
    """Eigenvalue spectra of the reports in ``history`` on one log-scale plot.

    x: eigenvalue index i = 1..N (descending); y: log10 lambda_i (zeros are drawn at
    ``lambda_max * N * eps64``, the level below which eigenvalues are round-off). At most
    ``max_curves`` reports are drawn, evenly spaced, first and last always included;
    colour goes from dark (early) to yellow (late). Returns a matplotlib ``Figure``.
    """
    Figure = _require_matplotlib()
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    recs = [r for r in history if len(r.get("eigenvalues", ())) > 0]
    chosen = _subsample(len(recs), max_curves)
    colors = colormap(np.linspace(0.0, 0.9, max(len(chosen), 1))) / 255.0
    for c, i in zip(colors, chosen):
        lam = np.asarray(recs[i]["eigenvalues"], dtype=np.float64)
        floor = max(float(np.max(lam)) * lam.size * np.finfo(np.float64).eps, np.finfo(np.float64).tiny)
        # log10 on a linear axis: log-scale tick labels go through mathtext, ~10x slower to draw
        ax.plot(np.arange(1, lam.size + 1), np.log10(np.maximum(lam, floor)), color=c, lw=1.4, label=_record_label(recs[i]))
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("log10 eigenvalue")
    ax.set_title("NTK spectrum")
    ax.grid(True, which="major", alpha=0.3)
    if chosen:
        ax.legend(fontsize=7, loc="lower left", frameon=False)
    # fixed margins: tight_layout would render the figure twice (the dominant cost)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.91)
    return fig


def drift_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """Kernel drift and alignment against the trainer's global step, three panels.

    1. ``relative_change`` = ||K_t - K_0||_F / ||K_0||_F (how much the kernel moved,
       magnitude included; 0 in the lazy / NTK regime);
    2. ``kernel_distance`` = 1 - <K_t, K_0>_F / (||K_t||_F ||K_0||_F) (change of the
       kernel's shape, scale-free; Fort et al. 2020);
    3. ``kta`` and ``cka`` (kernel-target alignment, centred alignment).

    Missing or non-finite values are left out. Returns a matplotlib ``Figure``.
    """
    Figure = _require_matplotlib()
    fig = Figure(figsize=(10.5, 3.0), dpi=100)
    panels = (
        (("relative_change",), "relative change ||K-K0|| / ||K0||"),
        (("kernel_distance",), "kernel distance 1 - cos(K, K0)"),
        (("kta", "cka"), "kernel-target alignment"),
    )
    for i, (keys, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.4, label=key)
        ax.set_xlabel("global step")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.89, wspace=0.28)
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list, list]:
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


def layer_names(history: Sequence[Mapping[str, Any]], max_layers: Optional[int] = None) -> list[str]:
    """Layers with a ``layer_share/<name>`` metric in ``history``, largest first.

    Ranked by the largest share each layer reached in any report (ties: first seen),
    truncated to ``max_layers`` when given.
    """
    best: dict[str, float] = {}
    for rec in history:
        for key, v in rec.get("metrics", {}).items():
            if key.startswith(LAYER_SHARE):
                name = key[len(LAYER_SHARE):]
                v = float(v) if v is not None and np.isfinite(v) else -np.inf
                best[name] = max(best.get(name, -np.inf), v)
    names = sorted(best, key=lambda k: -best[k])  # stable: ties keep first-seen order
    return names if max_layers is None else names[: int(max_layers)]


def layers_figure(history: Sequence[Mapping[str, Any]], *, max_layers: int = 8) -> Any:
    """Which layers make the kernel and which move it, against the global step; two panels.

    1. ``layer_share/<name>`` = tr K_l / tr K (the layers' shares of the kernel trace; they
       sum to 1 because the NTK is a sum over parameters);
    2. ``layer_drift/<name>`` = ||K_l - K0_l||_F / ||K0_l||_F (each layer's own drift).

    One line per layer for the ``max_layers`` layers with the largest share (at any
    report), the same colour in both panels; the title says how many were left out.
    Returns a matplotlib ``Figure``.
    """
    Figure = _require_matplotlib()
    fig = Figure(figsize=(10.5, 3.2), dpi=100)
    names = layer_names(history)
    shown = names[: int(max_layers)]
    colors = colormap(np.linspace(0.0, 0.9, max(len(shown), 1))) / 255.0
    hidden = len(names) - len(shown)
    panels = ((LAYER_SHARE, "share of the kernel trace tr K_l / tr K"),
              (LAYER_DRIFT, "layer drift ||K_l - K0_l|| / ||K0_l||"))
    for i, (prefix, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for c, name in zip(colors, shown):
            xs, ys = _series(history, prefix + name)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=c, label=name)
        ax.set_xlabel("global step")
        ax.set_title(title + (f" ({hidden} smaller layers not shown)" if hidden and i == 0 else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
    if fig.axes[0].lines:
        # outside the axes on the right: one legend serves both panels (same colours)
        fig.axes[1].legend(*fig.axes[0].get_legend_handles_labels(), fontsize=7, frameon=False,
                           loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(left=0.06, right=0.84, bottom=0.16, top=0.89, wspace=0.25)
    return fig


def dynamics_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """What the kernel predicted against what the network did, over the global step.

    1. ``residual_norm`` ||f(X) - y|| on the probes (observed) and
       ``predicted_residual_norm``, the value linearised gradient descent under the
       previous report's kernel predicted for this step (plotted at the step it predicts;
       see :class:`ntk_callback.insight.DynamicsTracker`), on a log scale when the values
       span more than a decade;
    2. ``linearization_gap`` = ||f - f_lin|| / ||f - f_0|| on the held-out probes, f_lin
       the network linearised at initialisation (~0: lazy / kernel regime; O(1): rich
       regime).

    Missing or non-finite values are left out. Returns a matplotlib ``Figure``.
    """
    Figure = _require_matplotlib()
    fig = Figure(figsize=(10.5, 3.2), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    xs, ys = _series(history, "residual_norm")
    px, py = _series(history, "predicted_residual_norm")
    if xs:
        ax.plot(xs, ys, marker="o", ms=4, lw=1.6, color="#2c728e", label="observed ||f - y||")
    if px:
        ax.plot(px, py, marker="x", ms=6, lw=1.2, ls="--", color="#d95f02", label="predicted by the kernel")
    if ys + py and min(ys + py) > 0 and max(ys + py) > 10 * min(ys + py):  # log scale over > 1 decade
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        # plain tick labels: the default mathtext ones (6 x 10^0) are slow to draw and hard to read
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("global step")
    ax.set_title("residual on the probes: observed vs NTK-predicted", fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, frameon=False)
    ax = fig.add_subplot(1, 2, 2)
    gx, gy = _series(history, "linearization_gap")
    if gx:
        ax.plot(gx, gy, marker="o", ms=4, lw=1.6, color="#5ec962")
    else:
        ax.text(0.5, 0.5, "no held-out probes\n(needs a validation dataloader)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xlabel("global step")
    ax.set_title("linearisation gap ||f - f_lin|| / ||f - f_0|| (held-out)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.16, top=0.89, wspace=0.22)
    return fig


FIGURES = {
    "spectrum": spectrum_figure,
    "drift": drift_figure,
    "layers": layers_figure,
    "dynamics": dynamics_figure,
}
"""The history pictures by name (each ``history -> Figure``), as logged under ``<prefix>/<name>``."""


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
        raise ValueError(f"expected an image of shape (H, W), (C, H, W) or (H, W, C) with C in 1/3/4, got {img.shape}")
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
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def save_png(path: Union[str, os.PathLike], image: Any) -> str:
    """Write ``image`` (an image array as for :func:`png_bytes`, or a matplotlib figure) to ``path``; returns the path."""
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
