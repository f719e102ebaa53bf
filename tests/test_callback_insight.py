"""NTKReportCallback's training-dynamics insight (issue 6) with real Trainers.

* per-layer shares and drift (``<prefix>/layer_share/<layer>``, ``/layer_drift/<layer>``)
  against an independent float64 per-layer kernel built here with torch.func from the
  probes and the weights (not the library's ``layerwise_ntk``);
* the dynamics metrics of a regression model, end to end: for a model that is linear in
  its parameters (frozen random features + a trainable linear head) trained by
  full-batch SGD on ``F.mse_loss`` with the probes = the whole training set, linearised
  gradient descent is exact, so ``predicted_vs_observed_residual`` must be 1 and
  ``linearization_gap`` 0 to round-off (while the lr is constant); a step-interval LR
  schedule that changes the lr between reports checks which lr each optimizer step is
  charged, and a resumed run must reproduce the uninterrupted run's numbers;
* classifiers in ``dynamics="auto"``: no dynamics keys, no warning; ``dynamics=True``:
  one warning;
* ``prefix``: two callbacks share one TensorBoard (and CSV) logger without collisions;
* the K0 fallback when the initial kernel fails; bit-identical training with dynamics on.

TensorBoard files are read back with TensorBoard's own ``EventAccumulator``.
"""
from __future__ import annotations

import copy
import io
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from callback_reference import TBContent
from lightning_models import Flavour, flavour, load_flavour, quiet_trainer_kwargs  # noqa: F401 (fixture)

# ------------------------------------------------------------------ independent references


def per_layer_kernels(model: nn.Module, x: torch.Tensor, layer_of: Dict[str, str]) -> Dict[str, np.ndarray]:
    """``{layer: J_l J_l^T}`` in float64 for a scalar-output model, from per-sample
    ``jacrev`` of a float64 copy in eval mode (trainable parameters only); ``layer_of``
    maps each parameter name to its layer."""
    m = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}

    def f(p: Dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(m, (p, buffers), (xi.unsqueeze(0),)).reshape(())

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x.double())
    out: Dict[str, np.ndarray] = {}
    for name, j in jac.items():
        flat = j.reshape(len(x), -1)
        out[layer_of[name]] = out.get(layer_of[name], 0) + (flat @ flat.T).numpy()
    return out


def outputs64(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(x.double()).reshape(-1).numpy()


def warnings_matching(rec: List[Any], text: str) -> List[str]:
    return [str(w.message) for w in rec if text in str(w.message)]


# ------------------------------------------------------------------------------ models


def regressor(fl: Flavour, width: int = 12, lr: float = 0.05) -> Any:
    """MLP 3-w-w-1 (tanh) times a free scalar parameter ``scale``; SGD, ``mse_loss``."""

    class Regressor(fl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                     nn.Linear(width, 1))
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(-1) * self.scale

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.5)

    return Regressor()


def linear_head(fl: Flavour, lr: float, factors: Tuple[float, ...]) -> Any:
    """Frozen random tanh features 3 -> 24 and a trainable ``Linear(24, 1)``: linear in
    its parameters. Plain SGD, full batch; a step-interval ``LambdaLR`` multiplies the lr
    of optimizer step k by ``factors[k // 3]``. Records the lr every step was taken with."""

    class LinearHead(fl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Linear(3, 24), nn.Tanh()).requires_grad_(False)
            self.head = nn.Linear(24, 1)
            self.used_lrs: List[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x)).squeeze(-1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.used_lrs.append(float(self.trainer.optimizers[0].param_groups[0]["lr"]))
            return F.mse_loss(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.head.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factors[min(k // 3, len(factors) - 1)])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LinearHead()


def classifier(fl: Flavour, poisoned: bool = False) -> Any:
    """MLP 4-10-3 with cross-entropy. ``poisoned``: its eval-mode output is NaN until the
    first training epoch starts (the initial kernel fails, later ones do not)."""

    class Classifier(fl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3))
            self.poisoned = poisoned

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            return out * float("nan") if (self.poisoned and not self.training) else out

        def on_train_epoch_start(self) -> None:
            self.poisoned = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.2)

    return Classifier()


def regression_loaders(n: int = 48, n_val: int = 16, batch_size: int = 16,
                       dtype: torch.dtype = torch.float32) -> Tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n + n_val, 3, generator=g, dtype=dtype)
    y = torch.sin(x.sum(1)) + 0.3 * x[:, 0]
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(x[n:], y[n:]), batch_size=8)


