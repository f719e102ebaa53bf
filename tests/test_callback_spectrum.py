"""The whole-set spectrum of NTKReportCallback (``spectrum_every_n_epochs``), with a real
Trainer and TensorBoard event files read back by TensorBoard's EventAccumulator.

The logged top eigenvalues must equal a dense float64 eigen-decomposition of the
per-sample-loop reference kernel (``tests/reference.py``) over the same examples (the
first ``spectrum_probes`` of the training dataset) at the trained weights; a spectrum
that cannot be computed warns, is skipped, and training finishes. One Lightning flavour
only (the adapter code is flavour-independent; the other flavour is covered elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
    # the "factors" route (what "auto" takes for this small MLP): the exact trace, the
    # kernel's diagonal summed from the factors (float32 events: 1e-6)
    assert stderr == 0.0
    assert abs(trace - float(torch.trace(K))) <= 1e-6 * float(torch.trace(K))
    assert abs(rec["metrics"]["trace"] - float(torch.trace(K))) <= 1e-9 * float(torch.trace(K))
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


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    from torch.utils.data import DataLoader
    from lightning_models import (load_flavour, make_model, indexed, regression_data,
                                  quiet_trainer_kwargs)

    out = sys.argv[1]
    fl = load_flavour("pytorch_lightning")
    from ntk_callback import NTKReportCallback

    class Dump(fl.Callback):
        def on_train_end(self, trainer, pl_module):
            ntk = [c for c in trainer.callbacks if isinstance(c, NTKReportCallback)][0]
            state = {{k: v.detach().clone() for k, v in pl_module.state_dict().items()}}
            torch.save(dict(spectra=ntk.spectra, world_size=trainer.world_size, state=state),
                       os.path.join(out, f"rank{{trainer.global_rank}}.pt"))

    def main():
        x, y = regression_data()  # the same dataset on both ranks (a DistributedSampler shards it)
        model = make_model(fl, "Regressor", seed=0)
        cb = NTKReportCallback(num_probes=8, log_figures=False, console="off",
                               spectrum_every_n_epochs=1, spectrum_k=3, spectrum_probes=40)
        kw = quiet_trainer_kwargs(devices=2, deterministic=False)
        trainer = fl.Trainer(max_epochs=1, strategy="ddp", callbacks=[cb, Dump()], **kw)
        trainer.fit(model, DataLoader(indexed(x, y), batch_size=8, shuffle=True))

    if __name__ == "__main__":
        main()
    """
)


def test_whole_set_spectrum_under_ddp_splits_the_work_and_matches(tmp_path: Any) -> None:
    """Two gloo processes: each computes its share of every product (the process group as
    the communicator); both ranks get the spectrum of the dense float64 reference kernel
    (to float32 accuracy: the model computes in float32 here)."""
    script = tmp_path / "ddp_spectrum.py"
    script.write_text(_DDP_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world_size"] == 2 and len(r0["spectra"]) == len(r1["spectra"]) == 1
    fl = load_flavour("pytorch_lightning")
    model = make_model(fl, "Regressor", seed=0)
    model.load_state_dict(r0["state"])
    x, y = regression_data()
    K = ntk_loop(float64_eval_copy(model), x[:40], y[:40], mode="target")
    exact = torch.linalg.eigvalsh(K).flip(0)[:3]
    for r in (r0, r1):
        got = torch.tensor(r["spectra"][0]["eigenvalues"], dtype=torch.float64)
        # float32 products and Lanczos tolerance 1e-6
        assert float((got - exact).abs().max()) <= 1e-4 * float(exact[0])
