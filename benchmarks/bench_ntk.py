"""Side-by-side empirical-NTK benchmark (DESIGN.md section 5).

Every method runs on the same model, weights and probe batch, single-threaded by default,
each (config, mode, method) in a fresh worker process (forked from a fork server that has
only imported torch) so that its peak memory can be measured; each kernel is checked
against a float64 reference. Results are printed as they come and, for a full run,
written to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_ntk.py            # full run (long; RESULTS.md)
    python benchmarks/bench_ntk.py --quick    # one N per model, < 2 minutes
    python benchmarks/bench_ntk.py --smoke    # seconds; used by the tests

Methods (see ``baselines.py``): the floor G (one batched forward + one ``autograd.grad``
of the summed target logits), in trace mode also the floor 1F+OB (one forward + O
grads), the per-sample ``backward()`` loop, the tutorial's ``vmap(jacrev)`` + einsum,
``vmap(grad)`` per-sample gradients (target mode), the tutorial's NTK-vector products,
nngeometry's ``GramMatrix`` (when installed), and ours (``empirical_ntk``, default
``implementation="auto"``, and ``implementation="generic"``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import baselines as B  # noqa: E402
import bench_configs as C  # noqa: E402
import bench_worker as W  # noqa: E402

METHODS = ("floor_G", "floor_trace", "per_sample_loop", "vmap_jacrev", "vmap_grad",
           "ntk_vps", "nngeometry_gram", "ours", "ours_generic")
LABELS = {
    "floor_G": "floor G (1 fwd + 1 grad)",
    "floor_trace": "floor 1F+OB (1 fwd + O grads)",
    "per_sample_loop": "per-sample backward() loop",
    "vmap_jacrev": "vmap(jacrev) + einsum (tutorial)",
    "vmap_grad": "vmap(grad) per-sample grads",
    "ntk_vps": "NTK-vector products (tutorial)",
    "nngeometry_gram": "nngeometry GramMatrix",
    "ours": "**ours** empirical_ntk (auto)",
    "ours_generic": "ours, implementation='generic'",
}
FULL_PLAN = {"mlp_small": (64, 256, 512), "mlp_wide": (64, 256, 512), "cnn": (64, 256),
             "resnet": (64, 256)}
QUICK_PLAN = {"mlp_small": (256,), "mlp_wide": (64,), "cnn": (64,), "resnet": (64,)}
SMOKE_PLAN = {"mlp_small": (16,)}
# Targets of issue 5.
TARGET_VS_BASELINE = {"target": 1.0, "trace": 0.5}
TRACE_VS_BASELINE_MLP = 0.1
TARGET_VS_G = 2.0
G_CONFIGS = ("cnn", "resnet", "mlp_wide")
MLP_CONFIGS = ("mlp_small", "mlp_wide")
OURS_MEMORY = 1 << 30
ERR_TOL = 1e-4
GiB = float(1 << 30)
MiB = float(1 << 20)


@dataclass
class Row:
    config: str
    n: int
    mode: str
    method: str
    status: str                       # ok / over_limit / skipped_memory / killed / error / not_installed
    time_s: float | None = None
    repeats: int = 0
    peak_bytes: float | None = None
    err: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- estimates

def estimate_bytes(method: str, mode: str, n: int, meta: dict[str, int]) -> float:
    """Rough peak memory of a method in float32 (what decides a skip): the Jacobian
    blocks it materialises plus the activations its vmap/backward holds."""
    s = 4
    p, o, acts = meta["P"], meta["O"], meta["acts"]
    k = 1 if mode == "target" else o
    act = n * acts * s * 3
    if method in ("floor_G", "floor_trace"):
        return act
    if method == "per_sample_loop":
        return n * k * p * s + 4 * p * s
    if method == "vmap_jacrev":       # measured: ~1.05x the Jacobian on the wide MLP
        return 1.1 * n * o * p * s + o * act
    if method == "vmap_grad":
        return 2 * n * p * s + act
    if method == "ntk_vps":
        return min(2 ** 31, 3 * n * n * o * p * s) + act
    if method == "nngeometry_gram":
        return 2 * (n * o) ** 2 * s + n * p * s + o * act
    return min(o * act, 2 ** 30) + 2 ** 30        # ours: bounded by its 1 GiB budget


def mem_available() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return 8 * GiB


def rss_bytes(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


# --------------------------------------------------------------------------- workers

class Runner:
    """Forks one worker per task from a fork server with torch preloaded, and kills a
    worker that runs past ``wall_s`` or whose resident set passes ``rss_cap``."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "torch._dynamo", "ntk_callback", "baselines",
                                         "bench_configs", "bench_worker"])

    def run(self, task: dict[str, Any], wall_s: float, rss_cap: float) -> dict[str, Any]:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=W.entry, args=(task, send), daemon=True)
        start = time.perf_counter()
        proc.start()
        send.close()
        result: dict[str, Any] | None = None
        peak_seen = 0.0
        while result is None:
            if recv.poll(0.1):
                try:
                    result = recv.recv()
                except EOFError:
                    result = {"status": "error", "error": f"worker died (exit {proc.exitcode})"}
                break
            rss = rss_bytes(proc.pid)
            peak_seen = max(peak_seen, rss)
            elapsed = time.perf_counter() - start
            if rss > rss_cap or elapsed > wall_s:
                proc.kill()
                why = (f"resident set {rss / GiB:.1f} GiB > cap {rss_cap / GiB:.1f} GiB"
                       if rss > rss_cap else f"still running after {elapsed:.0f} s")
                result = {"status": "killed", "error": why}
            elif not proc.is_alive() and not recv.poll(0.5):
                result = {"status": "error", "error": f"worker died (exit {proc.exitcode})"}
        proc.join(10)
        recv.close()
        result["rss_sampled_peak"] = peak_seen
        result["wall_s"] = time.perf_counter() - start
        return result


