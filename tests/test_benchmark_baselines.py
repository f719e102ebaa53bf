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
                                     "ours", "ours_nocheck", "ours_generic")} <= methods
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


# --------------------------------------------------------------------------- transformers

HF = [False] + ([True] if C.use_hf() else [])
TRANSFORMER_CASES = [(c, hf) for c in C.TRANSFORMERS for hf in HF]
TRANSFORMER_IDS = [f"{c}-{'hf' if hf else 'plain'}" for c, hf in TRANSFORMER_CASES]


class _TargetLogit(nn.Module):
    """f_{t}(x) as a one-output model of the batch (x, t), so that the reference's
    per-sample Jacobian is (N, 1, P) instead of (N, O, P)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: object, t: torch.Tensor) -> torch.Tensor:
        return B.call(self.model, x).gather(1, t[:, None])


@pytest.mark.parametrize("config,hf", TRANSFORMER_CASES, ids=TRANSFORMER_IDS)
def test_transformer_config_shapes(config: str, hf: bool) -> None:
    """~1M parameters, (N, O) logits, the probe batch the docstring promises, and the
    Hugging Face and plain versions of a config the same size."""
    model, x, t = C.make_problem(config, 3, hf=hf)
    cfg = C.CONFIGS[config]
    p = sum(q.numel() for q in model.parameters())
    assert 0.9e6 < p < 1.1e6
    assert B.call(model, x).shape == (3, cfg.num_outputs)
    assert t.dtype == torch.long and int(t.max()) < cfg.num_outputs
    if config == "bert":
        assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (3, 32)
        assert x["attention_mask"].dtype == torch.long
        assert (x["attention_mask"] == 0).any() and bool(x["attention_mask"][0].all())
    elif config == "vit":
        assert x.shape == (3, 3, 32, 64)                       # 4 x 8 patches of 8x8
    else:
        assert x.shape == (3, 32) and x.dtype == torch.long
        head = model.m.lm_head if hf else model.lm_head
        emb = model.m.transformer.wte if hf else model.wte
        assert head.weight is emb.weight                       # tied, counted once
    other = C.make_problem(config, 1, hf=not hf)[0] if len(HF) == 2 else model
    assert sum(q.numel() for q in other.parameters()) == p


@pytest.mark.parametrize("config,hf", TRANSFORMER_CASES, ids=TRANSFORMER_IDS)
def test_transformer_ours_matches_float64_reference(config: str, hf: bool) -> None:
    """Ours on each transformer config (float64, N = 3) against the independent
    per-sample autograd.grad reference: target mode on all three (GPT-2's tied head
    included), trace mode on the two with O = 10 (GPT-2's O = 64 trace needs 64 backward
    passes a probe: too slow for CI; the benchmark cross-checks it against float64
    vmap(jacrev))."""
    model, x, t = C.make_problem(config, 3, hf=hf)
    model = model.double()
    x = B.batch_to(x, torch.float64)
    ours = empirical_ntk(model, x, t, mode="target")
    ref = ntk_loop(_TargetLogit(model), (x, t), mode="target")
    assert ours.shape == ref.shape == (3, 3)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    if config != "gpt2":
        ours = empirical_ntk(model, x, t, mode="trace")
        ref = ntk_loop(model, x, t, mode="trace")
        assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert all(p.grad is None for p in model.parameters())


def test_loop_kernel_matches_reference() -> None:
    """The fallback float64 reference of the benchmark (used when ours fails)."""
    import bench_worker as W

    model, x, t = _tiny()
    for mode in ("target", "trace"):
        ref = ntk_loop(model, x, t, mode=mode)
        assert torch.allclose(W.loop_kernel(model, x, t, mode), ref, rtol=1e-12, atol=0)


def test_baselines_take_dict_batches() -> None:
    """A dict probe batch is passed as keyword arguments (the engine's convention), and
    every baseline that can handle one gives the reference kernel; nngeometry is n/a."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = nn.Embedding(7, 3), nn.Linear(3, 4)

        def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.emb(ids).sum(1) * scale[:, None]))

    model = Two().double().eval()
    x = {"ids": torch.randint(0, 7, (5, 2)), "scale": torch.rand(5, dtype=torch.float64)}
    t = torch.tensor([0, 3, 1, 2, 3])
    for mode in ("target", "trace"):
        ref = ntk_loop(model, x, t, mode=mode)
        for method, modes in B.SUPPORTED.items():
            if mode not in modes:
                continue
            if method == "nngeometry_gram":
                with pytest.raises(B.Unsupported):
                    B.nngeometry_gram(model, x, t, mode)
                continue
            got = B.BASELINES[method](model, x, t, mode)
            assert (got - ref).abs().max() <= 1e-11 * ref.abs().max(), (method, mode)


def test_report_transformer_and_self_check_rows() -> None:
    """ours / G on a transformer is judged against 2x in target mode, the self-check
    cost is ours / ours_nocheck, and a failed reference (no err) or a method marked n/a
    still renders."""
    rows = [R.Row("vit", 64, "target", "floor_G", "ok", time_s=1.0),
            R.Row("vit", 64, "target", "vmap_grad", "ok", time_s=4.0),
            R.Row("vit", 64, "target", "nngeometry_gram", "unsupported", note="dict batch"),
            R.Row("vit", 64, "target", "vmap_jacrev", "error", note="RuntimeError: vmap"),
            R.Row("vit", 64, "target", "ours", "ok", time_s=2.4, peak_bytes=10.0, err=None),
            R.Row("vit", 64, "target", "ours_nocheck", "ok", time_s=2.0, peak_bytes=10.0)]
    (e,) = R.summarise(rows)
    assert e["vs_G"] == pytest.approx(2.4) and e["pass_G"] is False
    assert e["self_check_cost"] == pytest.approx(1.2)
    assert e["fastest"] == "vmap_grad" and e["pass_err"] is None
    assert R.missed_reasons(e) == ["2.4x G > 2x"]
    run = {"settings": {"argv": [], "repeats": 1, "max_seconds": 1.0, "n0": 16,
                        "max_memory_gb": 4.0, "self_check_kw": False,
                        "transformers_impl": "plain"},
           "info": R.machine_info(1, torch.__version__),
           "info_end": R.machine_info(1, torch.__version__), "wall_s": 1.0,
           "rows": R.rows_to_data(rows), "meta": {"vit": {"P": 1021962, "O": 10}},
           "checks": [{"config": "vit", "n": 64, "mode": "target", "n_check": 0, "err": None,
                       "error": "reference failed"}]}
    text = R.render_markdown(run)
    assert "## Transformers: ours vs the floor G" in text
    assert "| 1,021,962 | 10 | 64 | target | 2.4 | 1 | 2.4x | 2x |" in text
    assert "| n/a |" in text and "self-check cost" in text
    assert "ours / G: vit N=64 2.4x" in text
