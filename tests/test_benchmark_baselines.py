"""The benchmark's baselines compute the same kernels as ours and as the independent test
reference, and ``benchmarks/bench_ntk.py --smoke`` runs end to end.

The baselines are what the speed table compares against, so a wrong baseline would make
the table meaningless; each is checked in every mode it supports on a tiny conv + eval
BatchNorm + linear model in float64 against :func:`reference.ntk_loop` (an explicit
per-sample ``autograd.grad`` Jacobian, sharing no code with the baselines).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ntk_callback import empirical_ntk
from reference import ntk_loop

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import baselines as B  # noqa: E402
import bench_configs as C  # noqa: E402
import bench_ntk as BN  # noqa: E402
import bench_report as R  # noqa: E402


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                          nn.Conv2d(3, 3, 3, stride=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    gen = torch.Generator().manual_seed(1)
    C._randomise_batchnorm(model, gen)      # non-trivial eval-mode statistics
    model = model.double().eval()
    x = torch.randn(5, 2, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 1, 2, 3])
    return model, x, t


CASES = [(m, mode) for m, modes in B.SUPPORTED.items() for mode in modes]


@pytest.mark.parametrize("method,mode", CASES, ids=[f"{m}-{mo}" for m, mo in CASES])
def test_baseline_matches_reference_and_ours(method: str, mode: str) -> None:
    if method == "nngeometry_gram" and not B.nngeometry_available():
        pytest.skip("nngeometry not installed")
    model, x, t = _tiny()
    ref = ntk_loop(model, x, t, mode=mode)
    got = B.BASELINES[method](model, x, t, mode)
    ours = empirical_ntk(model, x, t, mode=mode)
    assert got.shape == ref.shape == ours.shape
    # nngeometry's conv rule accumulates in float32 internally (~1e-8 in float64).
    tol = 1e-6 if method == "nngeometry_gram" else 1e-11
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= tol * scale, method
    assert (ours - ref).abs().max() <= 1e-11 * scale
    assert all(p.grad is None for p in model.parameters())


def test_ntk_vps_blocking_matches_unblocked() -> None:
    """The row/column blocking that keeps the NTK-vector products inside their memory
    budget gives the same kernel as one block."""
    model, x, t = _tiny()
    one = B.ntk_vps(model, x, t, "full")
    per_elem = 3 * 4 * sum(p.numel() for p in model.parameters()) * 8
    blocked = B.ntk_vps(model, x, t, "full", block_bytes=2 * per_elem)  # 2 pairs a block
    assert torch.allclose(one, blocked, rtol=1e-12, atol=0)


def test_per_sample_loop_restores_existing_grads() -> None:
    model, x, t = _tiny()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    B.per_sample_loop(model, x, t, "trace")
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_unsupported_mode_is_rejected() -> None:
    model, x, t = _tiny()
    with pytest.raises(ValueError, match="vmap_grad supports"):
        B.vmap_grad(model, x, t, "trace")


def test_memory_estimates_skip_what_cannot_fit() -> None:
    """The benchmark must never OOM the machine: the tutorial's vmap(jacrev) on the wide
    MLP at N=512 in trace mode (N*O*P*4 = 38 GB) is skipped at the default 16 GiB cap,
    while ours is always estimated under it."""
    model, x, _ = C.make_problem("mlp_wide", 2)
    meta = C.describe(model, x)
    assert meta["P"] == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    cap = 16 * BN.GiB
    assert BN.estimate_bytes("vmap_jacrev", "trace", 512, meta) > 512 * 10 * meta["P"] * 4 > cap
    assert BN.estimate_bytes("per_sample_loop", "trace", 512, meta) > cap
    assert BN.estimate_bytes("vmap_jacrev", "target", 64, meta) < cap
    for n in (64, 256, 512):
        assert BN.estimate_bytes("ours", "trace", n, meta) < cap


def test_tutorial_cnn_shape() -> None:
    model, x, _ = C.make_problem("cnn", 2)
    assert model(x).shape == (2, 10)
    assert model.fc.in_features == 32 * 26 * 26


def test_summary_verdicts() -> None:
    """Target bookkeeping: ratios, pass/fail per issue-5 goal, and a missing baseline."""
    rows = [R.Row("mlp_wide", 64, "target", "floor_G", "ok", time_s=1.0),
            R.Row("mlp_wide", 64, "target", "vmap_grad", "ok", time_s=4.0),
            R.Row("mlp_wide", 64, "target", "per_sample_loop", "ok", time_s=3.0),
            R.Row("mlp_wide", 64, "target", "ours", "ok", time_s=2.5, peak_bytes=10.0, err=1e-7),
            R.Row("mlp_wide", 64, "trace", "floor_G", "ok", time_s=1.0),
            R.Row("mlp_wide", 64, "trace", "floor_trace", "ok", time_s=10.0),
            R.Row("mlp_wide", 64, "trace", "vmap_jacrev", "skipped_memory"),
            R.Row("mlp_wide", 64, "trace", "ntk_vps", "over_limit", extra={"projected_s": 500.0}),
            R.Row("mlp_wide", 64, "trace", "ours", "ok", time_s=40.0, peak_bytes=2e9, err=1e-7)]
    target, trace = R.summarise(rows)
    assert target["fastest"] == "per_sample_loop" and target["vs_fastest"] == pytest.approx(2.5 / 3)
    assert target["vs_G"] == pytest.approx(2.5)
    assert target["pass_fastest"] is True and target["pass_G"] is False   # 2.5x G > 2x
    assert target["pass_memory"] is True
    assert R.missed_reasons(target) == ["2.5x G > 2x"]
    assert trace["fastest"] is None and trace["vs_fastest_upper"] == pytest.approx(40 / 500)
    assert trace["vs_floor_trace"] == pytest.approx(4.0)
    assert trace["pass_fastest"] is True                                   # 0.08 <= 0.1
    assert trace["pass_memory"] is False                                   # 2e9 B > 1 GiB
    assert R.missed_reasons(trace) == ["peak 1907 MiB > 1 GiB"]


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    md, js = tmp_path / "R.md", tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(BENCH / "bench_ntk.py"), "--smoke",
                           "--output", str(md), "--json", str(js)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(js.read_text())
    rows = data["rows"]
    methods = {(r["mode"], r["method"]) for r in rows}
    for mode in ("target", "trace"):
        assert {(mode, m) for m in ("floor_G", "per_sample_loop", "vmap_jacrev", "ntk_vps",
                                     "ours", "ours_generic")} <= methods
    assert ("target", "vmap_grad") in methods and ("trace", "floor_trace") in methods
    for r in rows:
        if r["method"] == "nngeometry_gram" and not B.nngeometry_available():
            assert r["status"] == "not_installed"
            continue
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["peak_bytes"] is not None
        if not r["method"].startswith("floor"):
            assert r["err"] < 1e-5, r
    assert all(c["err"] < 1e-12 for c in data["checks"])
    text = md.read_text()
    assert "## Headline" in text and "## Full table" in text
    assert "| MLP 2-64-64-3 | 16 | trace | **ours** empirical_ntk (auto) |" in text
    # The saved raw run re-renders to the same markdown.
    again = tmp_path / "again.md"
    assert BN.main(["--render", str(js), "--output", str(again)]) == 0
    assert again.read_text() == text


def test_pilot_projection() -> None:
    """The time projection behind `> limit`: exact for a pure power law, never more
    than linear scaling when fixed overheads dominate, and it stops piloting at once
    when a pilot alone passes the limit."""
    import bench_worker as W

    x, t = torch.zeros(256, 1), torch.zeros(256, dtype=torch.long)
    calls: list[int] = []

    def fake(cost):  # type: ignore[no-untyped-def]
        def run(xs: torch.Tensor, ts: torch.Tensor) -> tuple[float, None]:
            calls.append(xs.shape[0])
            return cost(xs.shape[0]), None
        return run

    quad = W._pilot(fake(lambda m: 1e-3 * m * m), x, t, power=2, n0=16, limit=120.0)
    assert quad == pytest.approx(1e-3 * 256 ** 2)
    assert calls == [2, 2, 4, 8, 16]                      # warm-up, then doubling to n0
    overhead = W._pilot(fake(lambda m: 0.1 + 1e-3 * m), x, t, power=2, n0=16, limit=120.0)
    assert 0.1 + 0.256 <= overhead <= (0.1 + 0.016) * 16 + 1e-12
    calls.clear()
    slow = W._pilot(fake(lambda m: 200.0 * m), x, t, power=2, n0=16, limit=120.0)
    assert slow > 120.0 and calls == [2, 2]