# --------------------------------------------------------------------------- benchmark

def rel_err(kernel: torch.Tensor, ref: torch.Tensor) -> float:
    """max_ij |K - K_ref| / max_ij |K_ref| (normwise; entrywise ratios are ill-posed
    for entries near zero)."""
    return ((kernel.double() - ref).abs().max() / ref.abs().max()).item()


def run_benchmark(args: argparse.Namespace) -> tuple[list[Row], list[dict[str, Any]]]:
    runner = Runner()
    rows: list[Row] = []
    checks: list[dict[str, Any]] = []
    have_nngeometry = B.nngeometry_available()
    with tempfile.TemporaryDirectory(prefix="bench_ntk_") as tmp:
        for config, sizes in args.plan.items():
            for n in sizes:
                model, x, t = C.make_problem(config, n, seed=args.seed)
                meta = C.describe(model, x)
                data = os.path.join(tmp, f"{config}_{n}.pt")
                torch.save({"state_dict": model.state_dict(), "x": x, "t": t}, data)
                print(f"\n== {C.CONFIGS[config].title}, N={n}: P={meta['P']:,} O={meta['O']} ==",
                      flush=True)
                for mode in args.modes:
                    base_task = {"data": data, "config": config, "mode": mode,
                                 "threads": args.threads, "repeats": args.repeats,
                                 "max_seconds": args.max_seconds, "n0": args.n0,
                                 "num_outputs": meta["O"]}
                    ref_path = os.path.join(tmp, f"ref_{config}_{n}_{mode}.pt")
                    ref_res = runner.run(dict(base_task, method="reference", kernel_out=ref_path,
                                              check_bytes=args.check_bytes),
                                         wall_s=20 * args.max_seconds + 120,
                                         rss_cap=args.max_memory)
                    if ref_res["status"] != "ok":
                        raise RuntimeError(f"float64 reference failed for {config} N={n} "
                                           f"{mode}: {ref_res.get('error')}\n"
                                           f"{ref_res.get('traceback', '')}")
                    ref = torch.load(ref_path, weights_only=True)
                    checks.append({"config": config, "n": n, "mode": mode,
                                   "n_check": ref_res["n_check"],
                                   "err": ref_res["check_rel_err"]})
                    print(f"  [{mode}] float64 reference vs float64 vmap(jacrev) on "
                          f"{ref_res['n_check']} probes: rel err {ref_res['check_rel_err']:.1e}",
                          flush=True)
                    for method in args.methods:
                        if not W.supports(method, mode):
                            continue
                        row = measure_one(runner, args, base_task, method, mode, meta, n,
                                          config, ref, tmp, have_nngeometry)
                        rows.append(row)
                        print("  " + console_line(row), flush=True)
    return rows, checks


