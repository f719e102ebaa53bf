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
    assert not np.any(np.all(img.transpose(1, 2, 0) == WHITE, axis=-1)), "no labels -> no boundary lines"


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
    # y = log10(lambda); the zero eigenvalue is floored at lambda_max * N * eps, not -inf
    y_last = ax.lines[-1].get_ydata()
    lam = np.asarray(hist[-1]["eigenvalues"])
    np.testing.assert_allclose(y_last[:-1], np.log10(lam[:-1]))
    assert np.isfinite(y_last[-1]) and y_last[-1] == pytest.approx(np.log10(lam[0] * 16 * np.finfo(float).eps))
    img = plotting.figure_to_image(fig)
    assert img.dtype == np.uint8 and img.shape == (3, 340, 500)
    assert img.std() > 5  # something was drawn


def test_drift_figure_plots_metrics_against_steps_and_skips_nan() -> None:
    pytest.importorskip("matplotlib")
    hist = _history(5)
    fig = plotting.drift_figure(hist)
    assert len(fig.axes) == 3
    rel = fig.axes[0].lines[0]
    np.testing.assert_allclose(rel.get_xdata(), [0, 10, 20, 30, 40])
    np.testing.assert_allclose(rel.get_ydata(), [0.0, 0.1, 0.2, 0.3, 0.4])
    lines = {ln.get_label(): ln for ln in fig.axes[2].lines}
    np.testing.assert_allclose(lines["cka"].get_xdata(), [0, 10, 30, 40])  # the NaN at step 20 left out
    np.testing.assert_allclose(lines["kta"].get_ydata(), [0.5, 0.51, 0.52, 0.53, 0.54])
    img = plotting.figure_to_image(fig)
    assert img.shape == (3, 300, 1050)


def test_log10_spectrum_floor() -> None:
    lam = np.array([100.0, 1.0, 0.0])
    out = log10_spectrum(lam)
    np.testing.assert_allclose(out[:2], [2.0, 0.0])
    assert out[2] == pytest.approx(math.log10(100.0 * 3 * np.finfo(float).eps))
    assert log10_spectrum(np.array([])).size == 0


def _insight_history() -> list:
    """Five reports of a model with 10 layers (shares from a fixed Dirichlet-like draw) and dynamics keys."""
    rng = np.random.default_rng(5)
    base = rng.uniform(0.1, 1.0, size=10)
    out = []
    for i in range(5):
        w = base * (1.0 + 0.1 * i * np.arange(10) / 10)
        m = {f"layer_share/layer{j}": float(v) for j, v in enumerate(w / w.sum())}
        m.update({f"layer_drift/layer{j}": 0.01 * i * (j + 1) for j in range(10)})
        m["residual_norm"] = 10.0 * 0.3 ** i
        if i > 0:
            m["predicted_residual_norm"] = 10.0 * 0.3 ** i * (1.0 + 0.05 * i)
            m["linearization_gap"] = math.nan if i == 2 else 0.02 * i
        out.append({"tag": "init" if i == 0 else "epoch", "epoch": max(i - 1, 0), "step": 7 * i, "metrics": m,
                    "eigenvalues": [1.0]})
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
        np.testing.assert_allclose(ln.get_ydata(), [r["metrics"][f"layer_share/{name}"] for r in hist])
    for a, b in zip(share_ax.lines, drift_ax.lines):  # one colour per layer across the panels
        np.testing.assert_array_equal(a.get_color(), b.get_color())
    assert "6 smaller layers not shown" in share_ax.get_title()
    assert drift_ax.get_legend() is not None
    img = plotting.figure_to_image(fig)
    assert img.shape == (3, 320, 1050) and img.std() > 5


def test_dynamics_figure_observed_predicted_and_gap() -> None:
    pytest.importorskip("matplotlib")
    hist = _insight_history()
    fig = plotting.dynamics_figure(hist)
    res_ax, gap_ax = fig.axes
    obs, pred = res_ax.lines
    np.testing.assert_allclose(obs.get_xdata(), [0, 7, 14, 21, 28])
    np.testing.assert_allclose(obs.get_ydata(), [10.0 * 0.3 ** i for i in range(5)])
    np.testing.assert_allclose(pred.get_xdata(), [7, 14, 21, 28])  # no prediction at the first report
    assert res_ax.get_yscale() == "log"  # > 1 decade
    (gap,) = gap_ax.lines
    np.testing.assert_allclose(gap.get_xdata(), [7, 21, 28])  # NaN at step 14 left out
    np.testing.assert_allclose(gap.get_ydata(), [0.02, 0.06, 0.08])
    assert plotting.figure_to_image(fig).shape == (3, 320, 1050)
    # within one decade: linear axis (log ticks would have no labels); no held-out probes: a note
    flat = [{"step": s, "metrics": {"residual_norm": 5.0 - s}} for s in range(3)]
    fig = plotting.dynamics_figure(flat)
    assert fig.axes[0].get_yscale() == "linear"
    assert not fig.axes[1].lines and "no held-out" in fig.axes[1].texts[0].get_text()
    assert set(plotting.FIGURES) == {"spectrum", "drift", "layers", "dynamics"}
