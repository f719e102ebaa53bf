"""What NTKReportCallback logs, read back from real files (issue 4; keys in the README table).

* TensorBoard: the event files are read back with TensorBoard's own
  ``EventAccumulator`` (nothing dropped: size guidance 0). Every section-4 scalar is
  there once per report at ``trainer.global_step``; a histogram and a heatmap image under
  ``ntk/``; only one run directory (no ``add_scalars`` sub-runs).
* The logged numbers are recomputed independently: a float64 ``vmap(jacrev)`` kernel on
  the weights snapshotted at each report step, numpy metrics (``callback_reference``).
* ``trainer.callback_metrics`` carries the values; ``ModelCheckpoint`` and
  ``EarlyStopping`` can monitor ``ntk/kta``.
* CSVLogger gets the scalars plus PNG / ``.npy`` files in its ``log_dir``.
* The console gets one report per evaluation.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

from callback_reference import (
    SCALAR_KEYS,
    TBContent,
    assert_close,
    metrics,
    probes_from_state,
    reference_kernel,
    snapshot_callback,
)
from lightning_models import (  # noqa: F401  (flavour is a fixture)
    Flavour,
    flavour,
    image_data,
    loaders,
    make_model,
    quiet_trainer_kwargs,
    regression_data,
)

BATCHES_PER_EPOCH = 5  # 80 training samples, batch size 16 (lightning_models.loaders)


def _check_against_reference(
    model: torch.nn.Module,
    snapshots: Dict[int, Dict[str, torch.Tensor]],
    series: Dict[str, List[Tuple[int, float]]],
    probes: Tuple[torch.Tensor, torch.Tensor],
    init_state: Dict[str, torch.Tensor],
) -> None:
    """Every logged report agrees with the float64 reference computed from the weights
    of its step.

    Tolerances: scalars go through float32 (the model's dtype, and TensorBoard stores
    float32); 1e-3 relative on the well-conditioned quantities. ``lambda_min`` is
    compared on the scale of the spectrum (1e-3 * lambda_max: a float32 eigensolver's
    error is relative to the largest eigenvalue), the drift metrics get an absolute floor
    because they are ~0 at the initial report.
    """
    x, y = probes
    K0 = reference_kernel(model.net, init_state, x, y)
    steps = [s for s, _ in series["ntk/kta"]]
    for i, step in enumerate(steps):
        K = reference_kernel(model.net, snapshots[step], x, y)
        # alignments come from the label-free trace kernel (the same as K for one output)
        K_align = reference_kernel(model.net, snapshots[step], x, y, mode="trace")
        ref = metrics(K, y.numpy(), K0, K_align=K_align)
        got = {key[4:]: series[key][i][1] for key in SCALAR_KEYS}
        for key in SCALAR_KEYS:
            assert series[key][i][0] == step, (key, series[key])
        for name in ("lambda_max", "trace", "kta", "cka", "effective_rank"):
            assert_close(got[name], ref[name], rel=1e-3, what=f"{name} @ step {step}")
        assert_close(got["lambda_min"], ref["lambda_min"], rel=0, abs_=1e-3 * ref["lambda_max"], what="lambda_min")
        assert_close(got["relative_change"], ref["relative_change"], rel=1e-3, abs_=1e-5, what=f"relative_change @ {step}")
        assert_close(got["kernel_distance"], ref["kernel_distance"], rel=1e-3, abs_=1e-6, what=f"kernel_distance @ {step}")
        # kappa of a float32 kernel: compare on the log scale, and the logged log10 form
        # is the log10 of the logged kappa whenever that is finite
        assert math.isfinite(got["log10_condition_number"])
        if math.isfinite(got["condition_number"]):
            assert_close(got["log10_condition_number"], math.log10(got["condition_number"]), rel=1e-4, abs_=1e-4,
                         what="log10_condition_number")
        if math.isfinite(ref["condition_number"]) and ref["condition_number"] < 1e4:
            assert_close(got["log10_condition_number"], math.log10(ref["condition_number"]), rel=0, abs_=1e-2,
                         what="log10_condition_number vs reference")
    # the test can fail: training moved the kernel well beyond the tolerances
    last = series["ntk/relative_change"][-1][1]
    assert last > 0.05, f"the kernel barely moved (relative_change {last}); the drift check would be vacuous"


def _decode_png(encoded: bytes) -> np.ndarray:
    from PIL import Image  # Pillow comes with matplotlib (a dev dependency)

    return np.asarray(Image.open(io.BytesIO(encoded)))


@pytest.mark.parametrize("every_n_epochs,max_epochs", [(2, 3)])
def test_tensorboard_event_file_has_every_key_and_correct_numbers(
    flavour: Flavour, tmp_path: Any, every_n_epochs: int, max_epochs: int
) -> None:
    from ntk_callback import NTKReportCallback

    x, y = image_data()
    probes = (x[:24].clone(), y[:24].clone())
    model = make_model(flavour, "BNCNN", seed=0, lr=0.05)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = loaders("BNCNN")
    cb = NTKReportCallback(probes=probes, every_n_epochs=every_n_epochs)
    snaps = snapshot_callback(flavour.Callback)
    logger = flavour.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = flavour.Trainer(
        max_epochs=max_epochs, callbacks=[cb, snaps], **quiet_trainer_kwargs(logger=logger)
    )
    trainer.fit(model, train, val)

    tb = TBContent(logger.log_dir)
    # one run directory: flat scalars, no add_scalars sub-runs
    assert len(tb.files) == 1, tb.files
    # reports: initial, every N-th epoch, and the final one because epoch 3 is not a multiple of 2
    expected = [0] + [
        (e + 1) * BATCHES_PER_EPOCH for e in range(max_epochs) if (e + 1) % every_n_epochs == 0
    ]
    if max_epochs % every_n_epochs:
        expected.append(max_epochs * BATCHES_PER_EPOCH)
    assert trainer.global_step == max_epochs * BATCHES_PER_EPOCH
    series = {}
    for key in SCALAR_KEYS:
        assert key in tb.scalars, f"{key} missing; ntk/ scalars present: {tb.ntk_tags('scalars')}"
        series[key] = tb.series(key)
        assert [s for s, _ in series[key]] == expected, (key, series[key])
    assert [h["step"] for h in cb.history] == expected

    _check_against_reference(model, snaps.states, series, probes, init_state)

    # histogram of log10 eigenvalues: one per report; its maximum is log10(lambda_max)
    assert tb.ntk_tags("histograms"), "no histogram under ntk/"
    hist_tag = "ntk/eigenvalues" if "ntk/eigenvalues" in tb.histograms else tb.ntk_tags("histograms")[0]
    hists = sorted(tb.histograms[hist_tag], key=lambda e: e.step)
    assert [h.step for h in hists] == expected
    for h, (_, lmax) in zip(hists, series["ntk/lambda_max"]):
        assert 0 < h.histogram_value.num <= len(probes[0])
        assert_close(h.histogram_value.max, math.log10(lmax), rel=0, abs_=1e-3, what="histogram max")

    # the kernel heatmap, one per report, a real picture (not constant)
    assert "ntk/kernel" in tb.images, f"images under ntk/: {tb.ntk_tags('images')}"
    kernel_imgs = sorted(tb.images["ntk/kernel"], key=lambda e: e.step)
    assert [e.step for e in kernel_imgs] == expected
    for ev in kernel_imgs:
        pix = _decode_png(ev.encoded_image_string)
        assert pix.shape[0] >= len(probes[0]) and pix.shape[1] >= len(probes[0])
        assert pix.std() > 0
    # plus pictures over the run (spectrum across reports, drift/alignment over epochs)
    assert len(tb.ntk_tags("images")) >= 2, tb.ntk_tags("images")

    # callback_metrics: the last report's values, monitorable
    for key in SCALAR_KEYS:
        assert key in trainer.callback_metrics, key
        v = float(trainer.callback_metrics[key])
        assert v == pytest.approx(series[key][-1][1], rel=1e-6) or (math.isinf(v) and math.isinf(series[key][-1][1]))


def test_regression_model_drawn_probes_numbers(flavour: Flavour, tmp_path: Any) -> None:
    """``(N, 1)`` output, float targets, probes drawn from the train loader; the probes
    the callback used are read from its ``state_dict`` (the checkpointed copy)."""
    from ntk_callback import NTKReportCallback

    model = make_model(flavour, "Regressor", seed=5, lr=0.05)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    train, _ = loaders("Regressor")
    cb = NTKReportCallback(num_probes=32, every_n_epochs=1, seed=11)
    snaps = snapshot_callback(flavour.Callback)
    logger = flavour.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = flavour.Trainer(max_epochs=3, callbacks=[cb, snaps], **quiet_trainer_kwargs(logger=logger))
    trainer.fit(model, train)

    px, py = probes_from_state(cb.state_dict())
    assert px.shape == (32, 5) and py.shape[0] == 32
    # drawn from the training set: every probe is one of its rows
    data_x, data_y = regression_data()
    match = (px[:, None, :] == data_x[None, :, :]).all(-1)
    assert match.any(1).all(), "probes are not rows of the training set"
    idx = match.float().argmax(1)
    assert torch.equal(py.reshape(32, -1).to(data_y.dtype), data_y[idx].reshape(32, -1))
    assert len(set(idx.tolist())) == 32, "a probe was drawn twice"

    tb = TBContent(logger.log_dir)
    series = {key: tb.series(key) for key in SCALAR_KEYS}
    assert [s for s, _ in series["ntk/kta"]] == [0, 5, 10, 15]
    _check_against_reference(model, snaps.states, series, (px, py), init_state)


def test_model_checkpoint_and_early_stopping_monitor_kta(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    model = make_model(flavour, "BNCNN", seed=2, lr=0.05)
    train, val = loaders("BNCNN")
    cb = NTKReportCallback(num_probes=16, every_n_epochs=1)
    ckpt = flavour.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), monitor="ntk/kta", mode="max", save_top_k=1
    )
    early = flavour.callbacks.EarlyStopping(monitor="ntk/kta", mode="max", patience=10)
    logger = flavour.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = flavour.Trainer(
        max_epochs=3,
        callbacks=[ckpt, early, cb],  # the NTK callback listed last on purpose
        **quiet_trainer_kwargs(logger=logger, enable_checkpointing=True),
    )
    trainer.fit(model, train, val)

    epoch_kta = [h["metrics"]["kta"] for h in cb.history if h["tag"] == "epoch"]
    assert len(epoch_kta) == 3
    assert ckpt.best_model_score is not None
    assert float(ckpt.best_model_score) == pytest.approx(max(epoch_kta), rel=1e-6)
    assert os.path.isfile(ckpt.best_model_path)
    assert "kta" in os.path.basename(ckpt.best_model_path) or ckpt.best_model_path
    assert float(early.best_score) == pytest.approx(max(epoch_kta), rel=1e-6)
    assert float(trainer.callback_metrics["ntk/kta"]) == pytest.approx(epoch_kta[-1], rel=1e-6)


def test_csv_logger_gets_scalars_and_files(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    model = make_model(flavour, "BNCNN", seed=3)
    train, val = loaders("BNCNN")
    cb = NTKReportCallback(num_probes=16, every_n_epochs=1)
    logger = flavour.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = flavour.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs(logger=logger))
    trainer.fit(model, train, val)

    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    for key in SCALAR_KEYS:
        vals = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        assert [s for s, _ in vals] == [0, 5, 10], (key, vals)
        hist_vals = [h["metrics"][key[4:]] for h in cb.history]
        for (_, v), ref in zip(vals, hist_vals):
            assert v == pytest.approx(ref, rel=1e-6) or (math.isinf(v) and math.isinf(ref))
    pngs = glob.glob(os.path.join(logger.log_dir, "**", "*.png"), recursive=True)
    npys = glob.glob(os.path.join(logger.log_dir, "**", "*.npy"), recursive=True)
    assert pngs, f"no PNG under {logger.log_dir}"
    assert npys, f"no .npy under {logger.log_dir}"
    for p in pngs:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", p
    # one of the .npy files is a probe kernel: (16, 16), symmetric PSD, lambda_max as logged
    kernels = [np.load(p) for p in npys]
    square = [k for k in kernels if k.shape == (16, 16)]
    assert square, [k.shape for k in kernels]
    lmax_logged = {h["metrics"]["lambda_max"] for h in cb.history}
    for k in square:
        lmax = float(np.linalg.eigvalsh((k + k.T) / 2)[-1])
        assert any(abs(lmax - v) <= 1e-4 * v for v in lmax_logged), (lmax, lmax_logged)


def test_console_report_once_per_evaluation(flavour: Flavour, tmp_path: Any, capsys: Any) -> None:
    from ntk_callback import NTKReportCallback

    model = make_model(flavour, "BNCNN", seed=4)
    train, val = loaders("BNCNN")
    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    logger = flavour.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = flavour.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs(logger=logger))
    capsys.readouterr()
    trainer.fit(model, train, val)
    out = capsys.readouterr().out
    assert len(cb.history) == 3
    # NTKReport.format() once per report (its header line), with that report's KTA
    assert out.count("NTK report") == 3, out[-3000:]
    for h in cb.history:
        assert f"KTA {h['metrics']['kta']:.4f}" in out, (h["metrics"]["kta"], out[-2000:])


def test_other_logger_gets_scalars_and_one_warning(flavour: Flavour, tmp_path: Any) -> None:
    """A logger without a known media API (a user's own ``Logger`` subclass) receives the
    ``ntk/`` scalars at the report steps, and the callback warns once (not per report)."""
    import warnings

    from ntk_callback import NTKReportCallback

    class RecordingLogger(flavour.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.calls: List[Tuple[Dict[str, float], Optional[int]]] = []

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
            self.calls.append((dict(metrics), step))

    model = make_model(flavour, "Regressor", seed=0)
    train, _ = loaders("Regressor")
    rec_logger = RecordingLogger()
    cb = NTKReportCallback(num_probes=10, every_n_epochs=1)
    trainer = flavour.Trainer(max_epochs=3, callbacks=[cb], **quiet_trainer_kwargs(logger=rec_logger))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(model, train)
    ntk_calls = [(m, s) for m, s in rec_logger.calls if any(k.startswith("ntk/") for k in m)]
    assert [s for _, s in ntk_calls] == [0, 5, 10, 15]
    for m, _ in ntk_calls:
        assert set(SCALAR_KEYS) <= set(m), sorted(m)
        assert all(isinstance(v, float) for k, v in m.items() if k.startswith("ntk/"))
    about_logger = [str(w.message) for w in rec if "RecordingLogger" in str(w.message)]
    assert len(about_logger) == 1, about_logger


def test_max_steps_mid_epoch_gets_a_final_report(flavour: Flavour, tmp_path: Any) -> None:
    """Training stopped by ``max_steps`` in the middle of epoch 1: the weights at the end
    (step 7) are reported once, on top of the initial and the epoch-0 reports."""
    from ntk_callback import NTKReportCallback

    model = make_model(flavour, "Regressor", seed=0)
    train, _ = loaders("Regressor")
    cb = NTKReportCallback(num_probes=10, every_n_epochs=1)
    snaps = snapshot_callback(flavour.Callback)
    logger = flavour.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = flavour.Trainer(max_steps=7, callbacks=[cb, snaps], **quiet_trainer_kwargs(logger=logger))
    trainer.fit(model, train)
    assert trainer.global_step == 7
    assert [h["step"] for h in cb.history] == [0, 5, 7]
    assert [s for s, _ in TBContent(logger.log_dir).series("ntk/lambda_max")] == [0, 5, 7]
    px, py = cb.probes
    K = reference_kernel(model.net, snaps.states[7], px, py)
    assert_close(cb.history[-1]["metrics"]["lambda_max"], metrics(K, py.numpy())["lambda_max"], what="lambda_max")


def test_double_precision_trainer_matches_reference_to_1e9(flavour: Flavour, tmp_path: Any) -> None:
    """``precision="64-true"``: model and probes in float64, so the callback's numbers
    (its float64 history, not the float32 TensorBoard copy) agree with the independent
    float64 computation to round-off: 1e-9 relative, on every report and every metric."""
    from ntk_callback import NTKReportCallback

    model = make_model(flavour, "Regressor", seed=3)
    init_state = {k: v.clone().double() for k, v in model.state_dict().items()}
    train, _ = loaders("Regressor")
    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    snaps = snapshot_callback(flavour.Callback)
    trainer = flavour.Trainer(
        max_epochs=2, callbacks=[cb, snaps], **quiet_trainer_kwargs(precision="64-true")
    )
    trainer.fit(model, train)
    assert next(model.parameters()).dtype == torch.float64
    px, py = cb.probes
    K0 = reference_kernel(model.net, init_state, px, py)
    assert [h["step"] for h in cb.history] == [0, 5, 10]
    for h in cb.history:
        ref = metrics(reference_kernel(model.net, snaps.states[h["step"]], px, py), py.numpy(), K0)
        for name, value in ref.items():
            if name == "condition_number":
                continue  # 1/lambda_min amplifies round-off; lambda_min itself is checked
            assert_close(h["metrics"][name], value, rel=1e-9, abs_=1e-12, what=f"{name} @ {h['step']}")
