"""Numbers a researcher can trust, through real Trainers (issue 14).

* Alignment is label-free: on an untrained classifier with random labels the target-mode
  kernel is aligned with the labels by construction (it reads each probe's own label
  logit), so the callback computes KTA / CKA on the trace kernel (or its projected
  estimate); both are checked against a float64 ``vmap(jacrev)`` kernel and numpy.
* The initial report reaches the console with the TQDM progress bar on.
* TensorBoard gets the K0 heatmap under its own tag and the history pictures at the first
  report.
* A BatchNorm net measured in eval mode: ``log10_scale_change``, the one-time warning
  naming the cause and the fix, and ``init_kernel_at="first_epoch_end"``.
* ``console="compact"``: at most two lines per report.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from callback_reference import TBContent, cka, kta, reference_kernel
from lightning_models import load_flavour, quiet_trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 10


def _random_label_data(n: int = 80, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)  # random labels: nothing to learn from x
    return x, y


def _classifier(fl: Any, net: nn.Module, lr: float = 0.05) -> Any:
    class Classifier(fl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Classifier()


def _uncentred_kta(K: np.ndarray, y: np.ndarray) -> float:
    Y = np.eye(NUM_CLASSES)[y]
    YY = Y @ Y.T
    Ks = (K + K.T) / 2
    return float((Ks * YY).sum() / (np.linalg.norm(Ks) * np.linalg.norm(YY)))


def test_random_labels_give_label_free_alignment_console_and_k0_media(tmp_path: Any, capsys: Any) -> None:
    from ntk_callback import NTKReportCallback, analyze_ntk
    from ntk_callback.engine.projection import output_projections

    fl = load_flavour("pytorch_lightning")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, NUM_CLASSES))
    model = _classifier(fl, net)
    init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x, y = _random_label_data()
    exact = NTKReportCallback(num_probes=60, seed=1)  # default: target mode
    projected = NTKReportCallback(
        num_probes=60, seed=1, alignment="projected", alignment_projections=3, prefix="ntk_p", console="off"
    )
    logger = fl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = fl.Trainer(
        max_epochs=1,
        callbacks=[exact, projected, fl.callbacks.TQDMProgressBar()],
        **quiet_trainer_kwargs(logger=logger, enable_progress_bar=True),
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=20))
    out = capsys.readouterr().out

    px, py = exact.probes
    yn = py.numpy()
    init = exact.history[0]["metrics"]
    # the defect this guards against: the target-mode kernel itself is aligned with random labels
    assert analyze_ntk(exact.init_kernel, py).kta > 0.5
    # label-free alignment: chance level
    assert abs(init["kta"]) < 0.1, init["kta"]
    # and at its chance level: what any kernel scores on labels that carry no information
    assert abs(init["kta"] - init["kta_chance"]) < 0.05 and abs(init["cka"] - init["cka_chance"]) < 0.1
    # against numpy on the float64 trace kernel of the initial weights
    K_tr = reference_kernel(net, init_state, px, py, mode="trace")
    assert init["kta"] == pytest.approx(kta(K_tr, yn), rel=1e-4, abs=1e-6)
    assert init["cka"] == pytest.approx(cka(K_tr, yn), rel=1e-4, abs=1e-6)
    assert init["kta_uncentered"] == pytest.approx(_uncentred_kta(K_tr, yn), rel=1e-4)
    # the projected estimate J V V^T J^T, V drawn from the callback's seed + 2
    V = output_projections(NUM_CLASSES, 3, seed=1 + 2)
    K_v = reference_kernel(net, init_state, px, py, mode="trace", projections=V)
    p_init = projected.history[0]["metrics"]
    assert p_init["kta"] == pytest.approx(kta(K_v, yn), rel=1e-4, abs=1e-6)
    assert p_init["cka"] == pytest.approx(cka(K_v, yn), rel=1e-4, abs=1e-6)
    assert abs(p_init["kta"] - init["kta"]) < 0.05  # an estimate of the same kernel
    # the same projections at K0 and later: kta_change is the change of one estimator
    last = projected.history[-1]
    K_v1 = reference_kernel(net, {k: v for k, v in net.state_dict().items()}, px, py, mode="trace", projections=V)
    assert last["metrics"]["kta_change"] == pytest.approx(kta(K_v1, yn) - kta(K_v, yn), rel=1e-3, abs=1e-5)

    # the initial report reached the console with the TQDM bar on, naming the alignment kernel
    assert "NTK initial kernel K0, step 0" in out, out[-3000:]
    assert out.count("NTK report") == len(exact.history) == 2
    assert "alignment (trace kernel)" in out and "vs K0 at step 0, train start" in out

    tb = TBContent(logger.log_dir)
    # K0's heatmap under its own tag (TensorBoard keeps 10 images per tag), once
    assert [e.step for e in tb.images["ntk/kernel_init"]] == [0]
    # history pictures at the first report already, and at the last
    assert [e.step for e in tb.images["ntk/spectrum"]] == [0, trainer.global_step]
    assert [s for s, _ in tb.series("ntk/log10_scale_change")] == [0, trainer.global_step]


def _bn_model(fl: Any) -> Any:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
    )
    return _classifier(fl, net, lr=0.01)


def test_batchnorm_scale_change_is_flagged_and_k0_after_the_first_epoch(tmp_path: Any, capsys: Any) -> None:
    """Inputs of scale ~30: in eval mode at initialisation BatchNorm divides by its initial
    running variance 1, after an epoch by the data's, and the kernel shrinks ~80x."""
    from ntk_callback import NTKReportCallback

    fl = load_flavour("pytorch_lightning")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g) * 30 + 10
    y = torch.randint(0, 3, (64,), generator=g)
    at_start = NTKReportCallback(num_probes=24, console="off")
    warmed = NTKReportCallback(num_probes=24, init_kernel_at="first_epoch_end", prefix="ntk_w", console="compact")
    trainer = fl.Trainer(max_epochs=2, callbacks=[at_start, warmed], **quiet_trainer_kwargs())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(_bn_model(fl), DataLoader(TensorDataset(x, y), batch_size=8))
    out = capsys.readouterr().out
    messages: list[str] = [str(w.message) for w in rec if "BatchNorm running statistics" in str(w.message)]

    # the scale change, against numpy on the kernels the callback measured
    K0, K = at_start.init_kernel.double().numpy(), at_start.last_kernel.double().numpy()
    scale = at_start.history[-1]["metrics"]["log10_scale_change"]
    assert scale == pytest.approx(math.log10(np.trace(K) / np.trace(K0)), rel=1e-9)
    assert scale < -1.0
    # one warning, from the callback whose K0 predates the statistics, naming cause and fix
    assert len(messages) == 1, messages
    assert "ntk/log10_scale_change" in messages[0] and "init_kernel_at='first_epoch_end'" in messages[0]
    assert "eval mode" in messages[0] and "ntk/kernel_distance" in messages[0]
    # K0 after the first epoch: no scale jump, and the console says which K0 is used
    assert [h["step"] for h in warmed.history] == [8, 16]
    assert warmed.history[0]["tag"] == "init"
    assert abs(warmed.history[-1]["metrics"]["log10_scale_change"]) < 0.5
    assert "NTK initial kernel K0 (after epoch 0), step 8" in out
    # compact console: two lines per report
    compact = [line for line in out.splitlines() if line.strip()]
    assert len(compact) == 2 * len(warmed.history), out
    sd = warmed.state_dict()
    assert sd["init_label"] == "step 8, end of epoch 0"
    assert sd["settings"]["init_kernel_at"] == "first_epoch_end"
