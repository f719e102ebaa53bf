"""The GPU benchmarks' code paths, run on the CPU: ``bench_ntk.py --device cpu --smoke``
goes through the same device-generic timing (``synchronize`` a no-op), peak and float64
check as ``--device cuda``; the image-model mode of ``bench_callback_overhead.py`` fits a
small CNN with and without the callback; ``gpu_check.sh`` parses. What needs a GPU (the
CUDA numbers themselves) runs only in ``benchmarks/gpu_check.sh`` on a lent GPU.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_device as BD  # noqa: E402
import resnet18  # noqa: E402
import route_preview as RP  # noqa: E402

from ntk_callback.engine.device import cuda_profile  # noqa: E402


def test_device_smoke_run_end_to_end(tmp_path: Path) -> None:
    out, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_ntk.py"), "--device", "cpu",
                           "--smoke", "--output", str(out), "--json", str(js)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(js.read_text())
    assert data["device"] == "cpu" and data["default_budget_gib"] == 1.0
    rows = data["rows"]
    methods = {(r["mode"], r["method"]) for r in rows}
    assert methods == {("target", "floor_G"), ("target", "vmap_jacrev"), ("target", "vmap_grad"),
                       ("target", "ours"),
                       ("target", "ours_1GiB"), ("trace", "floor_trace"),
                       ("trace", "vmap_jacrev"), ("trace", "ours"), ("trace", "ours_1GiB")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and len(r["times"]) >= 1
        if not r["method"].startswith("floor"):
            assert r["err"] <= 1e-5, r     # float32 kernels against the float64 loop
    md = out.read_text()
    assert "| config | N | mode | floor | B vmap(jacrev) | vmap(grad) | ours | ours @1 GiB |" in md
    assert md.count("| mlp_small | 8 |") == 2
    assert "do not edit by hand" in md


def test_timed_synchronises_repeats_and_stops() -> None:
    cpu = torch.device("cpu")
    res = BD.timed(lambda: time.sleep(0.01) or 7, cpu, repeats=3, max_seconds=5.0)
    assert res["status"] == "ok" and res["result"] == 7 and len(res["times"]) == 3
    assert 0.009 <= res["time_s"] < 1.0
    slow = BD.timed(lambda: time.sleep(0.05), cpu, repeats=3, max_seconds=0.01)
    assert slow["status"] == "ok" and len(slow["times"]) == 1   # the warm-up was the run
    stuck = BD.timed(lambda: time.sleep(5), cpu, repeats=3, max_seconds=0.01, limit=0.2)
    assert stuck["status"] == "timeout"
    boom = BD.timed(lambda: 1 / 0, cpu, repeats=1, max_seconds=1.0)
    assert boom["status"] == "error" and "ZeroDivisionError" in boom["note"]


def test_render_lists_the_planner_routes() -> None:
    torch.manual_seed(0)
    model, x = resnet18.ResNet18().eval(), torch.randn(1, 3, 32, 32)
    profile = cuda_profile(78 << 30)
    cpu_routes = RP.preview(model, x, 256, "target", 1 << 30, BD.CPU)
    dev_routes = RP.preview(model, x, 256, "target", profile.default_budget(), profile)
    run = {"device": "cuda:0", "device_name": "test", "default_budget_gib": 16.0,
           "free_gib": 78.0, "torch": torch.__version__, "argv": ["--device", "cuda"],
           "rows": [], "routes": {"resnet18 N=256 target": {
               "cpu_1GiB": [vars(r) for r in cpu_routes],
               "device": [vars(r) for r in dev_routes]}}}
    md = BD.render(run)
    assert "| layer1.0.conv1 | 1024 | 36 | gram | rows |" in md
    assert "torch.cuda.max_memory_allocated" in md


def test_resnet18_is_torchvision_sized() -> None:
    model = resnet18.ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    names = dict(model.named_modules())
    assert "layer3.0.downsample.0" in names and isinstance(names["maxpool"], torch.nn.Identity)


def test_callback_overhead_image_mode(tmp_path: Path) -> None:
    js = tmp_path / "cb.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_callback_overhead.py"),
                           "--model", "cnn", "--device", "cpu", "--images", "16", "--batch",
                           "16", "--epochs", "1", "--num-probes", "4", "--pairs", "1",
                           "--json", str(js)],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(js.read_text())
    assert data["reports"] == 2           # K0 and the end of the one epoch
    assert 0 < data["hook_share"] < 1 and data["per_report_s"] > 0
    assert data["fit_with_s"] > data["runs"][0]["hook_s"] > 0
    assert data["weights_identical_with_and_without"] is True


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_gpu_check_script_parses() -> None:
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for piece in ("-m cuda", "bench_ntk.py --device cuda", "--model resnet18 --device cuda",
                  "$OUT"):
        assert piece in text
