"""Self-kernels computed on upper panels and mirrored (``engine/symmetric.py``).

The panel and mirror sizes are shrunk so that the 5-probe cases of the structured tests
run through several panels and mirror blocks, and every route and mode is compared with
the independent float64 ``vmap(jacrev)`` reference; the helpers are checked against
plain numpy; kernels of one probe set must come out exactly symmetric.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ntk_callback import empirical_ntk, layerwise_ntk
from ntk_callback.engine import KernelMode, symmetric
from reference import ntk_func
from test_engine_structured import CASES, _build, _paths, rel

MODES = ("target", "trace", "sum", "full")


@pytest.fixture
def small_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(symmetric, "PANEL_ROWS_MIN", 2)
    monkeypatch.setattr(symmetric, "PANELS_MAX", 64)
    monkeypatch.setattr(symmetric, "_MIRROR_ROWS", 3)


def swapped(k: torch.Tensor) -> torch.Tensor:
    return k.permute(1, 0, 3, 2) if k.dim() == 4 else k.T


def test_panels_cover_the_upper_triangle(small_panels: None) -> None:
    assert symmetric.panel_rows(5) == 2
    seen = np.zeros((5, 5), dtype=int)
    for rows in [slice(0, 2), slice(2, 4), slice(4, 5)]:
        cols = symmetric.columns(rows, 5, True)
        seen[rows, cols] += 1
    assert (np.triu(seen) == np.triu(np.ones((5, 5), dtype=int))).all()
    assert symmetric.columns(slice(2, 4), 5, False) == slice(0, 5)


def test_default_panels() -> None:
    assert symmetric.panel_rows(100) == 128          # one square product
    assert symmetric.panel_rows(512) == 128          # four panels: 5/8 of the flops
    assert symmetric.panel_rows(4096) == 512         # at most eight


@pytest.mark.parametrize("full", [False, True])
def test_mirror_lower_against_numpy(small_panels: None, full: bool) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (7, 7, 3, 3) if full else (7, 7)
    k = torch.randn(shape, generator=g, dtype=torch.float64)
    a = k.numpy().copy()
    want = a.copy()
    for i in range(7):
        for j in range(i):
            want[i, j] = a[j, i].T if full else a[j, i]
        if full:
            want[i, i] = np.triu(a[i, i]) + np.triu(a[i, i], 1).T
    got = symmetric.mirror_lower(k)
    assert got is k
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("self_block", [True, False])
def test_add_gram_against_numpy(small_panels: None, mode: str, self_block: bool) -> None:
    g = torch.Generator().manual_seed(1)
    k = 1 if mode in ("target", "sum") else 3
    a = torch.randn(7, k, 5, generator=g, dtype=torch.float64)
    b = a if self_block else torch.randn(4, k, 5, generator=g, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    if mode == "full":
        want = np.einsum("ipx,jqx->ijpq", an, bn)
    else:
        want = np.einsum("ipx,jpx->ij", an, bn)
    start = np.ones(want.shape)
    out = torch.ones(want.shape, dtype=torch.float64)
    symmetric.add_gram(out, KernelMode.parse(mode), a, None if self_block else b)
    if self_block:
        symmetric.mirror_lower(out)
    np.testing.assert_allclose(out.numpy(), start + want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ["auto", "gram", "rows", "generic"])
@pytest.mark.parametrize("name", list(CASES))
def test_paneled_kernels_match_reference(small_panels: None, name: str, route: str,
                                         mode: str) -> None:
    model, x, y = _build(name)
    ref = ntk_func(model.double(), x.double() if x.is_floating_point() else x, y, mode=mode)
    model.float()
    kwargs = {"implementation": "generic"} if route == "generic" else {
        "layer_paths": None if route == "auto" else _paths(model, route)}
    got = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, **kwargs)
    assert rel(got, ref) <= 1e-12, f"{name}/{route}/{mode}: {rel(got, ref):.2e}"
    assert torch.equal(got, swapped(got))


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_generic_blocked_self_kernel(small_panels: None, mode: str) -> None:
    """A budget too small for all rows: blocks on and above the diagonal, then mirrored."""
    model, x, y = _build("conv2d_bn_gn")
    ref = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, implementation="generic")
    got = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, implementation="generic",
                        memory_budget=20_000)
    assert rel(got, ref) <= 1e-12
    assert torch.equal(got, swapped(got))


def test_layerwise_and_cross_kernels(small_panels: None) -> None:
    model, x, y = _build("conv2d_bn_gn")
    parts = layerwise_ntk(model, x, y, mode="trace", dtype=torch.float64)
    for key, value in parts.items():
        assert torch.equal(value, value.T), key
    whole = empirical_ntk(model, x, y, mode="trace", dtype=torch.float64)
    assert rel(sum(parts.values()), whole) <= 1e-12
    # a cross kernel has no symmetry to use: every entry computed
    cross = empirical_ntk(model, x[:2], y[:2], inputs2=x, targets2=y, mode="trace",
                          dtype=torch.float64)
    assert rel(cross, whole[:2]) <= 1e-12


def test_default_panels_at_a_few_hundred_probes() -> None:
    """The default sizes (several panels and mirror blocks at N = 300), float32 engine
    against the float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(300, 3)
    ref = ntk_func(model.double(), x.double(), mode="trace")
    model.float()
    got = empirical_ntk(model, x, mode="trace")
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("mode_name", ["target", "full"])
def test_float32_gram_over_millions_of_parameters_is_summed_in_float64(mode_name: str) -> None:
    """A single float32 product over 4M positive entries drifts ~1e-4 from float64; the
    chunked float32 products summed in float64 stay at float32's own rounding."""
    from ntk_callback.engine.modes import KernelMode
    from ntk_callback.engine.symmetric import add_gram

    mode = KernelMode.parse(mode_name)
    k = 1 if mode_name == "target" else 2
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(4, k, (1 << 22) // k, generator=g)
    exact = torch.zeros(mode.kernel_shape(4, 4, k), dtype=torch.float64)
    mode.add_gram_block(exact, mode.gram_operand(rows.double()), mode.gram_operand(rows.double()))
    ours = torch.zeros(mode.kernel_shape(4, 4, k), dtype=torch.float32)
    add_gram(ours, mode, rows, rows)
    one_product = torch.zeros_like(ours)
    mode.add_gram_block(one_product, mode.gram_operand(rows), mode.gram_operand(rows))
    err = float(((ours.double() - exact).abs().max() / exact.abs().max()))
    naive = float(((one_product.double() - exact).abs().max() / exact.abs().max()))
    assert err <= 1e-6
    assert naive > 10 * err  # the case is one where the plain float32 product drifts
