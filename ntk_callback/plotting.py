"""Pictures of a kernel and of its evolution: heatmap, spectrum, drift curves.

* :func:`kernel_heatmap_image` needs numpy only and returns a ``uint8`` (3, H, W) image
  (the layout ``SummaryWriter.add_image`` takes by default).
* :func:`spectrum_figure` and :func:`drift_figure` need matplotlib (optional dependency,
  ``pip install matplotlib``); they build figures without ``pyplot`` (no global figure
  state, no GUI backend) and :func:`figure_to_image` rasterises them to (3, H, W) uint8.
* :func:`save_png` writes any of these to a PNG file with a tiny zlib encoder, so it
  works without matplotlib or Pillow.

A *history* is a sequence of report records as kept by
:class:`~ntk_callback.NTKReportCallback` (``callback.history``): mappings with ``"step"``
(int, the trainer's global step), ``"tag"`` (``"init"``, ``"epoch"`` or ``"final"``),
``"epoch"``, ``"eigenvalues"`` (descending, clamped at 0) and ``"metrics"`` (the flat
``NTKReport.to_dict()``).
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
            xs, ys = [], []
            for rec in history:
                v = rec.get("metrics", {}).get(key)
                if v is not None and np.isfinite(v):
                    xs.append(rec.get("step", 0))
                    ys.append(float(v))
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.4, label=key)
        ax.set_xlabel("global step")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.89, wspace=0.28)
    return fig


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
    "class_order",
    "colormap",
    "drift_figure",
    "figure_to_image",
    "kernel_heatmap_image",
    "png_bytes",
    "save_png",
    "spectrum_figure",
]