def measure_one(runner: Runner, args: argparse.Namespace, base_task: dict[str, Any],
                method: str, mode: str, meta: dict[str, int], n: int, config: str,
                ref: torch.Tensor, tmp: str, have_nngeometry: bool) -> Row:
    row = Row(config, n, mode, method, "ok")
    if method == "nngeometry_gram" and not have_nngeometry:
        row.status, row.note = "not_installed", "nngeometry not installed"
        return row
    est = estimate_bytes(method, mode, n, meta)
    row.extra["est_bytes"] = est
    if est > args.max_memory:
        row.status = "skipped_memory"
        row.note = f"needs ~{est / GiB:.0f} GiB > {args.max_memory / GiB:.0f} GiB cap"
        return row
    cap = min(args.max_memory * 1.25, mem_available() - GiB)
    out = os.path.join(tmp, "kernel.pt")
    if os.path.exists(out):
        os.remove(out)
    res = runner.run(dict(base_task, method=method, kernel_out=out),
                     wall_s=3 * args.max_seconds + 60, rss_cap=cap)
    row.status = res["status"]
    row.repeats = res.get("repeats", 0)
    row.time_s = res.get("time_s")
    row.peak_bytes = res.get("peak_bytes")
    row.extra["rss_sampled_peak"] = res.get("rss_sampled_peak")
    row.extra["wall_s"] = res.get("wall_s")
    if res.get("projected_s") is not None:
        row.extra["projected_s"] = res["projected_s"]
    if row.status == "over_limit":
        row.note = f"projected {res['projected_s']:.0f} s > {args.max_seconds:.0f} s limit"
    elif row.status in ("killed", "error"):
        row.note = res.get("error", "")
        if res.get("traceback"):
            row.extra["traceback"] = res["traceback"]
    if row.status == "ok" and os.path.exists(out):
        row.err = rel_err(torch.load(out, weights_only=True), ref)
    return row


# --------------------------------------------------------------------------- reporting

def _group(rows: list[Row]) -> dict[tuple[str, int, str], dict[str, Row]]:
    groups: dict[tuple[str, int, str], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.config, r.n, r.mode), {})[r.method] = r
    return groups


def fastest_baseline(group: dict[str, Row]) -> Row | None:
    done = [r for m, r in group.items() if m in W.BASELINE_METHODS and r.status == "ok"
            and r.time_s is not None]
    return min(done, key=lambda r: r.time_s) if done else None


def slowest_bound(group: dict[str, Row]) -> float | None:
    """Lower bound on the time of baselines that did not finish (projection or limit)."""
    bounds = [r.extra["projected_s"] for m, r in group.items()
              if m in W.BASELINE_METHODS and r.status == "over_limit" and "projected_s" in r.extra]
    return min(bounds) if bounds else None


def _fmt_time(r: Row) -> str:
    if r.status == "ok" and r.time_s is not None:
        return f"{r.time_s:.4g}"
    return {"over_limit": "> limit", "skipped_memory": "skipped (memory)",
            "not_installed": "not installed", "killed": "killed",
            "error": "error"}.get(r.status, r.status)


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}x"


def console_line(r: Row) -> str:
    mem = "-" if r.peak_bytes is None else f"{r.peak_bytes / MiB:.0f} MiB"
    err = "-" if r.err is None else f"{r.err:.1e}"
    note = f"  [{r.note}]" if r.note else ""
    wall = r.extra.get("wall_s")
    wall = "" if wall is None else f"  (worker {wall:.1f} s)"
    return f"{r.method:16s} {_fmt_time(r):>16s} s  peak {mem:>9s}  err {err:>8s}{wall}{note}"


