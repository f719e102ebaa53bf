#!/usr/bin/env bash
# Every GPU check of the project in one go (< 9 minutes on one H100/H200), results in $OUT:
#   1. the tests marked cuda (device profile, ResNet-18 at the default budget: exact, fast,
#      peak within 2x the budget; CUDA float64/float32 references; RNG state untouched);
#   2. the planner's routes for ResNet-18 on this device (routes.txt);
#   3. the side-by-side GPU table (bench_ntk.py --device cuda -> RESULTS_GPU.md / .json);
#   4. the callback's cost in a ResNet-18 fit (callback_overhead.json).
# Each step has its own time limit and the script goes on after a failed step; the exit
# status is that of the tests. Usage, from the repository root, with a venv that has
# a CUDA build of torch:
#   OUT=/tmp/gpu_out PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }

log "start; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ nvidia-smi || true; "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"; } \
    > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" | tail -1

log "1. tests marked cuda"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m cuda \
    tests/test_engine_device.py tests/test_engine_reference.py \
    > "$OUT/pytest_cuda.txt" 2>&1
tests=$?
timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
    "tests/test_engine_side_effects.py::test_cuda_rng_state_unchanged" \
    >> "$OUT/pytest_cuda.txt" 2>&1 || tests=1
tail -3 "$OUT/pytest_cuda.txt"
log "tests exit $tests"

log "2. planner routes"
timeout 60 "$PYTHON" - > "$OUT/routes.txt" 2>&1 <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import torch
import resnet18, route_preview as RP
from ntk_callback.engine.device import CPU, profile_for
torch.manual_seed(0)
model, x = resnet18.ResNet18().eval(), torch.randn(1, 3, 32, 32)
profile = profile_for(torch.device("cuda"))
print(profile)
for n, mode in ((256, "target"), (1024, "target"), (256, "trace")):
    for name, p, budget in (("CPU 1 GiB", CPU, 1 << 30), (profile.name, profile, profile.default_budget())):
        print(f"\n== ResNet-18 N={n} {mode}: {name}, budget {budget / 2**30:.2f} GiB ==")
        print(RP.format_routes(RP.preview(model, x, n, mode, budget, p)))
EOF
tail -1 "$OUT/routes.txt"

log "3. bench_ntk.py --device cuda"
timeout 330 "$PYTHON" benchmarks/bench_ntk.py --device cuda --max-seconds 10 --repeats 5 \
    --output "$OUT/RESULTS_GPU.md" --json "$OUT/RESULTS_GPU.json" > "$OUT/bench_ntk.txt" 2>&1
log "bench exit $?"
tail -4 "$OUT/bench_ntk.txt"

log "4. callback overhead, ResNet-18 fit"
timeout 150 "$PYTHON" benchmarks/bench_callback_overhead.py --model resnet18 --device cuda \
    --pairs 1 --json "$OUT/callback_overhead.json" > "$OUT/callback_overhead.txt" 2>&1
log "overhead exit $?"
tail -2 "$OUT/callback_overhead.txt"
log "done"
exit $tests
