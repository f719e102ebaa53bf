"""Side-by-side empirical-NTK benchmark on one device (``bench_ntk.py --device cuda``).

The same comparison as the CPU table (floor G, in trace mode 1F+OB; the tutorial's
``vmap(jacrev)`` + einsum and, in target mode, ``vmap(grad)`` per-sample gradients; ours at the default memory budget; ours at the old 1 GiB
default, the "before"), run in one process on ``--device``: every timed run is bracketed
by ``synchronize`` (a no-op on the CPU), the time is the median of up to ``--repeats``
runs after a warm-up, and the peak is ``torch.cuda.max_memory_allocated`` above the
allocation before the call (on the CPU: the growth of the process's resident-set
high-water mark, a lower bound once an earlier row has raised it). Every kernel is
checked on its first ``--check`` probes against a float64 per-sample ``backward()`` loop
on a float64 copy of the model (independent of the engine). A method estimated not to
fit the device's free memory is skipped; one that runs out of memory or past its time
limit is reported as such.

    python benchmarks/bench_ntk.py --device cuda            # the GPU table (~5 min on an H100)
    python benchmarks/bench_ntk.py --device cpu --smoke     # seconds; the tests run this

Writes ``benchmarks/RESULTS_GPU.md`` / ``.json`` for a full CUDA run (``--output`` /
``--json`` elsewhere), with the planner's route per layer for the ResNet-18 rows.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import baselines as B  # noqa: E402
import bench_configs as C  # noqa: E402
import route_preview as RP  # noqa: E402

from ntk_callback import empirical_ntk  # noqa: E402
from ntk_callback.engine.device import CPU, profile_for  # noqa: E402

GiB = 1 << 30
METHODS = ("floor_G", "floor_trace", "vmap_jacrev", "vmap_grad", "ours", "ours_1GiB")
LABELS = {"floor_G": "G", "floor_trace": "1F+OB", "vmap_jacrev": "B vmap(jacrev)",
          "vmap_grad": "vmap(grad)", "ours": "ours", "ours_1GiB": "ours @1 GiB"}
# (config, N, modes): the H200 evidence's rows and the sizes
FULL_PLAN = [("resnet18", 256, ("target", "trace")), ("resnet18", 1024, ("target",)),
             ("mlp_wide", 256, ("target", "trace")), ("mlp_wide", 2048, ("target", "trace")),
             ("mlp_wide", 8192, ("target", "trace")), ("cnn", 256, ("target", "trace")),
             ("resnet", 256, ("target", "trace"))]
SMOKE_PLAN = [("mlp_small", 8, ("target", "trace"))]
# ours at 1 GiB (the old default) only where it ends in seconds (the H200: 6.5 s / 13.7 s
# for ResNet-18 N=256 target / trace); at N=1024 its Gram route would run for minutes
SLOW_BEFORE = {("resnet18", 1024)}


def build(config: str, n: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(eval model, probes, labels) of a ``bench_configs`` config, on the CPU."""
    return C.make_problem(config, n, seed=seed)


