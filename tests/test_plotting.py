"""ntk_callback.plotting: heatmap image (numpy only), history figures, PNG writer."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from ntk_callback import plotting
from ntk_callback.loggers import log10_spectrum

WHITE = np.array(plotting.BOUNDARY_COLOR, dtype=np.uint8)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]


def _cell(img: np.ndarray, i: int, j: int, scale: int) -> np.ndarray:
    """RGB at the centre of cell (i, j) of a (3, H, W) heatmap."""
    return img[:, i * scale + scale // 2, j * scale + scale // 2]


def test_colormap_is_monotone_in_luminance_and_never_white() -> None:
    v = np.linspace(0.0, 1.0, 1001)
    rgb = plotting.colormap(v)
    assert rgb.shape == (1001, 3) and rgb.dtype == np.uint8
    lum = _luminance(rgb)
    # per-channel rounding to uint8 may cost at most one unit of one channel between neighbours
    assert np.all(np.diff(lum) >= -0.72), "brighter must always mean larger"
    coarse = _luminance(plotting.colormap(np.linspace(0.0, 1.0, 41)))
    assert np.all(np.diff(coarse) > 0.0)
    assert lum[-1] - lum[0] > 150.0
    assert not np.any(np.all(rgb == WHITE, axis=-1)), "white is reserved for class boundaries"
    # clipping and NaN handling
    np.testing.assert_array_equal(plotting.colormap(np.array([-5.0, np.nan, 7.0])), rgb[[0, 0, -1]])


def test_heatmap_shape_dtype_and_values_without_labels() -> None:
    rng = np.random.default_rng(0)
    K = rng.normal(size=(10, 10))
    img = plotting.kernel_heatmap_image(torch.from_numpy(K))
    scale = 256 // 10
    assert img.dtype == np.uint8 and img.shape == (3, 10 * scale, 10 * scale)
    assert img.flags["C_CONTIGUOUS"]
    expected = plotting.colormap((K - K.min()) / (K.max() - K.min()))
    for i in range(10):
        for j in range(10):
            np.testing.assert_array_equal(_cell(img, i, j, scale), expected[i, j])
    assert not np.any(np.all(img.transpose(1, 2, 0) == WHITE, axis=-1)), (
        "no labels -> no boundary lines"
    )


def test_heatmap_orders_probes_by_class_and_draws_boundaries() -> None:
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat([2, 0, 1], [5, 3, 4]))  # shuffled labels, sizes 3 / 4 / 5
    K = (y[:, None] == y[None, :]).astype(np.float64) + 0.1  # block structure in label space
    img = plotting.kernel_heatmap_image(K, torch.from_numpy(y), cell_px=8)
    n, scale = 12, 8
    assert img.shape == (3, n * scale, n * scale)
    sizes = np.bincount(y)  # classes 0, 1, 2 in sorted order
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cls_of_row = np.repeat(np.arange(3), sizes)
    top, bottom = plotting.colormap(np.array([1.0, 0.0]))
    for i in range(n):
        for j in range(n):
            if i in starts[1:] or j in starts[1:]:
                continue  # the cell's first pixel row/col carries the boundary line, its centre not
            want = top if cls_of_row[i] == cls_of_row[j] else bottom
            np.testing.assert_array_equal(_cell(img, i, j, scale), want)
    hwc = img.transpose(1, 2, 0)
    white_rows = [r for r in range(n * scale) if np.all(hwc[r] == WHITE)]
    white_cols = [c for c in range(n * scale) if np.all(hwc[:, c] == WHITE)]
    assert white_rows == white_cols == [int(s) * scale for s in starts[1:]]


def test_heatmap_block_average_for_large_kernels() -> None:
    rng = np.random.default_rng(2)
    K = rng.normal(size=(300, 300))
    img = plotting.kernel_heatmap_image(K, max_cells=100, cell_px=1)
    assert img.shape == (3, 100, 100)
    avg = K.reshape(100, 3, 100, 3).mean(axis=(1, 3))  # independent: reshape-mean of 3x3 blocks
    expected = plotting.colormap((avg - avg.min()) / (avg.max() - avg.min()))
    np.testing.assert_array_equal(img.transpose(1, 2, 0), expected)


def test_heatmap_degenerate_inputs() -> None:
    bottom = plotting.colormap(np.array(0.0))
    img = plotting.kernel_heatmap_image(np.full((4, 4), 3.0))  # constant: bottom of the scale
    assert np.all(img.transpose(1, 2, 0) == bottom)
    K = np.eye(3)
    K[0, 1] = np.nan
    K[1, 0] = np.inf
    img = plotting.kernel_heatmap_image(K, cell_px=1)
    np.testing.assert_array_equal(img[:, 0, 1], bottom)
    np.testing.assert_array_equal(img[:, 1, 0], bottom)
    np.testing.assert_array_equal(img[:, 0, 0], plotting.colormap(np.array(1.0)))
    with pytest.raises(ValueError, match="square"):
        plotting.kernel_heatmap_image(np.zeros((3, 4)))
    # float labels (regression targets) do not reorder
    order, bounds = plotting.class_order(np.array([0.5, -1.0, 2.0]), 3)
    assert order.tolist() == [0, 1, 2] and bounds == []


def _heatmap_cells_rgb(fig, n: int, idx=None) -> np.ndarray:
    """Rasterise a heatmap figure; the RGB at the centres of its n x n cells (rows/cols ``idx``)."""
    img = plotting.figure_to_image(fig).transpose(1, 2, 0)
    x0, y0, x1, y1 = fig.axes[0].get_window_extent().extents  # display pixels, origin bottom-left
    h = img.shape[0]
    centres = (np.arange(n) + 0.5 if idx is None else np.asarray(idx) + 0.5) / n
    cols = np.floor(x0 + centres * (x1 - x0)).astype(int)
    rows = np.floor(h - (y1 - centres * (y1 - y0))).astype(int)
    return img[rows[:, None], cols[None, :]]


def _tick_labels(axis) -> list:
    return [t.get_text() for t in axis.get_ticklabels()]


def test_heatmap_figure_pixels_class_labels_boundaries_and_title() -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat([2, 0, 1], [5, 3, 4]))
    K = (y[:, None] == y[None, :]).astype(np.float64) * 3.0 + 0.5 + 0.01 * rng.normal(size=(12, 12))
    K = (K + K.T) / 2
    fig = plotting.kernel_heatmap_figure(K, torch.from_numpy(y), step=150, epoch=3, tag="epoch")
    ax = fig.axes[0]
    order = np.argsort(y, kind="stable")
    Ks = K[np.ix_(order, order)]
    expected = plotting.colormap(
        (Ks - Ks.min()) / (Ks.max() - Ks.min())
    )  # independent of the module's cells
    np.testing.assert_array_equal(_heatmap_cells_rgb(fig, 12), expected)
    # class labels at the class centres (sizes 3, 4, 5), white boundaries at 3 and 7 on both axes
    assert _tick_labels(ax.xaxis) == ["0", "1", "2"] and _tick_labels(ax.yaxis) == ["0", "1", "2"]
    np.testing.assert_allclose(ax.get_xticks(), [1.5, 5.0, 9.5])
    walls = sorted(
        {float(ln.get_xdata()[0]) for ln in ax.lines if ln.get_xdata()[0] == ln.get_xdata()[1]}
    )
    assert walls == [3.0, 7.0] and len(ax.lines) == 4
    texts = [t.get_text() for t in fig.texts]
    assert texts[0] == "NTK, epoch 3 (step 150)"
    assert "N = 12;" in texts[1] and "colour range: this report" in texts[1]
    # the colour bar spans the kernel's own min..max, in the kernel's units
    cbar = fig.axes[1]
    assert cbar.get_ylim() == pytest.approx((Ks.min(), Ks.max()))
    assert plotting.report_title("init", 0, 0) == "initial NTK (step 0)"
    assert plotting.report_title("final", 57, 4) == "NTK at the end of training (step 57)"


def test_heatmap_figure_many_classes_and_large_n_stay_readable() -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(2)
    y = rng.permutation(
        np.repeat(np.arange(100), 10)
    )  # N = 1024 would leave 24 extra: use 1000 + 24 of class 99
    y = np.concatenate([y, np.full(24, 99)])
    K = (y[:, None] == y[None, :]).astype(np.float64)
    fig = plotting.kernel_heatmap_figure(K, y, step=3)
    ax = fig.axes[0]
    labels = _tick_labels(ax.xaxis)
    assert 5 <= len(labels) <= 12 and labels[:3] == ["0", "9", "18"]  # thinned: every 9th class
    assert f"{len(labels)} labelled" in ax.get_xlabel()
    assert not ax.lines, "1 px classes: boundary lines would hide the cells"
    assert "256x256 block means" in fig.texts[1].get_text()
    img = plotting.figure_to_image(fig)
    assert img.shape == (3, 380, 420)  # the size does not grow with N or the number of classes
    # the pixels are the 4 x 4 block averages of the class-sorted kernel (read at every 16th cell)
    order = np.argsort(y, kind="stable")
    avg = K[np.ix_(order, order)].reshape(256, 4, 256, 4).mean(axis=(1, 3))
    idx = np.arange(8, 256, 16)
    np.testing.assert_array_equal(
        _heatmap_cells_rgb(fig, 256, idx), plotting.colormap(avg[np.ix_(idx, idx)])
    )
    # unequal class sizes: labels at least N / 12 probes apart, never on top of each other
    y2 = np.repeat(np.arange(100), np.random.default_rng(5).integers(1, 20, size=100))
    ax2 = plotting.kernel_heatmap_figure(np.eye(len(y2)), y2).axes[0]
    assert len(ax2.get_xticks()) <= 12 and np.all(np.diff(ax2.get_xticks()) >= len(y2) / 12 - 1e-9)
    # 10 unequal classes (sizes 5..21 of N = 128): all labelled
    y3 = np.repeat(np.arange(10), [5, 21, 12, 8, 17, 11, 14, 9, 19, 12])
    ax3 = plotting.kernel_heatmap_figure(np.eye(128), y3).axes[0]
    assert (
        _tick_labels(ax3.xaxis) == [str(c) for c in range(10)]
        and ax3.get_xlabel() == "class (10 classes)"
    )
    fig8 = plotting.kernel_heatmap_figure(K[:8, :8], y[:8])
    assert plotting.figure_to_image(fig8).shape == (3, 380, 420)


def test_heatmap_regression_probes_sorted_by_scalar_input_else_target() -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(3)
    x = rng.uniform(-3, 3, size=(40, 1))
    t = np.sin(2 * x[:, 0])
    K = np.exp(-((x - x.T) ** 2))  # smooth in the input: a band once sorted by x
    lay = plotting.probe_layout(torch.from_numpy(t), 40, inputs=torch.from_numpy(x))
    assert lay.kind == "input" and np.all(np.diff(x[lay.order, 0]) >= 0)
    lay = plotting.probe_layout(t[:, None], 40)  # (N, 1) targets, no scalar input: by target
    assert lay.kind == "target" and np.all(np.diff(t[lay.order]) >= 0) and lay.boundaries == []
    assert (
        plotting.probe_layout(t, 40, inputs=rng.normal(size=(40, 3))).kind == "target"
    )  # 3-D input: by target
    assert (
        plotting.probe_layout(rng.normal(size=(40, 2)), 40).kind == "index"
    )  # two outputs: no order
    fig = plotting.kernel_heatmap_figure(K, t, inputs=x, tag="init", step=0)
    order = np.argsort(x[:, 0], kind="stable")
    Ks = K[np.ix_(order, order)]
    np.testing.assert_array_equal(
        _heatmap_cells_rgb(fig, 40), plotting.colormap((Ks - Ks.min()) / (Ks.max() - Ks.min()))
    )
    ax = fig.axes[0]
    assert ax.get_xlabel() == "probe input (sorted)"
    ticks = [float(t) for t in _tick_labels(ax.xaxis)]
    assert ticks[0] == pytest.approx(x.min(), abs=0.05) and ticks[-1] == pytest.approx(
        x.max(), abs=0.05
    )
    assert all(
        len(t) <= 4 for t in _tick_labels(ax.xaxis)
    )  # one decimal for a spread of ~6: "-2.9", "0.1"
    assert plotting._value_labels(np.array([0.001, 0.004])) == ["0.0010", "0.0040"]
    assert plotting._value_labels(np.array([1e5, 2e5])) == ["1e+05", "2e+05"]
    assert fig.texts[0].get_text() == "initial NTK (step 0)"
    # the numpy-only image sorts the same way
    img = plotting.kernel_heatmap_image(K, t, inputs=x, cell_px=1)
    np.testing.assert_array_equal(
        img.transpose(1, 2, 0), plotting.colormap((Ks - Ks.min()) / (Ks.max() - Ks.min()))
    )


def test_heatmap_fixed_scale_from_the_initial_kernel() -> None:
    pytest.importorskip("matplotlib")
    from ntk_callback.loggers import ReportMedia

    rng = np.random.default_rng(4)
    A = rng.normal(size=(10, 10))
    K0 = A @ A.T
    K = 2.0 * K0  # the kernel doubled: on K0's scale, its large entries clip at the top
    lo, hi = plotting.kernel_color_range(K0)
    assert (lo, hi) == (K0.min(), K0.max())
    fig = plotting.kernel_heatmap_figure(K, vmin=lo, vmax=hi)
    np.testing.assert_array_equal(
        _heatmap_cells_rgb(fig, 10), plotting.colormap((K - lo) / (hi - lo))
    )
    assert fig.axes[1].get_ylim() == pytest.approx((lo, hi))
    assert "colour range: fixed" in fig.texts[1].get_text()
    img = plotting.kernel_heatmap_image(K, vmin=lo, vmax=hi, cell_px=1)
    np.testing.assert_array_equal(img.transpose(1, 2, 0), plotting.colormap((K - lo) / (hi - lo)))
    # through ReportMedia (what the loggers get): "initial" uses K0's range, "per_report" K's own
    common = dict(
        step=5, kernel=K, labels=None, eigenvalues=np.ones(10), history=[], pictures=("kernel",)
    )
    fixed = ReportMedia(**common, heatmap_scale="initial", init_kernel=K0)
    assert fixed.heatmap_range() == (lo, hi)
    assert ReportMedia(**common).heatmap_range() == (None, None)
    a, b = fixed.image("kernel"), ReportMedia(**common).image("kernel")
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert (
        fixed.image("kernel_init") is a
    )  # the initial report's own tag: the same picture, drawn once
    with pytest.raises(ValueError, match="heatmap_scale='absolute'.*per_report"):
        ReportMedia(**common, heatmap_scale="absolute")
    with pytest.raises(ValueError, match="unknown picture 'spectra'"):
        ReportMedia(**dict(common, pictures=("spectra",))).image("spectra")


def test_png_roundtrip_with_an_independent_decoder(tmp_path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(3, 17, 23), dtype=np.uint8)
    path = plotting.save_png(tmp_path / "sub" / "x.png", img)
    decoded = np.asarray(PIL.open(path).convert("RGB"))
    np.testing.assert_array_equal(decoded, img.transpose(1, 2, 0))
    rgba = rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8)  # HWC with alpha
    decoded = np.asarray(PIL.open(io.BytesIO(plotting.png_bytes(rgba))))
    np.testing.assert_array_equal(decoded, rgba)
    gray = np.linspace(0.0, 1.0, 12).reshape(3, 4)  # float in [0, 1], 2-D
    decoded = np.asarray(PIL.open(io.BytesIO(plotting.png_bytes(gray))).convert("L"))
    np.testing.assert_array_equal(decoded, np.rint(gray * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="image of shape"):
        plotting.png_bytes(np.zeros((2, 3, 5, 7)))


def _history(n: int, size: int = 16) -> list:
    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        lam = np.sort(rng.uniform(0.1, 10.0, size=size))[::-1] * (i + 1)
        lam[-1] = 0.0  # a numerically-zero eigenvalue must not break the log plot
        out.append(
            {
                "tag": "init" if i == 0 else "epoch",
                "epoch": max(i - 1, 0),
                "step": 10 * i,
                "metrics": {
                    "relative_change": 0.1 * i,
                    "kernel_distance": 0.01 * i,
                    "kta": 0.5 + 0.01 * i,
                    "cka": math.nan if i == 2 else 0.6,
                },
                "eigenvalues": lam.tolist(),
            }
        )
    return out


def test_spectrum_figure_draws_a_subsample_with_first_and_last() -> None:
    pytest.importorskip("matplotlib")
    hist = _history(25)
    fig = plotting.spectrum_figure(hist, max_curves=6)
    ax = fig.axes[0]
    assert 2 <= len(ax.lines) <= 6
    labels = [ln.get_label() for ln in ax.lines]
    assert labels[0] == "init (step 0)" and labels[-1] == "epoch 23 (step 240)"
    assert ax.get_legend() is None, "no legend over the curves: the colour bar says which report"
    assert len(fig.axes) == 2 and "global step" in fig.axes[1].get_ylabel()
    # colour = step: the first curve has the colour bar's bottom colour, the last its top (0.9)
    np.testing.assert_allclose(ax.lines[0].get_color(), plotting.colormap(np.array(0.0)) / 255.0)
    np.testing.assert_allclose(ax.lines[-1].get_color(), plotting.colormap(np.array(0.9)) / 255.0)
    # y = log10(lambda); the curve stops before the numerically-zero eigenvalue (no floor drawn)
    lam = np.asarray(hist[-1]["eigenvalues"])
    np.testing.assert_allclose(ax.lines[-1].get_xdata(), np.arange(1, 16))
    np.testing.assert_allclose(ax.lines[-1].get_ydata(), np.log10(lam[:-1]))
    # one down-triangle per truncated curve, at its last eigenvalue; the note counts the zeros
    ends = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(ends) == len(ax.lines)
    np.testing.assert_allclose(ends[-1], [15, np.log10(lam[-2])])
    (note,) = ax.texts
    assert "numerically 0" in note.get_text() and "1 of 16 at step 240" in note.get_text()
    img = plotting.figure_to_image(fig)
    assert img.dtype == np.uint8 and img.shape == (3, 330, 440)
    assert img.std() > 5  # something was drawn


def test_spectrum_figure_without_zero_eigenvalues_has_no_note() -> None:
    pytest.importorskip("matplotlib")
    hist = [{"tag": "init", "epoch": 0, "step": 0, "eigenvalues": [4.0, 2.0, 1.0], "metrics": {}}]
    fig = plotting.spectrum_figure(hist)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.log10([4.0, 2.0, 1.0]))
    assert not ax.texts and not ax.collections
    assert (
        len(fig.axes) == 1 and "init (step 0)" in ax.get_title()
    )  # one report: named in the title


def _axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def test_drift_figure_plots_metrics_against_steps_and_skips_nan() -> None:
    pytest.importorskip("matplotlib")
    hist = _history(5)
    fig = plotting.drift_figure(hist)
    assert len(fig.axes) == 3
    dist_ax, rel_ax, align_ax = fig.axes  # one column: scale-free distance first
    assert "kernel distance" in dist_ax.get_title() and "relative change" in rel_ax.get_title()
    np.testing.assert_allclose(dist_ax.lines[0].get_ydata(), [0.0, 0.01, 0.02, 0.03, 0.04])
    rel = rel_ax.lines[0]
    np.testing.assert_allclose(rel.get_xdata(), [0, 10, 20, 30, 40])
    np.testing.assert_allclose(rel.get_ydata(), [0.0, 0.1, 0.2, 0.3, 0.4])
    lines = {ln.get_label(): ln for ln in align_ax.lines}
    np.testing.assert_allclose(
        lines["cka"].get_xdata(), [0, 10, 30, 40]
    )  # the NaN at step 20 left out
    np.testing.assert_allclose(lines["kta"].get_ydata(), [0.5, 0.51, 0.52, 0.53, 0.54])
    img = plotting.figure_to_image(fig)
    assert img.shape == (3, 670, 420)  # one column: reads at TensorBoard's ~400 px card width
    # stacked, not side by side: each panel spans most of the width, no vertical overlap
    boxes = [ax.get_position() for ax in fig.axes]
    assert all(b.width > 0.75 for b in boxes)
    assert boxes[0].y0 > boxes[1].y1 and boxes[1].y0 > boxes[2].y1


def test_log10_spectrum_floor() -> None:
    lam = np.array([100.0, 1.0, 0.0])
    out = log10_spectrum(lam)
    np.testing.assert_allclose(out[:2], [2.0, 0.0])
    assert out[2] == pytest.approx(math.log10(100.0 * 3 * np.finfo(float).eps))
    assert log10_spectrum(np.array([])).size == 0


def _insight_history() -> list:
    """Five reports of a model with 10 layers (shares from a fixed draw) and dynamics keys."""
    rng = np.random.default_rng(5)
    base = rng.uniform(0.1, 1.0, size=10)
    out = []
    for i in range(5):
        w = base * (1.0 + 0.1 * i * np.arange(10) / 10)
        m = {f"layer_share/layer{j}": float(v) for j, v in enumerate(w / w.sum())}
        m.update({f"layer_drift/layer{j}": 0.01 * i * (j + 1) for j in range(10)})
        m["residual_norm"] = 10.0 * 0.3**i
        if i > 0:
            m["predicted_residual_norm"] = 10.0 * 0.3**i * (1.0 + 0.05 * i)
            m["linearization_gap"] = math.nan if i == 2 else 0.02 * i
        out.append(
            {
                "tag": "init" if i == 0 else "epoch",
                "epoch": max(i - 1, 0),
                "step": 7 * i,
                "metrics": m,
                "eigenvalues": [1.0],
            }
        )
    return out


def test_layer_names_rank_by_largest_share_and_truncate() -> None:
    hist = _insight_history()
    best = {}
    for rec in hist:
        for k, v in rec["metrics"].items():
            if k.startswith("layer_share/"):
                best[k[12:]] = max(best.get(k[12:], -1.0), v)
    expected = sorted(best, key=lambda k: -best[k])
    assert plotting.layer_names(hist) == expected
    assert plotting.layer_names(hist, max_layers=3) == expected[:3]
    assert plotting.layer_names([{"metrics": {"kta": 0.3}}]) == []


def test_layers_figure_draws_the_largest_layers_in_both_panels() -> None:
    pytest.importorskip("matplotlib")
    hist = _insight_history()
    fig = plotting.layers_figure(hist, max_layers=4)
    share_ax, drift_ax = fig.axes
    top = plotting.layer_names(hist, 4)
    assert [ln.get_label() for ln in share_ax.lines] == top
    assert [ln.get_label() for ln in drift_ax.lines] == top
    for ln, name in zip(share_ax.lines, top):
        np.testing.assert_allclose(ln.get_xdata(), [0, 7, 14, 21, 28])
        np.testing.assert_allclose(
            ln.get_ydata(), [r["metrics"][f"layer_share/{name}"] for r in hist]
        )
    for a, b in zip(share_ax.lines, drift_ax.lines):  # one colour per layer across the panels
        np.testing.assert_array_equal(a.get_color(), b.get_color())
    (legend,) = fig.legends  # one legend below both panels
    assert legend.get_title().get_text() == "6 smaller layers not shown"
    assert [t.get_text() for t in legend.get_texts()] == top
    img = plotting.figure_to_image(fig)
    assert img.shape[2] == 420 and img.std() > 5
    assert share_ax.get_position().y0 > drift_ax.get_position().y1  # stacked
    # long module paths are shortened from the left in the legend, the lines keep the full name
    long = [
        {"step": s, "metrics": {"layer_share/encoder.layers.11.attention.output.dense": 1.0}}
        for s in (0, 5)
    ]
    fig = plotting.layers_figure(long)
    assert fig.axes[0].lines[0].get_label() == "encoder.layers.11.attention.output.dense"
    (text,) = fig.legends[0].get_texts()
    assert text.get_text().startswith("\u2026") and text.get_text().endswith(
        "attention.output.dense"
    )


def test_dynamics_figure_observed_predicted_and_gap() -> None:
    pytest.importorskip("matplotlib")
    hist = _insight_history()
    fig = plotting.dynamics_figure(hist)
    res_ax, gap_ax = fig.axes
    obs, pred = res_ax.lines
    np.testing.assert_allclose(obs.get_xdata(), [0, 7, 14, 21, 28])
    np.testing.assert_allclose(obs.get_ydata(), [10.0 * 0.3**i for i in range(5)])
    np.testing.assert_allclose(
        pred.get_xdata(), [7, 14, 21, 28]
    )  # no prediction at the first report
    assert res_ax.get_yscale() == "log"  # > 1 decade
    (gap,) = gap_ax.lines
    np.testing.assert_allclose(gap.get_xdata(), [7, 21, 28])  # NaN at step 14 left out
    np.testing.assert_allclose(gap.get_ydata(), [0.02, 0.06, 0.08])
    assert plotting.figure_to_image(fig).shape == (3, 465, 420)
    assert res_ax.get_position().y0 > gap_ax.get_position().y1  # stacked
    # within one decade: linear axis (log ticks would have no labels); no held-out probes: a note
    flat = [{"step": s, "metrics": {"residual_norm": 5.0 - s}} for s in range(3)]
    fig = plotting.dynamics_figure(flat)
    assert fig.axes[0].get_yscale() == "linear"
    assert not fig.axes[1].lines and "no held-out" in fig.axes[1].texts[0].get_text()
    assert set(plotting.FIGURES) == {"spectrum", "drift", "layers", "dynamics"}
