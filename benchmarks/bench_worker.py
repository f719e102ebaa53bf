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

A non-pilot method whose warm-up alone passes ``max_seconds`` is not run again: the
warm-up is its single timed run (at such lengths the first-call overheads are noise).

The kernel of the last run is saved for the driver to check against the float64
reference.

``ours_nocheck`` is ours with ``self_check=False`` when ``empirical_ntk`` has that
keyword (:data:`HAS_SELF_CHECK`); without it the call is the same as ``ours`` and the
row says so.
"""
from __future__ import annotations

import gc
import inspect
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
HAS_SELF_CHECK = "self_check" in inspect.signature(empirical_ntk).parameters
NO_SELF_CHECK_NOTE = "empirical_ntk has no self_check keyword yet: the same call as ours"


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` cut to its first line and ``limit`` characters (vmap's
    messages run to a paragraph on one line)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


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
    if method == "ours_nocheck":
        kw = {"self_check": False} if HAS_SELF_CHECK else {}
        return lambda x, t: empirical_ntk(model, x, t, mode=mode, dtype=dtype, **kw)
    if method == "ours_generic":
        return lambda x, t: empirical_ntk(model, x, t, mode=mode, dtype=dtype,
                                          implementation="generic")
    fn = B.BASELINES[method]
    return lambda x, t: fn(model, x, t, mode)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _load(path: str, config: str) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    data = torch.load(path, weights_only=True)
    model = C.build_model(config)
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, data["x"], data["t"]


def _pilot(run: Callable[[Any, torch.Tensor], tuple[float, Any]], x: Any,
           t: torch.Tensor, power: int, n0: int, limit: float) -> float:
    """Projected time at N = len(x) from timed runs on the first 2, 4, 8, ... probes (up
    to ``n0``, or until one takes limit / 20; at least two sizes when N > 2). The growth
    exponent is fitted on the last two pilots and clamped to [1, ``power``], so fixed
    per-call overheads at tiny n do not inflate a quadratic projection; (N / n)^exponent
    then scales the last pilot's time. A first 2-probe run is only a warm-up."""
    n = B.batch_len(x)
    run(B.batch_slice(x, slice(0, 2)), t[:2])
    m, prev = 2, None
    while True:
        dt, _ = run(B.batch_slice(x, slice(0, m)), t[:m])
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
    n = B.batch_len(x)
    method, mode = task["method"], task["mode"]
    fn = method_fn(method, model, mode, task["num_outputs"])
    # Fault in autograd's code pages before the baseline, so the delta is the method's data.
    B.floor_target(model, B.batch_slice(x, 0), t[:1])
    gc.collect()
    base = _maxrss_bytes()
    result: dict[str, Any] = {"status": "ok", "repeats": 0}
    if method == "ours_nocheck" and not HAS_SELF_CHECK:
        result["note"] = NO_SELF_CHECK_NOTE

    def run(xs: Any, ts: torch.Tensor) -> tuple[float, Any]:
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
    times: list[float] = []
    kernel = None
    if projected is None or projected < limit / 4:
        dt, kernel = run(x, t)                  # full-size warm-up
        if projected is None and dt > limit:    # too long to repeat: it is the timed run
            times.append(dt)
            result["warmup_timed"] = True
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


def loop_kernel(model: torch.nn.Module, x: Any, t: torch.Tensor, mode: str) -> torch.Tensor:
    """Target / trace kernel by a per-output, per-probe ``autograd.grad`` loop that holds
    one (N, P) block of gradient rows at a time: K = sum_a R_a R_a^T (trace; one block
    of target rows for target). The model is used in the dtype it has. N x O forwards:
    only the fallback reference, when ours cannot compute it."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = B.batch_len(x)
    with torch.no_grad():
        o = B.call(model, B.batch_slice(x, 0)).shape[-1]
    outputs = [None] if mode == "target" else range(o)
    kernel = None
    for a in outputs:
        rows = []
        for i in range(n):
            out = B.call(model, B.batch_slice(x, i)).reshape(-1)
            g = torch.autograd.grad(out[int(t[i]) if a is None else a], params,
                                    allow_unused=True)
            rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                   for gi, p in zip(g, params)]))
        r = torch.stack(rows)
        kernel = r @ r.T if kernel is None else kernel + r @ r.T
    return kernel


def reference(task: dict[str, Any]) -> dict[str, Any]:
    """Float64 reference kernel: ours with ``dtype=torch.float64`` (or, when that fails,
    :func:`loop_kernel` on a float64 model), cross-checked on the first ``n_check``
    probes (all of them where the float64 Jacobian fits ``check_bytes``) against the
    float64 ``vmap(jacrev)`` baseline, or the float64 per-sample ``backward()`` loop
    where vmap fails (e.g. on Hugging Face's attention-mask code)."""
    torch.set_num_threads(task["threads"])
    model, x, t = _load(task["data"], task["config"])
    mode = task["mode"]
    out: dict[str, Any] = {"status": "ok", "ref_by": "ours"}
    meta = C.describe(model, x)
    try:
        ref = empirical_ntk(model, x, t, mode=mode, dtype=torch.float64)
    except Exception as exc:
        out["ref_by"] = "loop"
        out["ref_note"] = "ours float64 failed: " + short_error(exc)
        ref = None
    model64 = model.double()
    x64 = B.batch_to(x, torch.float64)
    if ref is None:
        ref = loop_kernel(model64, x64, t, mode)
    torch.save(ref, task["kernel_out"])
    per_probe = meta["O"] * meta["P"] * 8 * 2
    n_check = int(max(2, min(B.batch_len(x), task["check_bytes"] // per_probe)))
    xc = B.batch_slice(x64, slice(0, n_check))
    try:
        check = B.vmap_jacrev(model64, xc, t[:n_check], mode)
        out["checker"] = "vmap_jacrev"
    except Exception as exc:
        out["checker"] = "per_sample_loop"
        out["checker_note"] = "vmap_jacrev failed: " + short_error(exc)
        check = B.per_sample_loop(model64, xc, t[:n_check], mode)
    sub = ref[:n_check, :n_check]
    out["n_check"] = n_check
    out["check_rel_err"] = ((check - sub).abs().max() / sub.abs().max()).item()
    return out


def entry(task: dict[str, Any], conn: Any) -> None:
    """Process entry point: run the task and send its result dict through ``conn``."""
    try:
        out = reference(task) if task["method"] == "reference" else measure(task)
    except B.Unsupported as exc:  # n/a by construction
        out = {"status": "unsupported", "error": str(exc)[:300]}
    except Exception as exc:  # reported in the table, not hidden
        out = {"status": "error", "error": short_error(exc),
               "traceback": traceback.format_exc()[-2000:]}
    conn.send(out)
    conn.close()


__all__ = ["HAS_SELF_CHECK", "entry", "loop_kernel", "measure", "method_fn", "reference",
           "short_error", "supports"]
