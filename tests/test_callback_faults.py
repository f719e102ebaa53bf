"""Faults, refusals and skipped stages of NTKReportCallback with real Trainers (issue 4).

* A kernel that turns NaN mid-run: a warning naming the cause, that report skipped
  (nothing non-finite logged), training runs to the end; ``strict=True`` raises.
* A module the engine cannot handle / a batch the callback cannot map: warning and
  training continues; ``strict=True`` raises.
* Constructor arguments are validated at construction with messages naming the argument.
* No logger: console report + one warning. ``fast_dev_run``: runs, logs nothing.
* Sanity checking and the validate / test / predict stages are skipped.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, List

import pytest
import torch

from callback_reference import SCALAR_KEYS, TBContent
from lightning_models import (  # noqa: F401  (flavour is a fixture)
    Flavour,
    dict_batch_to_probe,
    flavour,
    image_data,
    loaders,
    logits_of,
    make_model,
    quiet_trainer_kwargs,
)


def _ntk_warnings(record: List[warnings.WarningMessage]) -> List[str]:
    return [str(w.message) for w in record if "NTK" in str(w.message) or "ntk" in str(w.message)]


def _tb_fit(fl: Flavour, tmp_path: Any, kind: str, cb: Any, max_epochs: int = 3, **trainer_kw: Any) -> Any:
    model = make_model(fl, kind, seed=0)
    train, val = loaders(kind)
    logger = fl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = fl.Trainer(
        max_epochs=max_epochs, callbacks=[cb], **quiet_trainer_kwargs(logger=logger, **trainer_kw)
    )
    trainer.fit(model, train, val)
    return trainer, model, TBContent(logger.log_dir)


# ------------------------------------------------------------------- NaN kernel


def test_nan_kernel_warns_skips_report_and_training_finishes(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=16, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer, model, tb = _tb_fit(flavour, tmp_path, "NaNAfterEpoch", cb, max_epochs=3)
    # training itself was healthy and complete
    assert trainer.current_epoch == 3 and trainer.global_step == 15
    assert len(model.train_losses) == 15 and all(math.isfinite(v) for v in model.train_losses)
    # reports before the poison (init, epoch 0) kept; epochs 1 and 2 skipped
    assert [h["step"] for h in cb.history] == [0, 5]
    msgs = _ntk_warnings(rec)
    assert any("nan" in m.lower() or "finite" in m.lower() for m in msgs), msgs
    for key in SCALAR_KEYS:
        series = tb.series(key)
        assert [s for s, _ in series] == [0, 5], (key, series)
    assert all(math.isfinite(v) for _, v in tb.series("ntk/kta"))


def test_nan_kernel_strict_raises(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=16, every_n_epochs=1, strict=True)
    with pytest.raises(Exception, match=r"(?i)nan|finite") as exc:
        _tb_fit(flavour, tmp_path, "NaNAfterEpoch", cb, max_epochs=3)
    assert not isinstance(exc.value, AssertionError)
    assert [h["step"] for h in cb.history] == [0, 5]


# ------------------------------------------------- unsupported modules and batches


def test_unsupported_output_warns_and_training_continues(flavour: Flavour, tmp_path: Any) -> None:
    """A model returning a dict: every report is skipped with a warning that names the
    cause and the fix (``output_fn``); training is untouched. With ``output_fn`` it works."""
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer, model, tb = _tb_fit(flavour, tmp_path, "DictOutputNet", cb, max_epochs=2)
    assert trainer.global_step == 10 and len(model.train_losses) == 10
    assert len(cb.history) == 0
    assert not tb.ntk_tags("scalars")
    msgs = _ntk_warnings(rec)
    assert msgs, "no warning about the skipped reports"
    assert any("dict" in m and "output_fn" in m for m in msgs), msgs

    cb_ok = NTKReportCallback(num_probes=12, every_n_epochs=1, output_fn=logits_of)
    _, _, tb_ok = _tb_fit(flavour, tmp_path / "ok", "DictOutputNet", cb_ok, max_epochs=2)
    assert [h["step"] for h in cb_ok.history] == [0, 5, 10]
    assert [s for s, _ in tb_ok.series("ntk/kta")] == [0, 5, 10]


def test_unsupported_output_strict_raises(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKError, NTKReportCallback

    cb = NTKReportCallback(num_probes=12, every_n_epochs=1, strict=True)
    with pytest.raises(Exception, match="output_fn") as exc:
        _tb_fit(flavour, tmp_path, "DictOutputNet", cb, max_epochs=2)
    err = exc.value
    chain = [err, err.__cause__, err.__context__]
    assert any(isinstance(e, NTKError) for e in chain if e is not None), repr(err)


def test_unmappable_dict_batch_warns_or_refuses_with_batch_to_probe_hint(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer, model, tb = _tb_fit(flavour, tmp_path, "DictBatchNet", cb, max_epochs=2)
    assert trainer.global_step == 2 * len(loaders("DictBatchNet")[0])
    assert len(cb.history) == 0
    msgs = _ntk_warnings(rec)
    assert any("batch_to_probe" in m for m in msgs), msgs

    # the same run with batch_to_probe works (and the probes are the mapped dict fields)
    cb2 = NTKReportCallback(num_probes=12, every_n_epochs=1, batch_to_probe=dict_batch_to_probe)
    trainer2, _, tb2 = _tb_fit(flavour, tmp_path / "ok", "DictBatchNet", cb2, max_epochs=2)
    assert [h["step"] for h in cb2.history] == [0, 5, 10]
    assert len(tb2.series("ntk/kta")) == 3
    # class-balanced draw: the data are 23 / 43 / 6 per class, the probes 4 / 4 / 4
    # (a uniform draw of 12 would give about 4 / 7 / 1)
    assert torch.bincount(cb2.probes[1], minlength=3).tolist() == [4, 4, 4]


def test_out_of_memory_warns_skips_that_report_and_training_continues(
    flavour: Flavour, tmp_path: Any, monkeypatch: Any
) -> None:
    """The engine running out of memory on one report (simulated: the real error type,
    raised by the second kernel computation): a warning that names the cause and the
    fixes, that one report skipped, the next ones made as usual."""
    import ntk_callback.monitor as callback_module  # the monitor makes the engine calls
    from ntk_callback import NTKReportCallback

    calls = {"n": 0}

    def flaky(real: Any) -> Any:
        def engine(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real(*args, **kwargs)

        return engine

    # the monitor computes the kernel with layerwise_ntk (layerwise=True, the default) or empirical_ntk
    for name in ("empirical_ntk", "layerwise_ntk"):
        monkeypatch.setattr(callback_module, name, flaky(getattr(callback_module, name)))
    cb = NTKReportCallback(num_probes=10, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer, model, tb = _tb_fit(flavour, tmp_path, "Regressor", cb, max_epochs=3)
    assert trainer.global_step == 15
    assert [h["step"] for h in cb.history] == [0, 10, 15]
    assert [s for s, _ in tb.series("ntk/kta")] == [0, 10, 15]
    msgs = [m for m in _ntk_warnings(rec) if "memory" in m.lower()]
    assert len(msgs) == 1 and "num_probes" in msgs[0], msgs


# -------------------------------------------------------- constructor validation


@pytest.mark.parametrize(
    "kwargs,argname",
    [
        (dict(num_probes=0), "num_probes"),
        (dict(num_probes=-3), "num_probes"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(mode="bogus"), "mode"),
        (dict(probe_source="x"), "probe_source"),
        (dict(batch_to_probe=42), "batch_to_probe"),
        (dict(probes=(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))), "probes"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, argname: str) -> None:
    from ntk_callback import NTKReportCallback

    with pytest.raises(ValueError, match=argname) as exc:
        NTKReportCallback(**kwargs)
    # a clear message: names the bad value too
    bad = kwargs[argname]
    if isinstance(bad, (int, str)) and not isinstance(bad, bool):
        assert repr(bad) in str(exc.value) or str(bad) in str(exc.value), str(exc.value)


def test_constructor_error_is_also_a_misconfiguration_exception() -> None:
    """Lightning's own callbacks (LearningRateMonitor, DeviceStatsMonitor) raise
    ``MisconfigurationException`` on bad arguments; ours is that and a ValueError."""
    from ntk_callback import NTKReportCallback

    with pytest.raises(ValueError) as exc:
        NTKReportCallback(every_n_epochs=0)
    names = {c.__name__ for c in type(exc.value).__mro__}
    assert "MisconfigurationException" in names, type(exc.value).__mro__


def test_every_argument_is_type_annotated() -> None:
    import inspect

    from ntk_callback import NTKReportCallback

    sig = inspect.signature(NTKReportCallback.__init__)
    missing = [n for n, p in sig.parameters.items() if n != "self" and p.annotation is inspect.Parameter.empty]
    assert not missing, f"arguments without a type annotation (LightningCLI needs them): {missing}"
    for name in ("num_probes", "every_n_epochs", "mode", "probes", "probe_source", "seed", "batch_to_probe", "strict"):
        assert name in sig.parameters, name
    defaults = {n: p.default for n, p in sig.parameters.items()}
    assert defaults["num_probes"] == 64 and defaults["every_n_epochs"] == 1 and defaults["mode"] == "target"
    assert defaults["probe_source"] == "train" and defaults["strict"] is False and defaults["probes"] is None


# ----------------------------------------------------------- loggers and stages


def test_no_logger_reports_to_console_and_warns_once(flavour: Flavour, capsys: Any) -> None:
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    model = make_model(flavour, "BNCNN", seed=0)
    train, val = loaders("BNCNN")
    trainer = flavour.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs(logger=False))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    assert [h["step"] for h in cb.history] == [0, 5, 10]
    no_logger = [m for m in _ntk_warnings(rec) if "logger" in m.lower()]
    assert len(no_logger) == 1, no_logger
    out = capsys.readouterr().out
    assert out.count("NTK report") == 3, out[-3000:]
    for h in cb.history:
        assert f"KTA {h['metrics']['kta']:.4f}" in out, out[-2000:]
    # still monitorable without a logger
    assert "ntk/kta" in trainer.callback_metrics


def test_fast_dev_run_runs_and_logs_nothing(flavour: Flavour, tmp_path: Any) -> None:
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=12, every_n_epochs=1)
    model = make_model(flavour, "BNCNN", seed=0)
    train, val = loaders("BNCNN")
    trainer = flavour.Trainer(
        fast_dev_run=True,
        callbacks=[cb],
        default_root_dir=str(tmp_path),
        **{k: v for k, v in quiet_trainer_kwargs().items() if k != "logger"},
    )
    trainer.fit(model, train, val)
    assert trainer.global_step == 1
    # documented: the callback runs as usual (K0, then the report after the single epoch);
    # Lightning swaps every logger for a no-op DummyLogger, so nothing is written
    assert [h["tag"] for h in cb.history] == ["init", "epoch"]
    assert [h["step"] for h in cb.history] == [0, 1]
    assert all(math.isfinite(h["metrics"]["lambda_max"]) for h in cb.history)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.npy"))
    assert "ntk/kta" in trainer.callback_metrics


def test_sharded_strategies_are_refused_at_setup(flavour: Flavour) -> None:
    """FSDP shards theta across ranks: one rank's kernel would be wrong, so ``setup``
    refuses it with a message naming the strategy and the fix (for both flavours'
    strategy classes; the Trainer is a stub because FSDP needs GPUs)."""
    from types import SimpleNamespace

    from ntk_callback import NTKReportCallback

    import importlib

    fsdp = importlib.import_module(f"{flavour.name}.strategies").FSDPStrategy()
    cb = NTKReportCallback(num_probes=4)
    stub = SimpleNamespace(strategy=fsdp)
    with pytest.raises(Exception, match="FSDP") as exc:
        cb.setup(stub, None, "fit")
    assert "fix" in str(exc.value).lower()
    cb.setup(stub, None, "validate")  # non-fit stages are none of its business


def test_sanity_check_is_skipped(flavour: Flavour, tmp_path: Any) -> None:
    """With sanity checking on, reports are still exactly init + one per epoch, and the
    callback did nothing while ``trainer.sanity_checking``."""
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=12, every_n_epochs=1, probe_source="val")
    trainer, _, tb = _tb_fit(flavour, tmp_path, "BNCNN", cb, max_epochs=2, num_sanity_val_steps=2)
    assert [h["step"] for h in cb.history] == [0, 5, 10]
    assert [h["tag"] for h in cb.history] == ["init", "epoch", "epoch"]
    assert [s for s, _ in tb.series("ntk/kta")] == [0, 5, 10]
    # probes drawn from the validation set (16 samples: indices 80..95 of image_data)
    x, _ = image_data()
    from callback_reference import probes_from_state

    px, _ = probes_from_state(cb.state_dict())
    match = (px.flatten(1)[:, None, :] == x.flatten(1)[None, :, :]).all(-1)
    assert match.any(1).all()
    assert (match.float().argmax(1) >= 80).all(), "probe_source='val' drew training samples"


def test_validate_test_predict_stages_are_skipped(flavour: Flavour, tmp_path: Any, capsys: Any) -> None:
    from ntk_callback import NTKReportCallback

    x, y = image_data()
    cb = NTKReportCallback(probes=(x[:8], y[:8]), every_n_epochs=1)
    model = make_model(flavour, "BNCNN", seed=0)
    _, val = loaders("BNCNN")
    logger = flavour.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = flavour.Trainer(callbacks=[cb], **quiet_trainer_kwargs(logger=logger))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capsys.readouterr()
    trainer.validate(model, val)
    trainer.test(model, val)
    preds = trainer.predict(model, val)
    assert len(preds) == len(val)
    assert cb.history == [] or len(cb.history) == 0
    assert "ntk/kta" not in trainer.callback_metrics
    tags = TBContent(str(tmp_path)).ntk_tags("scalars")
    assert not tags, tags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
