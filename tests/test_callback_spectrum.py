"""The whole-set spectrum of NTKReportCallback (``spectrum_every_n_epochs``), with a real
Trainer and TensorBoard event files read back by TensorBoard's EventAccumulator.

The logged top eigenvalues must equal a dense float64 eigen-decomposition of the
per-sample-loop reference kernel (``tests/reference.py``) over the same examples (the
first ``spectrum_probes`` of the training dataset) at the trained weights; a spectrum
that cannot be computed warns, is skipped, and training finishes. One Lightning flavour
only (the adapter code is flavour-independent; the other flavour is covered elsewhere).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from callback_reference import TBContent
from lightning_models import (
    load_flavour,
    loaders,
    make_model,
    quiet_trainer_kwargs,
    regression_data,
)
from reference import float64_eval_copy, ntk_loop


def _fit(tmp_path: Any, cb: Any, max_epochs: int) -> Any:
    fl = load_flavour("pytorch_lightning")
    model = make_model(fl, "Regressor", seed=0)
    train, _ = loaders("Regressor")
    logger = fl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = fl.Trainer(
        max_epochs=max_epochs, callbacks=[cb], **quiet_trainer_kwargs(logger=logger)
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(model, train)
    return trainer, model, TBContent(logger.log_dir), [str(w.message) for w in rec]


def test_whole_set_spectrum_matches_dense_eigendecomposition(tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(
        num_probes=8,
        dtype=torch.float64,
        log_figures=False,
        console="off",
        spectrum_every_n_epochs=2,
        spectrum_k=3,
        spectrum_probes=48,
    )
    trainer, model, tb, _ = _fit(tmp_path, cb, max_epochs=2)
    assert trainer.global_step == 10
    x, y = regression_data()
    K = ntk_loop(float64_eval_copy(model), x[:48], y[:48], mode="target")  # (48, 48) float64
    exact = torch.linalg.eigvalsh(K).flip(0)[:3]
    (rec,) = cb.spectra  # epoch 1 only (every 2 epochs)
    assert rec["step"] == 10 and rec["metrics"]["num_examples"] == 48
    for i in range(3):
        assert abs(rec["eigenvalues"][i] - float(exact[i])) <= 1e-9 * float(exact[0])
        ((step, logged),) = tb.series(f"ntk/spectrum_set/lambda_{i + 1}")
        assert step == 10 and abs(logged - float(exact[i])) <= 1e-6 * float(
            exact[i]
        )  # float32 events
    ((_, trace),) = tb.series("ntk/spectrum_set/trace")
    ((_, stderr),) = tb.series("ntk/spectrum_set/trace_stderr")
    assert abs(trace - float(torch.trace(K))) <= 5 * stderr + 1e-9 * float(
        torch.trace(K)
    )  # Hutchinson
    assert tb.series("ntk/spectrum_set/seconds")[0][1] > 0
    assert len(tb.images["ntk/spectrum_set"]) == 1
    assert "ntk/spectrum_set/lambda_1" in trainer.callback_metrics
    assert cb.state_dict()["spectra"][0]["eigenvalues"] == rec["eigenvalues"]


def test_whole_set_spectrum_failure_warns_and_training_finishes(tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    # k >= N: Lanczos cannot give that many eigenvalues; the spectrum is skipped, reports go on
    cb = NTKReportCallback(
        num_probes=8,
        log_figures=False,
        console="off",
        spectrum_every_n_epochs=1,
        spectrum_k=20,
        spectrum_probes=12,
    )
    trainer, _, tb, msgs = _fit(tmp_path, cb, max_epochs=1)
    assert trainer.global_step == 5 and not cb.spectra
    assert any("whole-set spectrum at step 5 skipped" in m and "k=20" in m for m in msgs), msgs
    assert "ntk/spectrum_set/lambda_1" not in tb.scalars and len(tb.series("ntk/kta")) == 2


def test_spectrum_settings_are_checked() -> None:
    from ntk_callback import NTKReportCallback

    with pytest.raises(ValueError, match=r"spectrum_every_n_epochs=0"):
        NTKReportCallback(spectrum_every_n_epochs=0)
    with pytest.raises(ValueError, match=r"spectrum_probes=1\): expected 'train'"):
        NTKReportCallback(spectrum_probes=1)

