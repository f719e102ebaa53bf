"""DynamicsTracker and the per-layer shares, against real training and numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntk_callback import empirical_ntk, layerwise_ntk
from ntk_callback.insight import DynamicsTracker, layer_drift, layer_shares


def _fit(model, x, y, lr, steps):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x).squeeze(-1), y).backward()
        opt.step()


def _measure(tracker, model, x, xh, step, lr_sum, lr, yh=None, first=False):
    K = empirical_ntk(model, x, dtype=torch.float64)
    cross = empirical_ntk(model, xh, inputs2=x, dtype=torch.float64) if first else None
    with torch.no_grad():
        f, fh = model(x).squeeze(-1), model(xh).squeeze(-1)
    return tracker.update(K, f, step, lr_sum, lr, heldout_outputs=fh, cross_kernel=cross,
                          heldout_targets=yh)


def test_linear_model_is_predicted_exactly() -> None:
    """A model linear in its parameters is its own linearisation: predicted and observed
    residuals agree to round-off and the linearisation gap is zero."""
    torch.manual_seed(0)
    phi = nn.Sequential(nn.Linear(3, 16), nn.Tanh()).double().requires_grad_(False)
    model = nn.Sequential(phi, nn.Linear(16, 1)).double()
    x, xh = torch.randn(20, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    y, yh = torch.sin(x.sum(1)), torch.sin(xh.sum(1))
    lr, steps = 0.2, 15
    tracker = DynamicsTracker(y, residual_top_k=3)
    first = _measure(tracker, model, x, xh, 0, 0.0, lr, yh, first=True)
    assert "predicted_vs_observed_residual" not in first and "linearization_gap" not in first
    _fit(model, x, y, lr, steps)
    second = _measure(tracker, model, x, xh, steps, lr * steps, lr, yh)
    assert second["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-10)
    assert second["residual_prediction_error"] < 1e-10
    assert second["linearization_gap"] < 1e-10
    assert second["linearized_heldout_mse"] == pytest.approx(second["heldout_mse"], rel=1e-9)
    with torch.no_grad():
        r = model(x).squeeze(-1) - y
    assert second["residual_norm"] == pytest.approx(float(r.norm()), rel=1e-12)
    K = empirical_ntk(model, x, dtype=torch.float64).numpy()
    w, q = np.linalg.eigh(K)
    top = q[:, np.argsort(w)[::-1][:3]]
    energy = float(((top.T @ r.numpy()) ** 2).sum() / (r.numpy() @ r.numpy()))
    assert second["residual_energy_top3"] == pytest.approx(energy, rel=1e-9)


def test_wide_network_is_nearly_linear_and_narrow_is_less() -> None:
    """The linearisation gap shrinks with width (lazy regime), an independent physics check."""
    gaps = {}
    for width in (8, 512):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).double()
        with torch.no_grad():
            model[2].weight.mul_(8.0 / width ** 0.5)
        x, xh = torch.randn(16, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        y = torch.sin(2 * x[:, 0])
        # the same step relative to the kernel's scale (stable: 2 lr / n * lambda_max < 2)
        lr = 0.3 * 16 / float(torch.linalg.eigvalsh(empirical_ntk(model, x, dtype=torch.float64)).max())
        tracker = DynamicsTracker(y)
        _measure(tracker, model, x, xh, 0, 0.0, lr, first=True)
        _fit(model, x, y, lr, 40)
        gaps[width] = _measure(tracker, model, x, xh, 40, lr * 40, lr)["linearization_gap"]
    assert gaps[512] < gaps[8]
    assert gaps[512] < 0.2


def test_layer_shares_and_drift_match_numpy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    L0 = layerwise_ntk(model, x, y, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.add_(0.3)
    L1 = layerwise_ntk(model, x, y, dtype=torch.float64)
    shares = layer_shares(L1)
    traces = {k: np.trace(v.numpy()) for k, v in L1.items()}
    assert shares == pytest.approx({k: t / sum(traces.values()) for k, t in traces.items()}, rel=1e-12)
    assert sum(shares.values()) == pytest.approx(1.0)
    drift = layer_drift(L1, L0)
    for k in L1:
        a, b = L1[k].numpy(), L0[k].numpy()
        assert drift[k] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12)


def test_tracker_state_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    x, xh = torch.randn(5, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    a = DynamicsTracker(y)
    _measure(a, model, x, xh, 0, 0.0, 0.1, first=True)
    b = DynamicsTracker(y)
    b.load_state_dict(a.state_dict())
    _fit(model, x, y, 0.1, 3)
    ra = _measure(a, model, x, xh, 3, 0.3, 0.1)
    rb = _measure(b, model, x, xh, 3, 0.3, 0.1)
    assert ra == rb


def test_gap_follows_a_learning_rate_that_changes_between_reports() -> None:
    """The linearised network is advanced report by report, so a rate that changes only
    between reports keeps a model linear in its parameters at zero gap."""
    torch.manual_seed(0)
    phi = nn.Sequential(nn.Linear(3, 16), nn.Tanh()).double().requires_grad_(False)
    model = nn.Sequential(phi, nn.Linear(16, 1)).double()
    x, xh = torch.randn(20, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    y = torch.sin(x.sum(1))
    tracker = DynamicsTracker(y)
    _measure(tracker, model, x, xh, 0, 0.0, 0.2, first=True)
    step, lr_sum = 0, 0.0
    for lr in (0.2, 0.05, 0.4):
        _fit(model, x, y, lr, 10)
        step, lr_sum = step + 10, lr_sum + 10 * lr
        out = _measure(tracker, model, x, xh, step, lr_sum, lr)
        assert out["linearization_gap"] < 1e-10
        assert out["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-10)
