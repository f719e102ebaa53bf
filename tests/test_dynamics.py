"""Linearised dynamics and the finite-step kernel check, against independent computations:
explicit gradient-descent iterations in numpy, real torch training of a model that is
exactly linear in its parameters, and the engine's exact kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntk_callback import NTKError, empirical_ntk, finite_difference_ntk
from ntk_callback import dynamics as D


def _psd(n: int, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, rank or n))
    return a @ a.T / n


def _iterate(K, Kx, r0, f0t, lr, steps):
    r, ft = r0.copy(), f0t.copy()
    for _ in range(steps):
        ft = ft - lr * Kx @ r
        r = r - lr * K @ r
    return r, ft


@pytest.mark.parametrize("out_dim", [None, 2])
@pytest.mark.parametrize("steps", [0, 1, 7, 60])
def test_linearized_predictions_match_explicit_gd(out_dim, steps) -> None:
    rng = np.random.default_rng(1)
    n, m = 9, 4
    feats = rng.normal(size=(n + m, 5))
    big = feats @ feats.T
    K, Kx = big[:n, :n], big[n:, :n]
    shape_n = (n,) if out_dim is None else (n, out_dim)
    shape_m = (m,) if out_dim is None else (m, out_dim)
    f0, y, f0t = rng.normal(size=shape_n), rng.normal(size=shape_n), rng.normal(size=shape_m)
    lr = 0.9 / np.linalg.eigvalsh(K).max()
    _, expected = _iterate(K, Kx, f0 - y, f0t, lr, steps)
    got = D.linearized_predictions(K, Kx, f0, f0t, y, lr=lr, steps=steps).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)


def test_infinite_time_is_kernel_regression_with_pseudo_inverse() -> None:
    K = _psd(8, 2, rank=5)  # singular: pseudo-inverse, null-space modes never move
    rng = np.random.default_rng(3)
    Kx = rng.normal(size=(3, 5)) @ rng.normal(size=(5, 8))
    f0, y, f0t = rng.normal(size=8), rng.normal(size=8), rng.normal(size=3)
    got = D.linearized_predictions(K, Kx, f0, f0t, y, steps=None).numpy()
    expected = f0t + Kx @ np.linalg.pinv(K, rcond=1e-10, hermitian=True) @ (y - f0)
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_prediction_equals_real_training_of_a_linear_model() -> None:
    """f(x) = w . phi(x) + b is exactly linear in theta: the NTK prediction with the
    optimizer's own learning rate (mse_loss mean, full batch) must equal real SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1)).double()
    x, xt = torch.randn(12, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    K = empirical_ntk(model, x)
    Kx = empirical_ntk(model, xt, inputs2=x)
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    eta, steps = 0.05, 25
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    lr = D.sum_loss_lr(eta, num_train=12, num_outputs=1)
    predicted = D.linearized_predictions(K, Kx, f0, f0t, y, lr=lr, steps=steps)
    with torch.no_grad():
        np.testing.assert_allclose(predicted.numpy(), model(xt).numpy(), rtol=1e-10, atol=1e-12)
        gap = D.linearization_gap(model(xt), predicted, f0t)
    assert gap < 1e-9


def test_linearization_gap_definition() -> None:
    fa, fl, f0 = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 3.0]), np.array([0.0, 0.0, 1.0])
    assert D.linearization_gap(fa, fl, f0) == pytest.approx(0.5 / np.sqrt(1 + 4 + 4))
    assert D.linearization_gap(fa, fl) == pytest.approx(0.5 / np.sqrt(14))
    assert np.isnan(D.linearization_gap(fa, fl, fa))


def test_steps_to_reduce_matches_brute_force() -> None:
    K = _psd(7, 4)
    r0 = np.random.default_rng(5).normal(size=7)
    lr = 1.0 / np.linalg.eigvalsh(K).max()
    for factor in (0.9, 0.5, 0.1, 0.01):
        r, t = r0.copy(), 0
        while np.linalg.norm(r) > factor * np.linalg.norm(r0):
            r, t = r - lr * K @ r, t + 1
        assert D.steps_to_reduce(K, r0, lr, factor) == t
    assert D.steps_to_reduce(K, r0, lr, 1.0) == 0
    singular = _psd(6, 6, rank=2)
    assert D.steps_to_reduce(singular, np.ones(6), 0.1, 1e-6) == float("inf")
    assert D.steps_to_reduce(K, r0, 5.0 / np.linalg.eigvalsh(K).max(), 0.5) == float("inf")


def test_mode_time_constants_and_slowest_modes() -> None:
    K = _psd(6, 7)
    lr = 0.5 / np.linalg.eigvalsh(K).max()
    lam = np.sort(np.linalg.eigvalsh(K))[::-1]
    np.testing.assert_allclose(D.mode_time_constants(K, lr).numpy(),
                               -1.0 / np.log(np.abs(1 - lr * lam)), rtol=1e-9)
    w, q = np.linalg.eigh(K)
    r = np.random.default_rng(8).normal(size=6)
    energy = (q.T @ r) ** 2 / (r @ r)
    modes = D.slowest_modes(K, r, lr, k=2)
    order = np.argsort(w)  # smallest eigenvalue decays slowest
    assert [m["eigenvalue"] for m in modes] == pytest.approx(list(w[order[:2]]), rel=1e-9)
    assert [m["energy"] for m in modes] == pytest.approx(list(energy[order[:2]]), rel=1e-9)


def test_sum_loss_lr_conventions() -> None:
    assert D.sum_loss_lr(0.1, 50, 2) == pytest.approx(0.2 / 100)
    assert D.sum_loss_lr(0.1, 50, reduction="sum") == pytest.approx(0.2)
    assert D.sum_loss_lr(0.1, 50, reduction="half_sum") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reduction"):
        D.sum_loss_lr(0.1, 50, reduction="median")


@pytest.mark.parametrize("mode", ["target", "sum", "trace"])
def test_finite_difference_converges_to_the_kernel(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(5, 2, 6), torch.tensor([0, 2, 1, 1, 0])
    K = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64)
    errs = {}
    for scheme in ("forward", "central"):
        for eta in (1e-2, 1e-3):
            Kf = finite_difference_ntk(model, x, y, mode=mode, eta=eta, scheme=scheme)
            errs[scheme, eta] = float((Kf - K).norm() / K.norm())
    # first-order and second-order convergence: 10x and 100x smaller per decade of eta
    assert 5 < errs["forward", 1e-2] / errs["forward", 1e-3] < 20
    assert 50 < errs["central", 1e-2] / errs["central", 1e-3] < 200
    assert errs["central", 1e-3] < 1e-5


def test_finite_difference_is_side_effect_free_and_validates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3)
    rng = torch.get_rng_state()
    finite_difference_ntk(model, x, torch.tensor([0, 1, 1, 0]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    with pytest.raises(NTKError, match="mode"):
        finite_difference_ntk(model, torch.randn(4, 3), mode="full")
    with pytest.raises(NTKError, match="eta"):
        finite_difference_ntk(model, torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), eta=0)
