"""NTKReportCallback under real CPU DDP (gloo, 2 processes) (issue 4).

The fit runs in a subprocess (a hang cannot freeze pytest; ``timeout`` turns a deadlock
into a failure) with ``strategy="ddp"``: Lightning relaunches the script for rank 1, so
each rank builds its OWN training data. The data are made rank-dependent on purpose (as
when each rank reads its own shard): a callback that drew probes locally would then
measure different probes per rank; the callback must use rank 0's, broadcast.

Checked: both ranks end with identical probes (= rank 0's data) and identical report
histories; the TensorBoard directory holds one event file with one value per report
(logged once, by rank 0); the console shows each report once; the logged lambda_max and
KTA match the float64 reference on rank 0's probes and final weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import torch

from callback_reference import TBContent, assert_close, metrics, reference_kernel

_HERE = os.path.dirname(os.path.abspath(__file__))

_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    from torch.utils.data import DataLoader
    from lightning_models import load_flavour, make_model, indexed, regression_data, quiet_trainer_kwargs
    from callback_reference import probes_from_state

    out = sys.argv[1]
    fl = load_flavour({flavour!r})
    from ntk_callback import NTKReportCallback

    class Dump(fl.Callback):
        # runs on every rank after the NTK callback's final report
        def on_train_end(self, trainer, pl_module):
            ntk = [c for c in trainer.callbacks if isinstance(c, NTKReportCallback)][0]
            torch.save(
                dict(probes=probes_from_state(ntk.state_dict()), history=ntk.history,
                     state={{k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                     world_size=trainer.world_size),
                os.path.join(out, f"rank{{trainer.global_rank}}.pt"))

    def main():
        # rank-dependent data: LOCAL_RANK is set by the launcher for rank 1 only
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        x, y = regression_data(n=64, seed=100 + rank)
        torch.save((x, y), os.path.join(out, f"data{{rank}}.pt"))
        model = make_model(fl, "Regressor", seed=0)
        logger = fl.loggers.TensorBoardLogger(os.path.join(out, "logs"), name="", version=0)
        cb = NTKReportCallback(num_probes=16, every_n_epochs=1, seed=0)
        kw = quiet_trainer_kwargs(logger=logger, devices=2, deterministic=False)
        trainer = fl.Trainer(max_epochs=2, strategy="ddp", callbacks=[cb, Dump()], **kw)
        trainer.fit(model, DataLoader(indexed(x, y), batch_size=8, shuffle=True))

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("flavour_name", ["pytorch_lightning"])
def test_ddp_two_cpu_processes_same_probes_logged_once(tmp_path: Any, flavour_name: str) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(_SCRIPT.format(tests_dir=_HERE, flavour=flavour_name))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)  # a clean launch: Lightning picks a free port and spawns rank 1
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,  # a deadlock fails here instead of hanging the suite
        cwd=str(tmp_path),
        env=env,
    )
    wall = time.perf_counter() - t0
    print(f"DDP fit wall time: {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world_size"] == 2
    d0, d1 = torch.load(tmp_path / "data0.pt"), torch.load(tmp_path / "data1.pt")
    assert not torch.equal(d0[0], d1[0]), "the ranks' data should differ in this test"

    # the same probes on both ranks, and they are rank 0's samples
    (p0x, p0y), (p1x, p1y) = r0["probes"], r1["probes"]
    assert torch.equal(p0x, p1x) and torch.equal(p0y, p1y), "ranks measured different probes"
    match = (p0x[:, None, :] == d0[0][None, :, :]).all(-1)
    assert match.any(1).all(), "the probes are not rank 0's training samples"

    # same weights (DDP keeps them in sync) and the same reports on both ranks
    for k in r0["state"]:
        assert torch.allclose(r0["state"][k], r1["state"][k], rtol=1e-6, atol=1e-7), k
    steps = [h["step"] for h in r0["history"]]
    assert steps == [h["step"] for h in r1["history"]] == [0, 4, 8]
    for h0, h1 in zip(r0["history"], r1["history"]):
        assert h0["metrics"]["lambda_max"] == pytest.approx(h1["metrics"]["lambda_max"], rel=1e-5)

    # logged once: one event file, one value per report
    tb = TBContent(str(tmp_path / "logs"))
    assert len(tb.files) == 1, tb.files
    assert [s for s, _ in tb.series("ntk/kta")] == steps
    assert [s for s, _ in tb.series("ntk/lambda_max")] == steps
    # console: one report text per evaluation, not one per rank
    assert proc.stdout.count("NTK report") == len(steps), proc.stdout[-4000:]

    # numbers: the final report against the float64 reference (rank 0's probes, final weights)
    from lightning_models import load_flavour, model_class

    net = model_class(load_flavour(flavour_name), "Regressor")().net
    K = reference_kernel(net, r0["state"], p0x, p0y)
    ref = metrics(K, p0y.numpy())
    assert_close(tb.series("ntk/lambda_max")[-1][1], ref["lambda_max"], what="lambda_max")
    assert_close(tb.series("ntk/kta")[-1][1], ref["kta"], what="kta")
