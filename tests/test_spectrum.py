"""The matrix-free spectrum against dense eigenvalues of the float64 reference kernel
(``reference.ntk_func`` + ``numpy.linalg.eigh``), every mode, both routes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ntk_func
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntk_callback import NTKError, ntk_spectrum, ntk_trace_estimate

N, OUT, K = 30, 3, 4


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, OUT))
    g = torch.Generator().manual_seed(3)
    return model, torch.randn(N, 4, generator=g), torch.randint(0, OUT, (N,), generator=g)


def _dense(model, x, y, mode: str) -> np.ndarray:
    k = ntk_func(model, x, y, mode=mode)
    if mode == "full":  # (N, N, O, O) -> (N*O, N*O), probe-major
        k = k.permute(0, 2, 1, 3).reshape(N * OUT, N * OUT)
    return k.numpy()


@pytest.mark.parametrize("route", ["matfree", "gram"])
@pytest.mark.parametrize("mode", ["target", "trace", "sum", "full"])
def test_top_eigenvalues_and_vectors_match_dense(mode: str, route: str) -> None:
    model, x, y = _setup()
    dense = _dense(model, x, y, mode)
    exact = np.linalg.eigvalsh(dense)[::-1][:K]
    vals, vecs = ntk_spectrum(model, x, y, k=K, mode=mode, dtype=torch.float64, route=route,
                              return_vectors=True)
    assert vals.dtype == torch.float64 and vals.shape == (K,)
    assert bool((vals[:-1] >= vals[1:]).all())
    assert np.abs(vals.numpy() - exact).max() <= 1e-9 * exact[0]
    v = vecs.numpy()
    assert v.shape == (dense.shape[0], K)
    assert np.abs(dense @ v - v * vals.numpy()).max() <= 1e-7 * exact[0]
    assert np.abs(v.T @ v - np.eye(K)).max() < 1e-7


def test_trace_mode_is_not_the_stacked_jacobian_gram() -> None:
    # the trace kernel sum_a J_a J_a^T and the full kernel J J^T differ in spectrum
    model, x, y = _setup()
    trace = ntk_spectrum(model, x, k=2, mode="trace", dtype=torch.float64, route="gram")
    full = ntk_spectrum(model, x, k=2, mode="full", dtype=torch.float64, route="gram")
    assert abs(float(trace[0] - full[0])) > 1e-3 * float(full[0])


def test_loader_and_auto_route_and_float32() -> None:
    model, x, y = _setup()
    exact = np.linalg.eigvalsh(_dense(model, x, y, "target"))[::-1][:K]
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    got = ntk_spectrum(model, loader, k=K, mode="target", chunk_size=8)  # float32, auto
    assert np.abs(got.numpy() - exact).max() <= 1e-5 * exact[0]
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 4


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_trace_and_frobenius_estimates(mode: str) -> None:
    model, x, y = _setup()
    dense = _dense(model, x, y, mode)
    exact = ntk_trace_estimate(model, x, y, mode=mode, dtype=torch.float64, route="gram")
    assert exact.exact and exact.trace == pytest.approx(np.trace(dense), rel=1e-12)
    assert exact.frobenius == pytest.approx(np.linalg.norm(dense), rel=1e-12)
    est = ntk_trace_estimate(model, x, y, mode=mode, dtype=torch.float64, route="matfree",
                             num_samples=40, seed=1)
    assert not est.exact and est.samples == 40
    # unbiased estimates: within 4 standard errors (the errors are themselves estimated)
    assert abs(est.trace - np.trace(dense)) <= 4 * est.trace_stderr
    assert abs(est.frobenius - np.linalg.norm(dense)) <= 4 * est.frobenius_stderr + 1e-9


def test_bad_arguments() -> None:
    model, x, y = _setup()
    with pytest.raises(NTKError, match="k < 30"):
        ntk_spectrum(model, x, y, k=N, mode="trace", route="matfree")
    with pytest.raises(NTKError, match="route"):
        ntk_spectrum(model, x, y, route="dense")
    with pytest.raises(NTKError, match="needs `targets`"):
        ntk_spectrum(model, x, mode="target")
    with pytest.raises(NTKError, match="positive int"):
        ntk_spectrum(model, x, k=0)
    with pytest.raises(NTKError, match="num_samples"):
        ntk_trace_estimate(model, x, num_samples=1)