# ------------------------------------------------------------------ device-generic timing

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory of what runs inside the ``with``: CUDA allocator bytes above the
    allocation at entry; on the CPU the growth of ``ru_maxrss``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0.0

    def __enter__(self) -> Peak:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.bytes = float(torch.cuda.max_memory_allocated(self.device) - self.base)
        else:
            self.bytes = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimit` inside the block after ``seconds`` (SIGALRM; the engine
    restores the model's state on the way out)."""
    def handler(signum: int, frame: Any) -> None:
        raise TimeLimit(f"still running after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, max_seconds: float,
          limit: float | None = None) -> dict[str, Any]:
    """Warm-up, then up to ``repeats`` synchronised runs (stopping once they pass
    ``max_seconds``; a warm-up past it is the single timed run); the median time, the
    peak of the timed runs and the last result. Past ``limit`` seconds in all (default
    ``3 max_seconds + 30``) the method is stopped and reported as a timeout."""
    out: dict[str, Any] = {"status": "ok"}

    def once() -> tuple[float, Any]:
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        return time.perf_counter() - t0, result

    try:
        with time_limit(limit if limit is not None else 3 * max_seconds + 30):
            with Peak(device) as first:
                warm, result = once()
            times, peak = ([warm], first) if warm > max_seconds else ([], Peak(device))
            if not times:
                with peak:
                    while len(times) < repeats and sum(times) < max_seconds:
                        dt, result = once()
                        times.append(dt)
        out.update(time_s=statistics.median(times), times=times, peak_bytes=peak.bytes,
                   result=result)
    except TimeLimit as exc:
        out.update(status="timeout", note=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        out.update(status="oom", note=str(exc).splitlines()[0][:160])
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return 8.0 * GiB


def method_fn(method: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
              mode: str, outputs: int) -> Callable[[], Any]:
    if method == "floor_G":
        return lambda: B.floor_target(model, x, t)
    if method == "floor_trace":
        return lambda: B.floor_trace(model, x, outputs)
    if method == "vmap_jacrev":
        return lambda: B.vmap_jacrev(model, x, t, mode)
    if method == "vmap_grad":
        return lambda: B.vmap_grad(model, x, t, mode)
    if method == "ours":
        return lambda: empirical_ntk(model, x, t, mode=mode)
    if method == "ours_1GiB":
        return lambda: empirical_ntk(model, x, t, mode=mode, memory_budget=GiB)
    raise ValueError(method)


def reference(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, mode: str,
              m: int) -> torch.Tensor:
    """float64 kernel of the first ``m`` probes by the per-sample ``backward()`` loop on a
    float64 copy of the model."""
    import copy
    model64 = copy.deepcopy(model).double()
    return B.per_sample_loop(model64, x[:m].double(), t[:m], mode)


# ------------------------------------------------------------------ the benchmark

def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    profile = profile_for(device)
    rows: list[dict[str, Any]] = []
    routes: dict[str, Any] = {}
    for config, n, modes in args.plan:
        model, x, t = build(config, n, args.seed)
        meta = C.describe(model, x[:1])
        model, x, t = model.to(device), x.to(device), t.to(device)
        outputs = meta["O"]
        print(f"\n== {config} N={n}: P={meta['P']:,} O={outputs} on {device} ==", flush=True)
        for mode in modes:
            if config == "resnet18":
                ex = torch.randn(1, 3, 32, 32)
                cpu_model = build(config, 1, args.seed)[0]
                routes[f"{config} N={n} {mode}"] = {
                    "cpu_1GiB": [vars(r) for r in RP.preview(cpu_model, ex, n, mode, GiB, CPU)],
                    "device": [vars(r) for r in RP.preview(cpu_model, ex, n, mode,
                                                           profile.default_budget(), profile)]}
            ref = reference(model, x, t, mode, min(n, args.check))
            for method in METHODS:
                if method == ("floor_G" if mode == "trace" else "floor_trace"):
                    continue
                if method == "vmap_grad" and mode != "target":   # per-sample target gradients
                    continue
                if method == "ours_1GiB" and (config, n) in SLOW_BEFORE:
                    continue
                row: dict[str, Any] = {"config": config, "n": n, "mode": mode,
                                       "method": method}
                est = _estimate(method, mode, n, meta)
                if est > 0.8 * free_bytes(device):
                    row.update(status="skipped", note=f"needs ~{est / GiB:.0f} GiB")
                else:
                    res = timed(method_fn(method, model, x, t, mode, outputs), device,
                                args.repeats, args.max_seconds)
                    kernel = res.pop("result", None)
                    row.update(res)
                    if isinstance(kernel, torch.Tensor):
                        m = ref.shape[0]
                        err = (kernel[:m, :m].double() - ref).abs().max() / ref.abs().max()
                        row["err"] = float(err)
                rows.append(row)
                print("  " + _line(row), flush=True)
        del model, x, t
        gc.collect()
    return {"device": str(device), "device_name": profile.name,
            "default_budget_gib": profile.default_budget() / GiB,
            "free_gib": None if profile.free_memory is None else profile.free_memory / GiB,
            "torch": torch.__version__, "python": platform.python_version(),
            "argv": args.argv, "rows": rows, "routes": routes}


def _estimate(method: str, mode: str, n: int, meta: dict[str, int]) -> float:
    """Rough float32 peak of a method: vmap(jacrev) holds the whole Jacobian (every output,
    any mode); the floors and ours (bounded by their budget) about the activations."""
    act = n * meta["acts"] * 4 * 3
    if method == "vmap_jacrev":
        return 1.1 * n * meta["O"] * meta["P"] * 4 + meta["O"] * act
    if method == "vmap_grad":        # per-sample gradients of the target logit
        return 2 * n * meta["P"] * 4 + act
    return act


def _line(row: dict[str, Any]) -> str:
    head = f"[{row['mode']:6s}] {LABELS[row['method']]:15s}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('note', '')}"
    err = f"  err {row['err']:.1e}" if "err" in row else ""
    return (f"{head} {1e3 * row['time_s']:10.1f} ms  peak {row['peak_bytes'] / 2**20:9.0f} MiB"
            f"  ({len(row['times'])} runs){err}")


def render(run_data: dict[str, Any]) -> str:
    """RESULTS_GPU.md from a run's JSON."""
    rows = run_data["rows"]
    cuda = run_data["device"].startswith("cuda")
    peak_kind = "torch.cuda.max_memory_allocated above the call's start" if cuda else \
        "resident-set high-water growth"
    lines = [f"# Empirical NTK on {run_data['device_name']} ({run_data['device']})", "",
             "Generated by `python benchmarks/bench_ntk.py " + " ".join(run_data["argv"]) +
             "`; do not edit by hand.", "",
             f"torch {run_data['torch']}, float32, TF32 off inside the engine; "
             f"default memory budget {run_data['default_budget_gib']:.2f} GiB"
             + (f" ({run_data['free_gib']:.1f} GiB free at start)" if run_data["free_gib"] else "")
             + f". Times: median of synchronised runs after a warm-up; peak: {peak_kind}; "
             "err: max |K - K_ref| / max |K_ref| on the first probes against a float64 "
             "per-sample backward() loop.", "",
             "B = the faster of the tutorial's `vmap(jacrev)` + einsum and, in target mode, "
             "`vmap(grad)` per-sample gradients of the target logit (N x P, the recipe the "
             "H200 table's target rows measured).", "",
             "| config | N | mode | floor | B vmap(jacrev) | vmap(grad) | ours | ours @1 GiB | ours / B | ours / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys: list[tuple[str, int, str]] = []
    for r in rows:
        if (r["config"], r["n"], r["mode"]) not in keys:
            keys.append((r["config"], r["n"], r["mode"]))
    for key in keys:
        by = {r["method"]: r for r in rows if (r["config"], r["n"], r["mode"]) == key}
        floor = by.get("floor_trace" if key[2] == "trace" else "floor_G")

        def cell(r: dict[str, Any] | None) -> str:
            if r is None:
                return "-"
            if r.get("status") != "ok":
                return f"{r.get('status')} ({r.get('note', '')[:40]})"
            err = f", err {r['err']:.0e}" if "err" in r else ""
            return f"{1e3 * r['time_s']:.1f} ms ({r['peak_bytes'] / 2**20:.0f} MiB{err})"

        def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
            ok = a and b and a.get("status") == "ok" and b.get("status") == "ok"
            return f"{a['time_s'] / b['time_s']:.2f}" if ok else "-"  # type: ignore[index]

        label = ("1F+OB " if key[2] == "trace" else "G ") + cell(floor)
        bs = [r for r in (by.get("vmap_jacrev"), by.get("vmap_grad")) if r and r.get("status") == "ok"]
        best = min(bs, key=lambda r: r["time_s"]) if bs else None
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {label} | {cell(by.get('vmap_jacrev'))} "
                     f"| {cell(by.get('vmap_grad'))} | {cell(by.get('ours'))} | {cell(by.get('ours_1GiB'))} "
                     f"| {ratio(by.get('ours'), best)} | {ratio(by.get('ours'), floor)} |")
    for name, plans in run_data.get("routes", {}).items():
        lines += ["", f"Planner routes, {name}: the CPU's flop model at 1 GiB vs this device's "
                  "profile at its default budget (rows MiB = what the rows route holds)", "",
                  "| layer | S | rows MiB | CPU 1 GiB | this device |", "|---|---|---|---|---|"]
        for a, b in zip(plans["cpu_1GiB"], plans["device"]):
            lines.append(f"| {a['layer']} | {a['positions']} | {a['rows_bytes'] / 2**20:.0f} "
                         f"| {a['route']} | {b['route']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", required=True, help="cuda, cuda:1, cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny plan (seconds on the CPU)")
    ap.add_argument("--configs", help="comma list: only these configs of the plan")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="a method's timed runs stop once they pass this (a run 3x over it "
                         "is stopped)")
    ap.add_argument("--check", type=int, default=16, help="probes checked against float64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="markdown (default benchmarks/RESULTS_GPU.md for a "
                                     "full CUDA run)")
    ap.add_argument("--json", help="raw data (default benchmarks/RESULTS_GPU.json likewise)")
    args = ap.parse_args(argv)
    args.argv = argv
    plan = SMOKE_PLAN if args.smoke else FULL_PLAN
    if args.configs:
        plan = [p for p in plan if p[0] in args.configs.split(",")]
    args.plan = plan
    if args.smoke:
        args.repeats, args.max_seconds = 1, min(args.max_seconds, 10.0)
        args.check = min(args.check, 4)
    full_cuda = torch.device(args.device).type == "cuda" and not args.smoke and not args.configs
    if full_cuda:
        args.output = args.output or str(HERE / "RESULTS_GPU.md")
        args.json = args.json or str(HERE / "RESULTS_GPU.json")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_ntk --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    start = time.perf_counter()
    data = run(args)
    data["wall_s"] = time.perf_counter() - start
    print(f"\n(total {data['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    if args.output:
        Path(args.output).write_text(render(data))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