def class_loader(n: int = 36) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 2.0 * F.one_hot(y, 4).float()
    return DataLoader(TensorDataset(x, y), batch_size=12)


# ------------------------------------------------------------------------------- tests


def test_layer_shares_drift_and_dynamics_keys_on_a_regressor(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    flavour.seed_everything(0, verbose=False)
    model = regressor(flavour)
    init_model = copy.deepcopy(model)
    train, val = regression_loaders()
    cb = NTKReportCallback(num_probes=12, seed=2, log_console=False)
    logger = flavour.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = flavour.Trainer(max_epochs=3, callbacks=[cb], **quiet_trainer_kwargs(logger=logger))
    trainer.fit(model, train, val)
    assert cb.dynamics_active and [h["step"] for h in cb.history] == [0, 3, 6, 9]

    tb = TBContent(logger.log_dir)
    layers = ["net.0", "net.2", "net.4", "scale"]  # named_modules() names; a free parameter by its own name
    share_tags = sorted(t for t in tb.scalars if t.startswith("ntk/layer_share/"))
    assert share_tags == [f"ntk/layer_share/{k}" for k in layers]
    for i, step in enumerate([0, 3, 6, 9]):
        total = sum(tb.series(t)[i][1] for t in share_tags)
        assert tb.series(share_tags[0])[i][0] == step and total == pytest.approx(1.0, abs=1e-6)

    # independent float64 per-layer kernels of the final and the initial weights
    px, py = cb.probes
    layer_of = {n: ("scale" if n == "scale" else n.rsplit(".", 1)[0]) for n, _ in model.named_parameters()}
    K = per_layer_kernels(model, px, layer_of)
    K0 = per_layer_kernels(init_model, px, layer_of)
    trace = sum(np.trace(k) for k in K.values())
    for k in layers:
        assert tb.series(f"ntk/layer_share/{k}")[-1][1] == pytest.approx(np.trace(K[k]) / trace, rel=1e-4, abs=1e-7)
        drift = np.linalg.norm(K[k] - K0[k]) / np.linalg.norm(K0[k])
        assert tb.series(f"ntk/layer_drift/{k}")[-1][1] == pytest.approx(drift, rel=1e-3), k
        assert tb.series(f"ntk/layer_drift/{k}")[0][1] == 0.0
    assert float(trainer.callback_metrics["ntk/layer_share/net.0"]) == pytest.approx(
        cb.history[-1]["metrics"]["layer_share/net.0"], rel=1e-12)

    # dynamics: regression model + val loader -> every key, from the second report on the predictions
    r = outputs64(model, px) - py.double().numpy()
    last = cb.history[-1]["metrics"]
    assert last["residual_norm"] == pytest.approx(float(np.linalg.norm(r)), rel=1e-5)
    for key in ("residual_norm", "residual_energy_top5", "steps_to_halve_residual", "epochs_to_halve_residual",
                "slowest_mode_time_constant", "predicted_residual_norm", "predicted_vs_observed_residual",
                "residual_prediction_error", "linearization_gap", "heldout_mse", "linearized_heldout_mse"):
        assert f"ntk/{key}" in tb.scalars, key
        assert f"ntk/{key}" in trainer.callback_metrics, key
    assert "predicted_vs_observed_residual" not in cb.history[0]["metrics"]
    assert last["epochs_to_halve_residual"] == pytest.approx(last["steps_to_halve_residual"] / 3)
    hx, hy = cb.heldout
    assert len(hx) == 16 and last["heldout_mse"] == pytest.approx(
        float(np.mean((outputs64(model, hx) - hy.double().numpy()) ** 2)), rel=1e-5)
    assert {"ntk/layers", "ntk/dynamics", "ntk/kernel", "ntk/spectrum", "ntk/drift"} <= set(tb.images)


@pytest.mark.parametrize("flavour_name", ["pytorch_lightning", "lightning.pytorch"])
def test_linear_model_is_predicted_exactly_end_to_end_and_after_resume(flavour_name: str, tmp_path: Any) -> None:
    """Exact check of the lr and loss conventions: a model linear in its parameters under
    full-batch SGD on the mean loss is its own linearisation, so the kernel predicts every
    report's residual and the held-out outputs exactly. The schedule changes the lr between
    reports (constant within each 3-step interval), so charging a step the lr *after* the
    scheduler stepped (Lightning steps it before on_train_batch_end) would break it."""
    from ntk_callback import NTKReportCallback, empirical_ntk

    fl = load_flavour(flavour_name)
    n, factors = 32, (1.0, 0.5, 0.25)
    train, val = regression_loaders(n=n, n_val=8, batch_size=n, dtype=torch.float64)
    x, y = train.dataset.tensors
    train = DataLoader(train.dataset, batch_size=n)  # full batch, fixed order

    def build(seed: int, lr: float = 0.0) -> Any:
        fl.seed_everything(seed, verbose=False)
        return linear_head(fl, lr=lr, factors=factors)

    lam_max = float(torch.linalg.eigvalsh(empirical_ntk(build(0).double(), x)).max())
    lr = 0.7 * n / lam_max  # sum-loss rate 2 lr / n; stable below lr = n / lam_max

    def fit(model: Any, epochs: int, ckpt_path: Optional[str] = None) -> Tuple[Any, Any]:
        cb = NTKReportCallback(probes=(x, y), every_n_epochs=3, dynamics=True, log_console=False, log_figures=False)
        ckpt = fl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / f"ckpt{epochs}"), save_last=True, save_top_k=0)
        trainer = fl.Trainer(max_epochs=epochs, callbacks=[cb, ckpt], precision="64-true",
                             **quiet_trainer_kwargs(enable_checkpointing=True))
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return cb, trainer

    model = build(0, lr)
    cb, _ = fit(model, 9)
    assert model.used_lrs == pytest.approx([lr] * 3 + [lr / 2] * 3 + [lr / 4] * 3, rel=1e-15)
    assert cb.lr_sum == pytest.approx(sum(model.used_lrs), rel=1e-14)
    hist = cb.history
    assert [h["step"] for h in hist] == [0, 3, 6, 9]
    for prev, rec in zip(hist, hist[1:]):
        m = rec["metrics"]
        assert m["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-9), rec["step"]
        assert m["residual_prediction_error"] < 1e-8
    # the linearised network evolves from K0 with the mean lr since init: exact while the lr
    # has been constant (step 3), an approximation once the schedule changed it
    m3 = hist[1]["metrics"]
    assert m3["linearization_gap"] < 1e-8
    assert m3["linearized_heldout_mse"] == pytest.approx(m3["heldout_mse"], rel=1e-9)
    assert all(h["metrics"]["linearization_gap"] < 0.05 for h in hist[2:])
    # the conventions by hand: r_t = (I - 2 lr_k / n K)^3 r_prev, K fixed (linear model)
    K = empirical_ntk(model, x).numpy()

    def evolve(r: np.ndarray, lr_k: float) -> np.ndarray:
        return np.linalg.matrix_power(np.eye(n) - 2 * lr_k / n * K, 3) @ r

    rs = [outputs64(build(0), x) - y.numpy()]
    for f_ in factors:
        rs.append(evolve(rs[-1], lr * f_))
    assert [h["metrics"]["residual_norm"] for h in hist] == pytest.approx([np.linalg.norm(r) for r in rs], rel=1e-9)
    # ... and the check can fail: a factor-2 lr convention (lr / n), or charging each step the
    # lr after the scheduler stepped, mispredicts some interval by far more than the tolerance
    after_sched = [lr * factors[min((k + 1) // 3, 2)] for k in range(9)]
    for wrong in ([lr * f_ / 2 for f_ in factors], [sum(after_sched[3 * i:3 * i + 3]) / 3 for i in range(3)]):
        errs = [abs(np.linalg.norm(evolve(rs[i], wrong[i])) / np.linalg.norm(rs[i + 1]) - 1) for i in range(3)]
        assert max(errs) > 1e-4, errs

    # resume after 6 steps with a fresh model (other weights) and a fresh callback: the restored
    # tracker predicts step 9 from step 6 and the gap is still measured against the original f0, K0
    fit(build(0, lr), 6)
    model2 = build(123, lr).double()  # a float32 module would round the restored float64 weights
    cb2, trainer2 = fit(model2, 9, ckpt_path=str(tmp_path / "ckpt6" / "last.ckpt"))
    assert model2.used_lrs == pytest.approx([lr / 4] * 3, rel=1e-15)  # it trained 3 steps after the resume
    assert trainer2.global_step == 9 and [h["step"] for h in cb2.history] == [0, 3, 6, 9]
    m = cb2.history[-1]["metrics"]
    assert cb2.lr_sum == pytest.approx(cb.lr_sum, rel=1e-14)
    assert m["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-9)
    for key in ("linearization_gap", "residual_norm", "heldout_mse", "linearized_heldout_mse"):
        assert m[key] == pytest.approx(hist[-1]["metrics"][key], rel=1e-9, abs=1e-15), key


def test_classifier_gets_no_dynamics_in_auto_and_one_warning_when_forced(tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    fl = load_flavour("lightning.pytorch")
    runs = {}
    for dynamics in ("auto", True):
        fl.seed_everything(0, verbose=False)
        cb = NTKReportCallback(num_probes=9, dynamics=dynamics, log_console=False)
        trainer = fl.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs(default_root_dir=str(tmp_path)))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            trainer.fit(classifier(fl), class_loader())
        runs[dynamics] = (cb, trainer, rec)
    for dynamics, (cb, trainer, rec) in runs.items():
        assert not cb.dynamics_active and len(cb.history) == 3
        assert not any(k.startswith("ntk/residual") or "linearization" in k for k in trainer.callback_metrics)
        assert "ntk/layer_share/net.0" in trainer.callback_metrics  # the layer breakdown is not regression-only
        assert not any(k.startswith("residual") for h in cb.history for k in h["metrics"])
        about = warnings_matching(rec, "dynamics")
        if dynamics == "auto":
            assert about == []
        else:
            assert len(about) == 1 and "not floating point" in about[0] and "dynamics=True" in about[0], about


def test_two_prefixes_share_one_tensorboard_and_csv_logger(tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback
    from ntk_callback._lightning import NTKCallbackConfigError

    fl = load_flavour("pytorch_lightning")
    fl.seed_everything(0, verbose=False)
    a = NTKReportCallback(num_probes=9, seed=1, log_console=False)
    b = NTKReportCallback(num_probes=6, seed=1, mode="trace", prefix="ntk_b", log_console=False)
    tb_logger = fl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = fl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = fl.Trainer(max_epochs=2, callbacks=[a, b], **quiet_trainer_kwargs(logger=[tb_logger, csv_logger]))
    trainer.fit(classifier(fl), class_loader())

    tb = TBContent(tb_logger.log_dir)
    for prefix, cb, n in (("ntk", a, 9), ("ntk_b", b, 6)):
        assert [s for s, _ in tb.series(f"{prefix}/kta")] == [0, 3, 6]
        assert [v for _, v in tb.series(f"{prefix}/num_probes")] == [n, n, n]
        assert [v for _, v in tb.series(f"{prefix}/lambda_max")] == pytest.approx(
            [h["metrics"]["lambda_max"] for h in cb.history], rel=1e-6)
        assert {f"{prefix}/{p}" for p in ("kernel", "spectrum", "drift", "layers")} <= set(tb.images)
        assert f"{prefix}/eigenvalues" in tb.histograms
        assert float(trainer.callback_metrics[f"{prefix}/kta"]) == pytest.approx(cb.history[-1]["metrics"]["kta"])
        files = os.listdir(os.path.join(csv_logger.log_dir, prefix))
        assert "kernel_step_0000006.npy" in files and "history.json" in files
    assert not any(t.startswith("ntk/") for t in tb.scalars if t.startswith("ntk_b"))
    assert a.state_key != b.state_key
    # the prefix alone separates two otherwise identical callbacks; the default keeps the old key
    assert NTKReportCallback(prefix="x").state_key != NTKReportCallback().state_key
    assert "prefix" not in NTKReportCallback().state_key
    for bad in ("", "ntk/", "/ntk", "a//b", " ", None):
        with pytest.raises(NTKCallbackConfigError, match="prefix"):
            NTKReportCallback(prefix=bad)  # type: ignore[arg-type]
    for kwargs in (dict(dynamics="yes"), dict(loss_reduction="avg"), dict(num_heldout=-1), dict(residual_top_k=0),
                   dict(layerwise=1)):
        with pytest.raises(NTKCallbackConfigError, match=next(iter(kwargs))):
            NTKReportCallback(**kwargs)


def test_failed_initial_kernel_falls_back_to_the_first_successful_one(tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    fl = load_flavour("pytorch_lightning")
    fl.seed_everything(0, verbose=False)
    cb = NTKReportCallback(num_probes=9, log_console=False)
    trainer = fl.Trainer(max_epochs=3, callbacks=[cb], **quiet_trainer_kwargs(default_root_dir=str(tmp_path)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(classifier(fl, poisoned=True), class_loader())
    assert len(warnings_matching(rec, "report at step 0 skipped")) == 1
    fallback = warnings_matching(rec, "initial kernel could not be measured")
    assert len(fallback) == 1 and "step 3" in fallback[0], fallback
    assert [h["step"] for h in cb.history] == [3, 6, 9]
    first, *later = [h["metrics"] for h in cb.history]
    assert first["relative_change"] == 0.0 and first["layer_drift/net.0"] == 0.0
    assert all(m["relative_change"] > 1e-4 and m["layer_drift/net.0"] > 1e-4 for m in later)
    # the reference is the kernel of step 3, kept for checkpoints
    lam = torch.linalg.eigvalsh(cb.init_kernel.double())
    assert float(lam.max()) == pytest.approx(first["lambda_max"], rel=1e-6)
    state = cb.state_dict()
    assert set(state["init_layer_kernels"]) == {"net.0", "net.2"}


def test_dynamics_leave_training_bit_identical_and_state_round_trips(tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    fl = load_flavour("lightning.pytorch")

    def run(with_cb: bool) -> Tuple[Any, Any, Any]:
        fl.seed_everything(7, verbose=False)
        model = regressor(fl)
        train, val = regression_loaders()
        cbs = [NTKReportCallback(num_probes=10, num_heldout=6, log_console=False)] if with_cb else []
        trainer = fl.Trainer(max_epochs=2, callbacks=cbs, **quiet_trainer_kwargs(num_sanity_val_steps=1))
        trainer.fit(model, train, val)
        return model, trainer, (torch.get_rng_state(), np.random.get_state()[1].copy())

    m1, t1, rng1 = run(True)
    m0, t0, rng0 = run(False)
    cb = next(c for c in t1.callbacks if isinstance(c, NTKReportCallback))
    assert cb.dynamics_active and "ntk/linearization_gap" in t1.callback_metrics
    for (k, v1), (_, v0) in zip(m1.state_dict().items(), m0.state_dict().items()):
        assert torch.equal(v1, v0), k
    s1, s0 = t1.optimizers[0].state_dict()["state"], t0.optimizers[0].state_dict()["state"]
    assert all(torch.equal(s1[i]["momentum_buffer"], s0[i]["momentum_buffer"]) for i in s0)
    assert torch.equal(rng1[0], rng0[0]) and np.array_equal(rng1[1], rng0[1])

    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = NTKReportCallback(num_probes=10, num_heldout=6)
    fresh.load_state_dict(state)
    assert fresh.lr_sum == cb.lr_sum == pytest.approx(0.05 * t1.global_step)
    assert torch.equal(fresh.heldout[0], cb.heldout[0])
    assert set(fresh.init_layer_kernels) == set(cb.init_layer_kernels)
    assert state["dynamics"]["tracker"]["prev"]["step"] == t1.global_step
    assert math.isfinite(state["dynamics"]["tracker"]["init"]["lr_sum"])


_DDP_SCRIPT = '''
import os, sys
sys.path.insert(0, {tests_dir!r})
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import pytorch_lightning as pl
from lightning_models import quiet_trainer_kwargs
from ntk_callback import NTKReportCallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    def forward(self, x):
        return self.net(x).squeeze(-1)
    def training_step(self, batch, i):
        return F.mse_loss(self(batch[0]), batch[1])
    def validation_step(self, batch, i):
        pass
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class Dump(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        ntk = [c for c in trainer.callbacks if isinstance(c, NTKReportCallback)][0]
        torch.save(dict(heldout=ntk.heldout, history=ntk.history, lr_sum=ntk.lr_sum, active=ntk.dynamics_active),
                   os.path.join(sys.argv[1], f"rank{{trainer.global_rank}}.pt"))

if __name__ == "__main__":
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    g = torch.Generator().manual_seed(10 + rank)  # rank-dependent data, as with per-rank shards
    x, xv = torch.randn(32, 3, generator=g), torch.randn(12, 3, generator=g)
    torch.save(xv, os.path.join(sys.argv[1], f"val{{rank}}.pt"))
    pl.seed_everything(0, verbose=False)
    cb = NTKReportCallback(num_probes=8, num_heldout=5, log_console=False, log_figures=False)
    trainer = pl.Trainer(max_epochs=2, strategy="ddp", callbacks=[cb, Dump()],
                         **quiet_trainer_kwargs(devices=2, deterministic=False))
    trainer.fit(Net(), DataLoader(TensorDataset(x, torch.sin(x.sum(1))), batch_size=8),
                DataLoader(TensorDataset(xv, torch.cos(xv.sum(1))), batch_size=4))
'''


def test_ddp_broadcasts_rank0_heldout_probes_and_ranks_agree(tmp_path: Any) -> None:
    """CPU DDP (gloo, 2 processes), each rank with its own validation data: both ranks use
    rank 0's held-out probes and compute the same dynamics metrics."""
    import subprocess
    import sys

    load_flavour("pytorch_lightning")
    script = tmp_path / "ddp_insight.py"
    script.write_text(_DDP_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=180, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    v0, v1 = torch.load(tmp_path / "val0.pt"), torch.load(tmp_path / "val1.pt")
    assert r0["active"] and r1["active"]
    assert torch.equal(r0["heldout"][0], r1["heldout"][0]) and len(r0["heldout"][0]) == 5
    assert (r0["heldout"][0][:, None, :] == v0[None]).all(-1).any(1).all(), "not rank 0's validation samples"
    assert not (r0["heldout"][0][:, None, :] == v1[None]).all(-1).any(1).any()
    assert r0["lr_sum"] == r1["lr_sum"] == pytest.approx(0.1 * 4)  # 2 epochs x 2 batches of 8 per rank
    assert [h["step"] for h in r0["history"]] == [0, 2, 4]
    for h0, h1 in zip(r0["history"], r1["history"]):
        for key in ("residual_norm", "predicted_vs_observed_residual", "linearization_gap", "layer_share/net.0"):
            if key in h0["metrics"] or h0["step"] > 0:
                assert h0["metrics"][key] == pytest.approx(h1["metrics"][key], rel=1e-5), (key, h0["step"])
