"""Smoke tests of NTKReportCallback with real Trainers of both Lightning flavours.

The big behavioural suite (bit-identical training, TensorBoard read-back against float64
references, DDP, resume, faults) lives in the other ``test_callback_*`` files; these are
the fast end-to-end checks plus the unit pieces (probe drawing, logger dispatch, state).
"""
from __future__ import annotations

import importlib
import io
import math
import os
import random
from typing import Any, Tuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ntk_callback import NTKReportCallback
from ntk_callback._lightning import NTKCallbackConfigError, logger_kind, sharded_strategy_name
from ntk_callback._probes import default_batch_to_probe, draw_probes, preserve_global_rng

FLAVOURS = ["pytorch_lightning", "lightning.pytorch"]


def _flavour(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.skip(f"{name} is not installed")


def _data(n: int = 48, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 2.0 * nn.functional.one_hot(y, 4).float()
    return x, y


def _module(pl: Any) -> Any:
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Tiny()


def _trainer(pl: Any, **kw: Any) -> Any:
    base = dict(
        accelerator="cpu",
        devices=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    base.update(kw)
    return pl.Trainer(**base)


def _float64_ntk(net: nn.Module, x: torch.Tensor, y: torch.Tensor, trace: bool = False) -> np.ndarray:
    """Independent reference: per-sample autograd loop in float64 on a copy of ``net``;
    the target kernel, or with ``trace`` the sum over outputs (the alignments' kernel)."""
    import copy

    ref = copy.deepcopy(net).double().eval()
    params = [p for p in ref.parameters()]
    K = 0.0
    for a in range(ref(x[:1].double()).shape[1] if trace else 1):
        rows = []
        for i in range(len(x)):
            out = ref(x[i : i + 1].double())[0, a if trace else int(y[i])]
            grads = torch.autograd.grad(out, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        J = torch.stack(rows).numpy()
        K = K + J @ J.T
    return K


def _kta(K: np.ndarray, y: np.ndarray) -> float:
    Y = np.eye(int(y.max()) + 1)[y]
    Y = Y - Y.mean(axis=0)
    T = Y @ Y.T
    Ks = (K + K.T) / 2
    return float((Ks * T).sum() / (np.linalg.norm(Ks) * np.linalg.norm(T)))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fit_with_tensorboard_logs_reports_console_and_callback_metrics(flavour: str, tmp_path: Any, capsys: Any) -> None:
    pl = _flavour(flavour)
    loggers = importlib.import_module(f"{flavour}.loggers")
    pl.seed_everything(0, verbose=False)
    x, y = _data()
    model = _module(pl)
    cb = NTKReportCallback(num_probes=12, every_n_epochs=2, seed=3)
    logger = loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = _trainer(pl, max_epochs=3, logger=logger, callbacks=[cb])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))

    # init (step 0), after epoch 1 (step 6), final after the unreported epoch 2 (step 9)
    assert [(h["tag"], h["epoch"], h["step"]) for h in cb.history] == [("init", 0, 0), ("epoch", 1, 6), ("final", 2, 9)]
    # probes: drawn from the data, 4 per class, sorted by class
    px, py = cb.probes
    assert px.shape == (12, 4) and py.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the final report is on the final weights: compare with an independent float64 kernel
    K = _float64_ntk(model.net, px, py)
    last = cb.history[-1]["metrics"]
    lam = np.linalg.eigvalsh(K)
    assert last["lambda_max"] == pytest.approx(lam[-1], rel=1e-4)
    # alignments on the label-free trace kernel (the target kernel reads the labels)
    assert last["kta"] == pytest.approx(_kta(_float64_ntk(model.net, px, py, trace=True), py.numpy()), abs=1e-5)
    # monitorable values
    for key in ("ntk/kta", "ntk/lambda_max", "ntk/relative_change", "ntk/log10_condition_number"):
        assert key in trainer.callback_metrics, key
    assert float(trainer.callback_metrics["ntk/kta"]) == pytest.approx(last["kta"], rel=1e-12)
    # console: one report per evaluation, on rank zero, through LightningModule.print
    out = capsys.readouterr().out
    assert out.count("NTK report") == 3 and "alignment" in out
    # the per-layer line (largest share first); a classifier has no dynamics line
    assert out.count("\nlayers     net.") == 3 and "\ndynamics" not in out
    # TensorBoard: scalars at the report steps, histogram and images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("ntk/kta")] == [0, 6, 9]
    assert [e.value for e in acc.Scalars("ntk/lambda_max")][-1] == pytest.approx(last["lambda_max"], rel=1e-6)
    assert "ntk/eigenvalues" in tags["histograms"]
    assert {"ntk/kernel", "ntk/spectrum", "ntk/drift"} <= set(tags["images"])
    assert [e.step for e in acc.Images("ntk/kernel")] == [0, 6, 9]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_csv_logger_gets_scalars_and_files(flavour: str, tmp_path: Any) -> None:
    pl = _flavour(flavour)
    loggers = importlib.import_module(f"{flavour}.loggers")
    x, y = _data(24)
    cb = NTKReportCallback(num_probes=6, log_console=False, log_figures=False)
    logger = loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = _trainer(pl, max_epochs=1, logger=logger, callbacks=[cb])
    trainer.fit(_module(pl), DataLoader(TensorDataset(x, y), batch_size=12))
    files = set(os.listdir(os.path.join(logger.log_dir, "ntk")))
    assert {"kernel_step_0000000.png", "kernel_step_0000000.npy", "kernel_step_0000002.npy", "history.json"} <= files
    K = np.load(os.path.join(logger.log_dir, "ntk", "kernel_step_0000002.npy"))
    np.testing.assert_allclose(K, cb.last_kernel.double().numpy())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        header = fh.readline()
    assert "ntk/kta" in header and "ntk/lambda_max" in header


def test_no_logger_prints_and_warns_once(tmp_path: Any, capsys: Any) -> None:
    pl = _flavour("pytorch_lightning")
    x, y = _data(24)
    cb = NTKReportCallback(num_probes=6)
    trainer = _trainer(pl, max_epochs=2, logger=False, callbacks=[cb], default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="no logger") as rec:
        trainer.fit(_module(pl), DataLoader(TensorDataset(x, y), batch_size=12))
    assert sum("no logger" in str(w.message) for w in rec) == 1
    assert capsys.readouterr().out.count("NTK report") == 3
    assert "ntk/kta" in trainer.callback_metrics


def test_logger_kind_recognises_both_flavours_without_instantiating_backends(tmp_path: Any) -> None:
    seen = 0
    for name in FLAVOURS:
        try:
            mod = importlib.import_module(f"{name}.loggers")
        except ImportError:  # pragma: no cover
            continue
        seen += 1
        assert logger_kind(mod.TensorBoardLogger(str(tmp_path))) == "tensorboard"
        assert logger_kind(mod.CSVLogger(str(tmp_path))) == "csv"
        # W&B / MLflow need their backends to construct; the class alone is enough here
        assert logger_kind(object.__new__(mod.WandbLogger)) == "wandb"
        assert logger_kind(object.__new__(mod.MLFlowLogger)) == "mlflow"

        class MyTB(mod.TensorBoardLogger):  # a user subclass keeps its kind
            pass

        assert logger_kind(MyTB(str(tmp_path))) == "tensorboard"

        class Custom(mod.Logger):
            name = "custom"
            version = 0

            def log_metrics(self, metrics: Any, step: Any = None) -> None: ...

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None: ...

        assert logger_kind(Custom()) == "other"
    assert seen >= 1

    class TensorBoardLogger:  # same name, not Lightning's: not recognised
        pass

    assert logger_kind(TensorBoardLogger()) == "other"


def test_sharded_strategy_detection() -> None:
    strategies = importlib.import_module("pytorch_lightning.strategies")
    assert sharded_strategy_name(object.__new__(strategies.FSDPStrategy)) == "FSDPStrategy"
    assert sharded_strategy_name(object.__new__(strategies.DeepSpeedStrategy)) == "DeepSpeedStrategy"
    assert sharded_strategy_name(object.__new__(strategies.DDPStrategy)) is None


class _Imbalanced(Dataset):
    """Dict items whose __getitem__ draws from the global RNG (a random augmentation)."""

    def __init__(self) -> None:
        self.y = torch.tensor([0] * 200 + [1] * 30 + [2] * 10)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        noise = torch.rand(1).item() + np.random.rand() + random.random()
        return {"x": torch.full((3,), float(i)) + 0 * noise, "label": self.y[i], "extra": "meta"}


def _rng_snapshot() -> tuple:
    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def test_draw_probes_is_class_balanced_reproducible_and_leaves_global_rng_alone() -> None:
    ds = _Imbalanced()
    loader = DataLoader(ds, batch_size=8, shuffle=True)
    before = _rng_snapshot()
    x1, y1 = draw_probes(loader, 15, torch.Generator().manual_seed(0))
    after = _rng_snapshot()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    # all 10 of class 2 are rare; the pool (all 240 items here) gives 5 / 5 / 5
    assert sorted(np.bincount(y1.numpy()).tolist()) == [5, 5, 5]
    assert y1.tolist() == sorted(y1.tolist())
    # inputs match the dataset items picked
    idx = x1[:, 0].long()
    assert torch.equal(ds.y[idx], y1)
    x2, y2 = draw_probes(loader, 15, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = draw_probes(loader, 15, torch.Generator().manual_seed(1))
    assert not torch.equal(x1, x3)
    # more probes than the rarest class holds: the others fill in
    _, y4 = draw_probes(loader, 60, torch.Generator().manual_seed(0))
    assert len(y4) == 60 and np.bincount(y4.numpy()).tolist() == [25, 25, 10]


def test_draw_probes_from_an_iterable_dataset_and_x_only_batches() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(50):
                yield torch.full((2,), float(i)), torch.tensor(i % 2)

    x, y = draw_probes(DataLoader(Stream(), batch_size=4, num_workers=0), 6, torch.Generator().manual_seed(0))
    assert len(x) == 6 and np.bincount(y.numpy()).tolist() == [3, 3]
    assert x[:, 0].tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]  # the first 8 items, balanced, sorted by class
    xs = torch.arange(20.0).reshape(10, 2)
    x, y = draw_probes(DataLoader(xs, batch_size=4), 4, torch.Generator().manual_seed(0))
    assert y is None and x.shape == (4, 2)


def test_default_batch_to_probe() -> None:
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    assert default_batch_to_probe((x, y))[1] is y
    assert default_batch_to_probe([x, y, "extra"])[1] is y
    assert default_batch_to_probe(x) == (x, None)
    assert default_batch_to_probe({"inputs": x, "labels": y})[0] is x
    with pytest.raises(ValueError, match="batch_to_probe"):
        default_batch_to_probe({"image": x})


def test_preserve_global_rng_restores_after_an_exception() -> None:
    before = _rng_snapshot()
    with pytest.raises(RuntimeError):
        with preserve_global_rng():
            torch.rand(3), np.random.rand(), random.random()
            raise RuntimeError("boom")
    after = _rng_snapshot()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_state_dict_roundtrip_weights_only_and_state_key() -> None:
    x, y = _data(9)
    cb = NTKReportCallback(probes=(x, y), every_n_epochs=2)
    cb.monitor._init_kernel = torch.eye(9)
    cb.history.append({"tag": "init", "epoch": 0, "step": 0, "metrics": {"kta": 0.5}, "eigenvalues": [1.0] * 9})
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["version"] == 1 and set(state["probes"]) == {"inputs", "targets"}
    fresh = NTKReportCallback(probes=(x, y), every_n_epochs=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probes[0], x) and torch.equal(fresh.probes[1], y)
    assert torch.equal(fresh.init_kernel, torch.eye(9)) and fresh.history == cb.history
    fresh.load_state_dict({})  # tolerant: nothing to restore is not an error
    assert NTKReportCallback(every_n_epochs=2).state_key != NTKReportCallback(every_n_epochs=3).state_key
    assert NTKReportCallback(mode="trace").state_key != NTKReportCallback().state_key


def test_constructor_validation_messages() -> None:
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    with pytest.raises(NTKCallbackConfigError, match=r"num_probes=0"):
        NTKReportCallback(num_probes=0)
    with pytest.raises(MisconfigurationException, match="'trace' or 'sum'"):
        NTKReportCallback(mode="full")
    with pytest.raises(ValueError, match="dtype"):
        NTKReportCallback(dtype=torch.int64)
    with pytest.raises(ValueError, match=r"probes=\.\.\.\): expected a pair \(inputs, targets\)"):
        NTKReportCallback(probes=(torch.zeros(3, 2),))
    with pytest.raises(ValueError, match="strict"):
        NTKReportCallback(strict="yes")  # type: ignore[arg-type]


_ISOLATED_FIT = r"""
import sys
sys.modules[{blocked!r}] = None  # as if this flavour were not installed
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import {flavour} as pl
from {flavour}.loggers import TensorBoardLogger
import ntk_callback._lightning as shim
from ntk_callback import NTKReportCallback
assert shim.FLAVOUR == {flavour!r}, shim.FLAVOUR

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, i):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

x, y = torch.randn(8, 3), torch.arange(8) % 2
cb = NTKReportCallback(num_probes=4, log_console=False)
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=TensorBoardLogger({logdir!r}), callbacks=[cb],
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(M(), DataLoader(TensorDataset(x, y), batch_size=4))
assert [h["step"] for h in cb.history] == [0, 2], cb.history
assert "ntk/kta" in trainer.callback_metrics
assert sys.modules.get({blocked!r}) is None  # never imported behind our back
print("ISOLATED-OK", shim.logger_kind(trainer.logger))
"""


@pytest.mark.parametrize(
    "flavour,blocked", [("pytorch_lightning", "lightning"), ("lightning.pytorch", "pytorch_lightning")]
)
def test_works_with_only_one_flavour_installed(flavour: str, blocked: str, tmp_path: Any) -> None:
    import subprocess
    import sys

    _flavour(flavour)
    code = _ISOLATED_FIT.format(flavour=flavour, blocked=blocked, logdir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ISOLATED-OK tensorboard" in proc.stdout


def test_media_dispatch_to_wandb_mlflow_and_scalar_only_loggers() -> None:
    """W&B / MLflow media calls (their backends are not needed: the I/O methods are stubbed)."""
    pytest.importorskip("matplotlib")
    from pytorch_lightning.loggers import Logger, MLFlowLogger, WandbLogger

    from ntk_callback.loggers import LoggerDispatcher, ReportMedia

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:
            self.images: list = []
            self.metrics: list = []

        def log_image(self, key: str, images: list, step: Any = None, **kwargs: Any) -> None:
            self.images.append((key, images[0].shape, images[0].dtype, step))

        def log_metrics(self, metrics: Any, step: Any = None) -> None:  # the histogram, when wandb is installed
            self.metrics.append((sorted(metrics), step))

    class FakeClient:
        def __init__(self) -> None:
            self.calls: list = []

        def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
            self.calls.append(("image", run_id, image.shape, artifact_file))

        def log_dict(self, run_id: str, d: dict, artifact_file: str) -> None:
            self.calls.append(("dict", run_id, len(d["eigenvalues"]), artifact_file))

    class FakeMLflow(MLFlowLogger):
        def __init__(self) -> None:
            self.client = FakeClient()

        @property
        def experiment(self) -> Any:
            return self.client

        @property
        def run_id(self) -> str:
            return "run-1"

    class Plain(Logger):
        name, version = "plain", 0

        def log_metrics(self, metrics: Any, step: Any = None) -> None: ...

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None: ...

    K = torch.randn(6, 6, dtype=torch.float64)
    K = K @ K.T
    lam = torch.linalg.eigvalsh(K).flip(0)
    hist = [{"tag": "init", "epoch": 0, "step": 0, "metrics": {"kta": 0.5}, "eigenvalues": lam.tolist()}]
    media = ReportMedia(step=7, kernel=K.numpy(), labels=np.array([0, 0, 1, 1, 2, 2]), eigenvalues=lam.numpy(), history=hist)
    wb, ml, plain = FakeWandb(), FakeMLflow(), Plain()
    disp = LoggerDispatcher()
    with pytest.warns(UserWarning, match="Plain receives the `ntk/` scalars only") as rec:
        disp.warn_scalar_only([wb, ml, plain])
        disp.warn_scalar_only([wb, ml, plain])
    assert len([w for w in rec if "Plain" in str(w.message)]) == 1
    disp.log_media([wb, ml, plain], media)
    assert [(k, s[2], d, st) for k, s, d, st in wb.images] == [
        ("ntk/kernel", 3, np.uint8, 7), ("ntk/spectrum", 3, np.uint8, 7), ("ntk/drift", 3, np.uint8, 7)
    ]
    heatmap_hwc = media.image("kernel").transpose(1, 2, 0).shape
    assert wb.images[0][1] == heatmap_hwc and heatmap_hwc[2] == 3  # HWC for wandb.Image
    assert ml.client.calls[0] == ("image", "run-1", heatmap_hwc, "ntk/kernel/step_0000007.png")
    assert ml.client.calls[-1] == ("dict", "run-1", 6, "ntk/eigenvalues/step_0000007.json")


def test_a_failing_logger_is_reported_not_raised() -> None:
    from ntk_callback.loggers import LoggerDispatcher

    class Broken:
        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            raise OSError("disk full")

    class Good:
        def __init__(self) -> None:
            self.got: list = []

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            self.got.append((metrics, step))

    errors: list = []
    good = Good()
    LoggerDispatcher(on_error=lambda what, err: errors.append((what, str(err)))).log_scalars(
        [Broken(), good], {"ntk/kta": 0.25}, 3
    )
    assert errors == [("Broken.log_metrics", "disk full")]
    assert good.got == [({"ntk/kta": 0.25}, 3)]  # the next logger still gets its scalars


def test_regression_console_lines_prefix_helpers_and_state_round_trip(capsys: Any) -> None:
    """A regressor prints a dynamics line; prefix helpers; the dynamics state survives
    ``torch.save``/``torch.load(weights_only=True)``."""
    from ntk_callback.callback import _insight_lines
    from ntk_callback.loggers import check_prefix, prefixed_scalars

    pl = _flavour("pytorch_lightning")

    class Reg(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)  # (N, 1): O = 1

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self(batch[0]).squeeze(-1), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tanh(x[:, 0])
    cb = NTKReportCallback(num_probes=8, residual_top_k=3)
    trainer = _trainer(pl, max_epochs=2, logger=False, callbacks=[cb])
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(Reg(), DataLoader(TensorDataset(x, y), batch_size=12))
    out = capsys.readouterr().out
    assert out.count("\ndynamics   residual") == 3 and out.count("ratio") == 2 and "top-3 energy" in out
    assert "lin. gap" not in out  # no validation data: no held-out probes
    assert cb.dynamics_active and cb.heldout is None and cb.lr_sum == pytest.approx(0.1 * 4)
    m = cb.history[-1]["metrics"]
    assert {"residual_energy_top3", "predicted_vs_observed_residual", "layer_share/net.0"} <= set(m)
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["dynamics"]["lr_sum"] == cb.lr_sum and state["dynamics"]["tracker"]["prev"]["step"] == 4
    assert state["settings"]["prefix"] == "ntk" and set(state["init_layer_kernels"]) == {"net.0", "net.2"}

    lines = _insight_lines({"layer_share/a": 0.25, "layer_share/b": 0.75, "layer_drift/b": 0.5,
                            "residual_norm": 2.0, "predicted_residual_norm": 2.2,
                            "predicted_vs_observed_residual": 1.1, "steps_to_halve_residual": math.inf})
    assert lines == ("\nlayers     b 75% (drift 0.5)  a 25% (drift n/a)"
                     "\ndynamics   residual 2 (predicted 2.2, ratio 1.1)  halves in n/a steps"
                     " if the kernel stayed frozen")  # a frozen-kernel estimate, said so
    assert _insight_lines({"kta": 0.5}) == ""
    assert prefixed_scalars({"kta": 0.5, "bad": "x"}, "run/ntk") == {"run/ntk/kta": 0.5}
    assert check_prefix("a/b") == "a/b"
    for bad in ("", "a/", "/a", "a/../b", "a/ b"):
        with pytest.raises(ValueError, match="prefix"):
            check_prefix(bad)
