"""NTKMonitor: the Lightning-free core, used from a hand-written training loop.

* With Lightning made unimportable (a meta-path blocker in a fresh process), ``import
  ntk_callback`` works and a plain loop gets K0, reports and the learning-rate sum; the
  kernel equals the float64 per-sample-loop reference of ``tests/reference.py``.
* The runnable README example ``examples/plain_loop.py`` runs with small settings and
  writes the TensorBoard scalars and pictures (read back with EventAccumulator); its
  whole-set top eigenvalue equals a dense eigen-decomposition of the reference kernel.
* ``state_dict`` / ``load_state_dict`` round-trip the history, K0 and the dynamics state.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from callback_reference import TBContent
from reference import float64_eval_copy, ntk_loop
from torch import nn

from ntk_callback import NTKMonitor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NO_LIGHTNING = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric"):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_monitor_works_with_lightning_unimportable(tmp_path: Any) -> None:
    code = _NO_LIGHTNING + textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        try:
            import pytorch_lightning
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not block")
        import ntk_callback
        from ntk_callback import NTKMonitor
        from torch.utils.tensorboard import SummaryWriter
        from tests.reference import float64_eval_copy, ntk_loop

        torch.manual_seed(0)
        x = torch.randn(12, 3); y = torch.sin(x[:, :1])
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        writer = SummaryWriter(sys.argv[1])
        mon = NTKMonitor(model, probes=(x, y), dtype=torch.float64, log_figures=False)
        metrics0, report0 = mon.start(writer=writer)
        ref0 = ntk_loop(float64_eval_copy(model), x, y, mode="target")
        err0 = float((mon.init_kernel - ref0).abs().max() / ref0.abs().max())
        for step in range(1, 4):
            opt.zero_grad(); nn.functional.mse_loss(model(x), y).backward(); opt.step()
            mon.on_optimizer_step(opt)
        metrics, report = mon.report(step=3, epoch=0, writer=writer)
        writer.close()
        ref = ntk_loop(float64_eval_copy(model), x, y, mode="target")
        err = float((mon.last_kernel - ref).abs().max() / ref.abs().max())
        lam = float(torch.linalg.eigvalsh(ref)[-1])
        blocked = ("pytorch_lightning", "lightning")
        assert not any(m.split(".")[0] in blocked for m in sys.modules), "imported"
        print("RESULT", err0, err, metrics["lambda_max"], lam, mon.lr_sum, mon.param_steps,
              "residual_norm" in metrics, len(mon.history))
        """
    )
    proc = _run(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    err0, err, lam_mon, lam_ref, lr_sum, steps, has_dyn, n_hist = line.split()[1:]
    assert float(err0) < 1e-12 and float(err) < 1e-12
    assert abs(float(lam_mon) - float(lam_ref)) <= 1e-10 * float(lam_ref)
    assert float(lr_sum) == pytest.approx(0.3, rel=1e-12) and int(steps) == 3
    assert has_dyn == "True" and int(n_hist) == 2
    tb = TBContent(str(tmp_path))
    assert [s for s, _ in tb.series("ntk/lambda_max")] == [0, 3]
    assert abs(tb.series("ntk/lambda_max")[-1][1] - float(lam_ref)) <= 1e-6 * float(
        lam_ref
    )  # float32 event
    assert "ntk/kernel" in tb.images and "ntk/eigenvalues" in tb.histograms


def test_plain_loop_example_runs_and_logs_the_whole_set_spectrum(tmp_path: Any) -> None:
    code = textwrap.dedent(
        """
        import sys, json, runpy
        ns = runpy.run_path("examples/plain_loop.py", run_name="example")
        out = ns["main"](sys.argv[1:])
        print("RESULT", json.dumps(out))
        """
    )
    proc = _run(
        code,
        "--epochs",
        "2",
        "--examples",
        "96",
        "--num-probes",
        "16",
        "--spectrum-k",
        "3",
        "--logdir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tb = TBContent(str(tmp_path))
    assert len(tb.series("ntk/kta")) == 3  # K0 and two epochs
    assert "ntk/residual_norm" in tb.scalars and "ntk/spectrum_set/lambda_3" in tb.scalars
    assert "ntk/spectrum_set" in tb.images and "ntk/spectrum" in tb.images
    ((step, lam1),) = tb.series("ntk/spectrum_set/lambda_1")
    ((_, lam3),) = tb.series("ntk/spectrum_set/lambda_3")
    ((_, trace),) = tb.series("ntk/spectrum_set/trace")
    assert step == 4  # 96 examples in batches of 64: 2 steps per epoch, 2 epochs
    assert 0 < lam3 <= lam1 and trace > 0  # trace: a Hutchinson estimate here (N = 96 < P = 385)
    assert tb.series("ntk/spectrum_set/seconds")[0][1] > 0


def test_state_dict_round_trip_and_lr_accounting() -> None:
    torch.manual_seed(1)
    x = torch.randn(10, 4)
    y = x[:, :1] ** 2
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.05
    )
    mon = NTKMonitor(model, probes=(x, y), log_figures=False)
    assert mon.report(step=0)[0]["kta"] == mon.history[0]["metrics"]["kta"]
    assert mon.history[0]["tag"] == "init"  # no K0 yet: this report is K0
    mon.setup_dynamics(0)
    for lr in (0.05, 0.02):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        mon.on_optimizer_step(opt)
    assert mon.lr_sum == pytest.approx(0.07, rel=1e-12) and mon.param_steps == 2
    opt.param_groups[1]["lr"] = 0.5  # two lrs: a mixed step, not added to the sum
    with pytest.warns(UserWarning, match="do not all train with one"):
        mon.on_optimizer_step(opt)
    assert mon.lr_sum == pytest.approx(0.07, rel=1e-12) and mon._lr_mixed == 1
    mon.report(step=3, epoch=0)
    state = mon.state_dict()
    other = NTKMonitor(model, log_figures=False)
    other.load_state_dict(state)
    assert other.history == mon.history and torch.equal(other.init_kernel, mon.init_kernel)
    assert other.lr_sum == mon.lr_sum and other.param_steps == 3
    assert torch.equal(other.probes[0], x)
    ref = ntk_loop(float64_eval_copy(model), x, y, mode="target")
    assert (
        float((mon.last_kernel.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    )  # float32 model


def test_bad_settings_name_the_monitor() -> None:
    with pytest.raises(ValueError, match=r"NTKMonitor\(mode='full'\).*'trace' or 'sum'"):
        NTKMonitor(nn.Linear(2, 1), mode="full")
    with pytest.raises(ValueError, match=r"NTKMonitor\(probes=\.\.\.\): expected a pair"):
        NTKMonitor(nn.Linear(2, 1), probes=torch.zeros(3, 2))
