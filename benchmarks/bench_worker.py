"""One (config, mode, method) measurement, run in a fresh worker process.

The driver (:mod:`bench_ntk`) forks one worker per measurement from a fork server that
has torch preloaded but has computed nothing, so every worker starts from the same small
resident set. The worker loads the shared model/probe file, records its resident-set
high-water mark (``ru_maxrss``) as the baseline, then:

1. for the methods whose cost grows quickly with N, *pilots* on the first 2, 4, ... ``n0`` probes
   (the first is a warm-up) project the time at N (linear in N, up to quadratic for the
   NTK-vector products and nngeometry) and the method is reported as over the limit instead of run when
   the projection exceeds ``max_seconds``;
2. a full-size warm-up run when it is cheap (projected under a quarter of the limit);
3. up to ``repeats`` timed runs, stopping early once their total passes ``max_seconds``
   (at least one); the reported time is their median;
4. peak memory = final ``ru_maxrss`` minus the baseline (the warm-up and pilot run on at
   most the same data, so the peak is the timed runs').

The kernel of the last run is saved for the driver to check against the float64
reference.
"""
from __future__ import annotations

import gc
import math
import resource
import statistics
import time
import traceback
from typing import Any, Callable

import torch

import baselines as B
import bench_configs as C
from ntk_callback import empirical_ntk

# Methods with a pilot run, and the power of N their time grows with.
SCALING = {"per_sample_loop": 1, "vmap_jacrev": 1, "vmap_grad": 1, "ntk_vps": 2,
           "nngeometry_gram": 2, "ours_generic": 1}


def supports(method: str, mode: str) -> bool:
    if method in B.SUPPORTED:
        return mode in B.SUPPORTED[method]
    if method == "floor_trace":
        return mode == "trace"
    return True


def method_fn(method: str, model: torch.nn.Module, mode: str, num_outputs: int,
              dtype: torch.dtype | None = None) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """``fn(x, t)`` computing the method's kernel (floors return None)."""
    if method == "floor_G":
        return lambda x, t: B.floor_target(model, x, t)
    if method == "floor_trace":
        return lambda x, t: B.floor_trace(model, x, num_outputs)
    if method == "ours":
        return lambda x, t: empirical_ntk(model, x, t, mode=mode, dtype=dtype)
    if method == "ours_generic":
        return lambda x, t: empirical_ntk(model, x, t, mode=mode, dtype=dtype,
                                          implementation="generic")
    fn = B.BASELINES[method]
    return lambda x, t: fn(model, x, t, mode)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _load(path: str, config: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    data = torch.load(path, weights_only=True)
    model = C.build_model(config)
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, data["x"], data["t"]


def _pilot(run: Callable[[torch.Tensor, torch.Tensor], tuple[float, Any]], x: torch.Tensor,
           t: torch.Tensor, power: int, n0: int, limit: float) -> float:
    """Projected time at N = len(x) from timed runs on the first 2, 4, 8, ... probes (up
    to ``n0``, or until one takes limit / 20; at least two sizes when N > 2). The growth
    exponent is fitted on the last two pilots and clamped to [1, ``power``], so fixed
    per-call overheads at tiny n do not inflate a quadratic projection; (N / n)^exponent
    then scales the last pilot's time. A first 2-probe run is only a warm-up."""
    n = x.shape[0]
    run(x[:2], t[:2])
    m, prev = 2, None
    while True:
        dt, _ = run(x[:m], t[:m])
        exponent = 1.0
        if prev is not None and prev[1] > 0 and dt > 0:
            fitted = math.log(dt / prev[1]) / math.log(m / prev[0])
            exponent = min(float(power), max(1.0, fitted))
        if dt > limit:                       # over at any growth exponent >= 1
            return dt * (n / m) ** exponent
        enough = prev is not None or m >= n
        if enough and (m >= min(n0, n) or dt > limit / 20):
            return dt * (n / m) ** exponent
        prev = (m, dt)
        m = min(2 * m, max(n0, 4), n)


def measure(task: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement; ``task`` keys: data, config, mode, method, threads, repeats,
    max_seconds, n0, kernel_out (path or None), num_outputs."""
    torch.set_num_threads(task["threads"])
    model, x, t = _load(task["data"], task["config"])
    n = x.shape[0]
    method, mode = task["method"], task["mode"]
    fn = method_fn(method, model, mode, task["num_outputs"])
    # Fault in autograd's code pages before the baseline, so the delta is the method's data.
    B.floor_target(model, x[:1], t[:1])
    gc.collect()
    base = _maxrss_bytes()
    result: dict[str, Any] = {"status": "ok", "repeats": 0}

    def run(xs: torch.Tensor, ts: torch.Tensor) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = fn(xs, ts)
        return time.perf_counter() - t0, out

    limit = task["max_seconds"]
    projected = None
    if method in SCALING and n > 2:
        projected = _pilot(run, x, t, SCALING[method], task["n0"], limit)
        result["projected_s"] = projected
        if projected > limit:
            result["status"] = "over_limit"
            result["peak_bytes"] = _maxrss_bytes() - base
            return result
    if projected is None or projected < limit / 4:
        run(x, t)                               # full-size warm-up
    times: list[float] = []
    kernel = None
    while len(times) < task["repeats"] and (not times or sum(times) < limit):
        dt, kernel = run(x, t)
        times.append(dt)
    result["time_s"] = statistics.median(times)
    result["times"] = times
    result["repeats"] = len(times)
    result["peak_bytes"] = _maxrss_bytes() - base
    if kernel is not None and task.get("kernel_out"):
        torch.save(kernel.detach().cpu(), task["kernel_out"])
    return result


def reference(task: dict[str, Any]) -> dict[str, Any]:
    """Float64 reference kernel (ours with ``dtype=torch.float64``), cross-checked
    against the float64 ``vmap(jacrev)`` baseline on the first ``n_check`` probes
    (all of them where the float64 Jacobian fits ``check_bytes``)."""
    torch.set_num_threads(task["threads"])
    model, x, t = _load(task["data"], task["config"])
    mode = task["mode"]
    ref = empirical_ntk(model, x, t, mode=mode, dtype=torch.float64)
    torch.save(ref, task["kernel_out"])
    meta = C.describe(model, x)
    per_probe = meta["O"] * meta["P"] * 8 * 2
    n_check = int(max(2, min(x.shape[0], task["check_bytes"] // per_probe)))
    model64 = model.double()
    x64 = x[:n_check].double()
    check = B.vmap_jacrev(model64, x64, t[:n_check], mode)
    sub = ref[:n_check, :n_check]
    err = ((check - sub).abs().max() / sub.abs().max()).item()
    return {"status": "ok", "n_check": n_check, "check_rel_err": err}


def entry(task: dict[str, Any], conn: Any) -> None:
    """Process entry point: run the task and send its result dict through ``conn``."""
    try:
        out = reference(task) if task["method"] == "reference" else measure(task)
    except Exception as exc:  # reported in the table, not hidden
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300],
               "traceback": traceback.format_exc()[-2000:]}
    conn.send(out)
    conn.close()


__all__ = ["entry", "measure", "method_fn", "reference", "supports"]