def summarise(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (config, N, mode): ours vs G and vs the fastest baseline, and the targets."""
    out = []
    for (config, n, mode), group in _group(rows).items():
        ours, g = group.get("ours"), group.get("floor_G")
        fb = fastest_baseline(group)
        entry: dict[str, Any] = {"config": config, "n": n, "mode": mode}
        if ours is None or ours.status != "ok":
            entry["ours_status"] = None if ours is None else ours.status
            out.append(entry)
            continue
        entry["ours_s"] = ours.time_s
        entry["ours_peak"] = ours.peak_bytes
        entry["ours_err"] = ours.err
        entry["vs_G"] = ours.time_s / g.time_s if g and g.status == "ok" else None
        entry["fastest"] = fb.method if fb else None
        entry["fastest_s"] = fb.time_s if fb else None
        entry["vs_fastest"] = ours.time_s / fb.time_s if fb else None
        bound = slowest_bound(group)
        if fb is None and bound is not None:
            entry["vs_fastest_upper"] = ours.time_s / bound
        goal = TARGET_VS_BASELINE[mode] if mode in TARGET_VS_BASELINE else None
        if mode == "trace" and config in MLP_CONFIGS:
            goal = TRACE_VS_BASELINE_MLP
        entry["goal_vs_fastest"] = goal
        ratio = entry["vs_fastest"] if entry["vs_fastest"] is not None else entry.get("vs_fastest_upper")
        entry["pass_fastest"] = None if ratio is None or goal is None else ratio <= goal
        if mode == "target" and config in G_CONFIGS and entry["vs_G"] is not None:
            entry["pass_G"] = entry["vs_G"] <= TARGET_VS_G
        entry["pass_memory"] = ours.peak_bytes is not None and ours.peak_bytes <= OURS_MEMORY
        entry["pass_err"] = ours.err is not None and ours.err <= ERR_TOL
        out.append(entry)
    return out


def machine_info(threads: int) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy
    try:
        import nngeometry  # noqa: F401
        from importlib.metadata import version
        nng = version("nngeometry")
    except Exception:
        nng = "not installed"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "threads": str(threads),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.1f} GiB",
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "nngeometry": nng,
            "os": platform.platform(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "loadavg": " ".join(open("/proc/loadavg").read().split()[:3])}


def render_markdown(rows: list[Row], checks: list[dict[str, Any]], args: argparse.Namespace,
                    info: dict[str, str], info_end: dict[str, str], wall: float) -> str:
    summary = summarise(rows)
    lines: list[str] = []
    add = lines.append
    add("# Empirical NTK benchmark: ours beside the baselines")
    add("")
    cmd = " ".join(["python benchmarks/bench_ntk.py", *args.argv])
    add(f"Generated by `{cmd}` on {info['date']} in {wall / 60:.1f} min. "
        "Do not edit by hand; re-run the script.")
    add("")
    add("## Machine and settings")
    add("")
    add(f"- CPU: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; "
        f"**{info['threads']} thread(s)** (`torch.set_num_threads`); {info['os']}")
    add(f"- Load average at start / end: {info['loadavg']} / {info_end['loadavg']} "
        "(the machine is shared; timings are medians to damp the noise)")
    add(f"- python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, "
        f"nngeometry {info['nngeometry']}")
    add(f"- Timing: warm-up, then the median of up to {args.repeats} runs "
        f"(fewer when their total passes the {args.max_seconds:.0f} s per-method limit). "
        f"The baselines and ours-generic first run pilots on 2, 4, ... {args.n0} probes; "
        "when the projection to N (growth exponent fitted on the last two pilots, clamped to "
        "[1, 1] for the Jacobian methods and [1, 2] for the NTK-vector products and "
        f"nngeometry) exceeds {args.max_seconds:.0f} s they are reported as `> limit` with "
        "the projection; a worker still running at 3x the limit + 60 s is killed.")
    add(f"- Memory: each (config, mode, method) runs in a fresh worker process forked from a "
        "fork server that has imported torch and computed nothing. *Peak* = the worker's "
        "`ru_maxrss` at the end minus its `ru_maxrss` after loading the model and probes "
        "(peak resident-set delta; not tracemalloc). A method whose estimated memory "
        f"(Jacobian size N x O x P x 4 bytes and the like) exceeds {args.max_memory / GiB:.0f} GiB "
        "is skipped, and a worker whose resident set passes the cap is killed, so the "
        "machine is never pushed out of memory.")
    add("- Check: every kernel is compared with a float64 reference (ours with "
        "`dtype=torch.float64`), itself cross-checked against the float64 `vmap(jacrev)` "
        "baseline (table below). *err* = max |K - K_ref| / max |K_ref|.")
    add("- Ratios: *vs G* = time / time of the floor G (one batched forward + one "
        "`autograd.grad` of the summed target logits, same in both modes); *vs fastest* = "
        "time / time of the fastest baseline that finished (floors and ours excluded).")
    add("")
    add("## Headline")
    add("")
    add(_headline(summary))
    add("")
    add("| config | N | mode | ours s | vs G | fastest baseline | its s | ours vs fastest "
        "| goal | ours peak MiB | ours err |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in summary:
        if "ours_s" not in e:
            add(f"| {e['config']} | {e['n']} | {e['mode']} | {e.get('ours_status')} | | | | | | | |")
            continue
        vs = _fmt_ratio(e["vs_fastest"])
        if e["vs_fastest"] is None and e.get("vs_fastest_upper") is not None:
            vs = f"< {e['vs_fastest_upper']:.3g}x (none finished)"
        elif e["vs_fastest"] is None:
            vs = "n/a (no baseline ran)"
        goal = f"<= {e['goal_vs_fastest']}x" if e["goal_vs_fastest"] is not None else "-"
        if "pass_G" in e:
            goal += f", <= {TARGET_VS_G:g}x G"
        verdict = _verdict(e)
        fastest_s = "-" if e["fastest_s"] is None else f"{e['fastest_s']:.4g}"
        add(f"| {C.CONFIGS[e['config']].title} | {e['n']} | {e['mode']} | {e['ours_s']:.4g} "
            f"| {_fmt_ratio(e['vs_G'])} | {e['fastest'] or '-'} | "
            f"{fastest_s} | {vs} | {goal} {verdict} | "
            f"{e['ours_peak'] / MiB:.0f} | {e['ours_err']:.1e} |")
    add("")
    add("## Full table")
    add("")
    add("| config | N | mode | method | time s | runs | vs G | vs fastest | peak MiB | err | note |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for (config, n, mode), group in _group(rows).items():
        g = group.get("floor_G")
        fb = fastest_baseline(group)
        for method in METHODS:
            r = group.get(method)
            if r is None:
                continue
            ok = r.status == "ok" and r.time_s is not None
            vs_g = r.time_s / g.time_s if ok and g and g.status == "ok" else None
            vs_fb = r.time_s / fb.time_s if ok and fb else None
            peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / MiB:.0f}"
            err = "-" if r.err is None else f"{r.err:.1e}"
            add(f"| {C.CONFIGS[config].title} | {n} | {mode} | {LABELS[method]} | {_fmt_time(r)} "
                f"| {r.repeats or '-'} | {_fmt_ratio(vs_g)} | {_fmt_ratio(vs_fb)} | {peak} | {err} "
                f"| {r.note} |")
    add("")
    add("## Reference cross-check (float64 ours vs float64 vmap(jacrev))")
    add("")
    add("| config | N | mode | probes compared | rel err |")
    add("|---|---|---|---|---|")
    for c in checks:
        add(f"| {C.CONFIGS[c['config']].title} | {c['n']} | {c['mode']} | {c['n_check']} "
            f"| {c['err']:.1e} |")
    add("")
    add("## Methods")
    add("")
    for method in METHODS:
        add(f"- **{LABELS[method].replace('**', '')}**: {_DESCRIPTIONS[method]}")
    add("")
    return "\n".join(lines)


_DESCRIPTIONS = {
    "floor_G": "one batched forward and one `torch.autograd.grad` of the summed target "
               "logits w.r.t. the trainable parameters: the cost of one training gradient.",
    "floor_trace": "one batched forward and O `autograd.grad` calls (one per output): the "
                   "honest floor of trace mode, which needs every output's cotangent.",
    "per_sample_loop": "per probe: forward; per needed output (the target, or all O): zero "
                       "grads, `backward()`, flatten `.grad` into a row; then rows @ rows^T. "
                       "Memory N x k x P.",
    "vmap_jacrev": "the PyTorch NTK tutorial's `empirical_ntk_jacobian_contraction`: "
                   "`vmap(jacrev(fnet_single))` per-parameter Jacobians (N, O, P_l), computed "
                   "once (x1 = x2), einsum per parameter, summed; target mode selects row t_i. "
                   "Memory N x O x P.",
    "vmap_grad": "target mode only: `vmap(grad)` per-sample gradients of the target logit "
                 "(torch.func per-sample-gradient recipe), then sum_l G_l G_l^T. Memory N x P.",
    "ntk_vps": "the tutorial's `empirical_ntk_ntk_vps` (vjp then jvp per probe pair and "
               "output basis vector; N^2 O of each), outer vmap over row blocks of x1 and "
               "`vmap(chunk_size=...)` inside so it holds about 2 GiB; computes the full "
               "(N, N, O, O) kernel and reduces it.",
    "nngeometry_gram": "nngeometry's `GramMatrix` (hook-based `FMatDense`, full "
                       "(O, N, O, N) Gram), reduced to the mode.",
    "ours": "`ntk_callback.empirical_ntk(model, x, t, mode=mode)` (structured per-layer "
            "rules where they apply, torch.func elsewhere; 1 GiB default memory budget).",
    "ours_generic": "`empirical_ntk(..., implementation='generic')`: our torch.func path "
                    "for every parameter.",
}


def _verdict(e: dict[str, Any]) -> str:
    marks = [e.get("pass_fastest"), e.get("pass_G")]
    marks = [m for m in marks if m is not None]
    if not marks:
        return ""
    return "**met**" if all(marks) else "**MISSED**"


def _headline(summary: list[dict[str, Any]]) -> str:
    done = [e for e in summary if "ours_s" in e]
    if not done:
        return "No measurement of ours finished."
    parts = []
    for mode in ("target", "trace"):
        es = [e for e in done if e["mode"] == mode and e["vs_fastest"] is not None]
        if not es:
            continue
        worst = max(es, key=lambda e: e["vs_fastest"])
        best = min(es, key=lambda e: e["vs_fastest"])
        gs = [e["vs_G"] for e in done if e["mode"] == mode and e["vs_G"] is not None]
        parts.append(f"- **{mode} mode**: ours takes {best['vs_fastest']:.2g}x-"
                     f"{worst['vs_fastest']:.2g}x the time of the fastest baseline "
                     f"(worst: {C.CONFIGS[worst['config']].title}, N={worst['n']}, vs "
                     f"{worst['fastest']}); {min(gs):.2g}x-{max(gs):.2g}x the floor G.")
    peaks = [e["ours_peak"] for e in done if e["ours_peak"] is not None]
    errs = [e["ours_err"] for e in done if e["ours_err"] is not None]
    parts.append(f"- Peak memory of ours: at most {max(peaks) / MiB:.0f} MiB; max rel err vs "
                 f"float64: {max(errs):.1e}.")
    missed = [e for e in done if _verdict(e) == "**MISSED**" or not e["pass_memory"]
              or not e["pass_err"]]
    if missed:
        parts.append("- Targets missed on: " + "; ".join(
            f"{C.CONFIGS[e['config']].title} N={e['n']} {e['mode']}" for e in missed) + ".")
    else:
        parts.append("- Every target of issue 5 that the table can evaluate is met.")
    return "\n".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one N per model, < 2 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny run for the tests (seconds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    ap.add_argument("--repeats", type=int, help="timed runs per method (5; quick 3; smoke 1)")
    ap.add_argument("--max-seconds", type=float,
                    help="per-method time limit (120; quick 3; smoke 20)")
    ap.add_argument("--max-memory-gb", type=float, default=16.0,
                    help="skip methods estimated to need more (GiB, default 16)")
    ap.add_argument("--configs", help=f"comma list of {', '.join(C.CONFIGS)}")
    ap.add_argument("--sizes", help="comma list of N overriding the plan's sizes")
    ap.add_argument("--modes", default="target,trace", help="comma list (target,trace)")
    ap.add_argument("--methods", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--n0", type=int, default=16, help="probes of the pilot run (16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="markdown file (default benchmarks/RESULTS.md for a full "
                                     "run, none for --quick/--smoke)")
    ap.add_argument("--json", help="also dump raw rows as JSON here")
    args = ap.parse_args(argv)
    args.argv = argv
    plan = SMOKE_PLAN if args.smoke else QUICK_PLAN if args.quick else FULL_PLAN
    if args.configs:
        names = args.configs.split(",")
        bad = [c for c in names if c not in C.CONFIGS]
        if bad:
            ap.error(f"unknown config(s) {bad}; choose from {list(C.CONFIGS)}")
        plan = {c: FULL_PLAN[c] for c in names}
    if args.sizes:
        plan = {c: tuple(int(s) for s in args.sizes.split(",")) for c in plan}
    args.plan = plan
    args.modes = args.modes.split(",")
    args.methods = args.methods.split(",") if args.methods else list(METHODS)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    args.repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    args.max_seconds = args.max_seconds or (20.0 if args.smoke else 3.0 if args.quick else 120.0)
    args.max_memory = args.max_memory_gb * GiB
    args.check_bytes = 2 * GiB
    if args.output is None and not (args.quick or args.smoke):
        args.output = str(HERE / "RESULTS.md")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = machine_info(args.threads)
    print(f"bench_ntk: {info['cpu']}, {args.threads} thread(s), torch {info['torch']}, "
          f"limit {args.max_seconds:.0f} s, memory cap {args.max_memory / GiB:.0f} GiB", flush=True)
    start = time.perf_counter()
    rows, checks = run_benchmark(args)
    wall = time.perf_counter() - start
    summary = summarise(rows)
    print("\n" + _headline(summary).replace("**", ""))
    print(f"(total {wall:.0f} s)")
    if args.output:
        text = render_markdown(rows, checks, args, info, machine_info(args.threads), wall)
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"info": info, "rows": [r.__dict__ for r in rows], "checks": checks,
             "summary": summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
