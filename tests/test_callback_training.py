"""Side-effect freedom of NTKReportCallback with real Trainers (issue 4).

Training with the callback must be bit-for-bit training without it on CPU with
``deterministic=True``: weights, BatchNorm buffers, gradients, optimizer and scheduler
state, the global RNG streams (torch, numpy, python), the order of the shuffled batches,
the logged training losses and the module's train/eval flags. The models carry
BatchNorm and Dropout (RNG consumers), the loader shuffles with the global generator,
and the callback reports after every epoch, so any RNG draw, any forward pass in train
mode or any buffer update by the callback shows up.

Also: ``ntk_callback`` works when only one Lightning flavour is importable.
"""
from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

from callback_reference import TBContent
from lightning_models import (
    Flavour,
    dict_batch_to_probe,
    load_flavour,
    loaders,
    make_model,
    quiet_trainer_kwargs,
)

MAX_EPOCHS = 3


def _rng_states() -> Tuple[torch.Tensor, Any, Any]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _csv_losses(log_dir: str) -> List[Tuple[str, str]]:
    """``(step, train_loss)`` rows exactly as CSVLogger wrote them (strings: no rounding)."""
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as fh:
        return [(r["step"], r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")]


def _fit(
    fl: Flavour,
    kind: str,
    tmp: str,
    with_callback: bool,
    logger_kind: str,
    cb_kwargs: Dict[str, Any],
) -> Dict[str, Any]:
    from ntk_callback import NTKReportCallback

    model = make_model(fl, kind, seed=1234)
    train, val = loaders(kind)
    # constructed after the model is seeded: an RNG draw in __init__ would shift the
    # shuffling of the train loader and be caught below
    callbacks = [NTKReportCallback(**cb_kwargs)] if with_callback else []
    if logger_kind == "tensorboard":
        logger = fl.loggers.TensorBoardLogger(tmp, name="", version=0)
    elif logger_kind == "csv":
        logger = fl.loggers.CSVLogger(tmp, name="", version=0)
    else:
        logger = False
    trainer = fl.Trainer(
        max_epochs=MAX_EPOCHS,
        callbacks=callbacks,
        **quiet_trainer_kwargs(logger=logger, num_sanity_val_steps=2),
    )
    trainer.fit(model, train, val)
    return {
        "model": model,
        "trainer": trainer,
        "rng": _rng_states(),
        "log_dir": logger.log_dir if logger else None,
        "callback": callbacks[0] if callbacks else None,
    }


def _assert_same_tree(a: Any, b: Any, where: str) -> None:
    """Recursive bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


SCENARIOS = [
    # (flavour, model, logger, callback kwargs)
    ("pytorch_lightning", "BNCNN", "tensorboard", dict(num_probes=24, every_n_epochs=1, seed=3)),
    ("lightning.pytorch", "BNCNN", "csv", dict(num_probes=24, every_n_epochs=1, seed=3)),
    (
        "lightning.pytorch",
        "DictBatchNet",
        "none",
        dict(num_probes=20, every_n_epochs=1, batch_to_probe=dict_batch_to_probe),
    ),
]


@pytest.mark.parametrize(
    "flavour_name,kind,logger_kind,cb_kwargs",
    SCENARIOS,
    ids=["pl-bncnn-tensorboard", "lightning-bncnn-csv", "lightning-dictbatch-nologger"],
)
def test_training_is_bit_identical_with_and_without_callback(
    tmp_path: Any, flavour_name: str, kind: str, logger_kind: str, cb_kwargs: Dict[str, Any]
) -> None:
    fl = load_flavour(flavour_name)
    with_cb = _fit(fl, kind, str(tmp_path / "with"), True, logger_kind, cb_kwargs)
    without = _fit(fl, kind, str(tmp_path / "without"), False, logger_kind, cb_kwargs)
    m1, m0 = with_cb["model"], without["model"]

    # the callback really worked: one initial report plus one per epoch
    history = with_cb["callback"].history
    assert [h["tag"] for h in history] == ["init"] + ["epoch"] * MAX_EPOCHS, history
    assert all(np.isfinite(h["metrics"]["kta"]) for h in history)

    # same batches in the same order (shuffled by the global generator), same losses
    assert len(m1.batch_checksums) == MAX_EPOCHS * len(loaders(kind)[0])
    assert m1.batch_checksums == m0.batch_checksums
    assert m1.train_losses == m0.train_losses

    # parameters and buffers (BatchNorm running stats, num_batches_tracked), bitwise
    _assert_same_tree(m1.state_dict(), m0.state_dict(), "state_dict")
    for (name, p1), (_, p0) in zip(m1.named_parameters(), m0.named_parameters()):
        assert p1.requires_grad == p0.requires_grad, name
        assert (p1.grad is None) == (p0.grad is None), name
        if p0.grad is not None:
            _assert_same_tree(p1.grad, p0.grad, f"{name}.grad")
    assert [m.training for m in m1.modules()] == [m.training for m in m0.modules()]

    # optimizer and LR-scheduler state
    t1, t0 = with_cb["trainer"], without["trainer"]
    for o1, o0 in zip(t1.optimizers, t0.optimizers):
        _assert_same_tree(o1.state_dict(), o0.state_dict(), "optimizer")
    for s1, s0 in zip(t1.lr_scheduler_configs, t0.lr_scheduler_configs):
        _assert_same_tree(s1.scheduler.state_dict(), s0.scheduler.state_dict(), "scheduler")
    assert t1.global_step == t0.global_step == len(m1.batch_checksums)

    # global RNG streams after fit: torch, numpy, python
    (tr1, np1, py1), (tr0, np0, py0) = with_cb["rng"], without["rng"]
    assert torch.equal(tr1, tr0), "torch global RNG moved"
    assert np1[0] == np0[0] and np.array_equal(np1[1], np0[1]) and np1[2:] == np0[2:], "numpy RNG moved"
    assert py1 == py0, "python random moved"

    # the training losses as the logger wrote them
    if logger_kind == "csv":
        assert _csv_losses(with_cb["log_dir"]) == _csv_losses(without["log_dir"])
        assert len(_csv_losses(with_cb["log_dir"])) == t1.global_step
    if logger_kind == "tensorboard":
        tb1, tb0 = TBContent(with_cb["log_dir"]), TBContent(without["log_dir"])
        assert tb1.series("train_loss") == tb0.series("train_loss")
        assert len(tb1.series("train_loss")) == t1.global_step
        assert "ntk/kta" in tb1.scalars and "ntk/kta" not in tb0.scalars


_ONE_FLAVOUR_SCRIPT = textwrap.dedent(
    """
    import sys
    for blocked in {blocked!r}:
        sys.modules[blocked] = None  # "not installed": any import of it raises ImportError
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import {flavour} as fl
    from ntk_callback import NTKReportCallback

    class Net(fl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g); y = torch.randint(0, 3, (48,), generator=g)
    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    logger = fl.loggers.TensorBoardLogger(sys.argv[1], name="", version=0)
    trainer = fl.Trainer(max_epochs=2, callbacks=[cb], logger=logger, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=16))
    bad = [m for m in {blocked!r} if sys.modules.get(m) is not None]
    assert not bad, bad
    print("REPORTS", len(cb.history), float(trainer.callback_metrics["ntk/kta"]))
    """
)


@pytest.mark.parametrize(
    "flavour_name,blocked",
    [
        ("pytorch_lightning", ("lightning", "lightning.pytorch", "lightning.fabric")),
        ("lightning.pytorch", ("pytorch_lightning", "lightning_fabric")),
    ],
    ids=["only-pytorch_lightning", "only-lightning"],
)
def test_works_with_only_one_flavour_installed(tmp_path: Any, flavour_name: str, blocked: Tuple[str, ...]) -> None:
    script = tmp_path / "one_flavour.py"
    script.write_text(_ONE_FLAVOUR_SCRIPT.format(blocked=blocked, flavour=flavour_name))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORTS")]
    assert line, proc.stdout[-3000:]
    _, count, kta = line[-1].split()
    assert int(count) == 3  # init + 2 epochs
    assert np.isfinite(float(kta))
    tb = TBContent(str(tmp_path / "logs"))
    assert len(tb.series("ntk/kta")) == 3
