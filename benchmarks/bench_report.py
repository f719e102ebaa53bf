"""Benchmark bookkeeping: result rows, ratios, the issue-5 targets, and RESULTS.md.

Works on plain data (a "run" dict: settings, machine info, rows, reference checks), so a
saved ``RESULTS.json`` can be re-rendered without re-measuring
(``bench_ntk.py --render RESULTS.json``).
"""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import bench_configs as C

METHODS = ("floor_G", "floor_trace", "per_sample_loop", "vmap_jacrev", "vmap_grad",
           "ntk_vps", "nngeometry_gram", "ours", "ours_nocheck", "ours_generic")
BASELINE_METHODS = ("per_sample_loop", "vmap_jacrev", "vmap_grad", "ntk_vps", "nngeometry_gram")
LABELS = {
    "floor_G": "floor G (1 fwd + 1 grad)",
    "floor_trace": "floor 1F+OB (1 fwd + O grads)",
    "per_sample_loop": "per-sample backward() loop",
    "vmap_jacrev": "vmap(jacrev) + einsum (tutorial)",
    "vmap_grad": "vmap(grad) per-sample grads",
    "ntk_vps": "NTK-vector products (tutorial)",
    "nngeometry_gram": "nngeometry GramMatrix",
    "ours": "**ours** empirical_ntk (auto)",
    "ours_nocheck": "ours (self_check=False)",
    "ours_generic": "ours, implementation='generic'",
}
DESCRIPTIONS = {
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
    "ours_nocheck": "`empirical_ntk(..., self_check=False)`: ours without the engine's "
                    "self-check, to measure its cost (*self-check cost* = ours / this). While "
                    "`empirical_ntk` has no `self_check` keyword the call is the same as "
                    "ours and the row says so.",
    "ours_generic": "`empirical_ntk(..., implementation='generic')`: our torch.func path "
                    "for every parameter.",
}
# Targets of issue 5.
GOAL_VS_FASTEST = {"target": 1.0, "trace": 0.5}
GOAL_TRACE_MLP = 0.1
GOAL_VS_G = 2.0
TRANSFORMER_CONFIGS = C.TRANSFORMERS
G_CONFIGS = ("cnn", "resnet", "mlp_wide", *TRANSFORMER_CONFIGS)
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
    status: str            # ok / over_limit / skipped_memory / killed / error / not_installed
    #                        / unsupported (n/a by construction)
    time_s: float | None = None
    repeats: int = 0
    peak_bytes: float | None = None
    err: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def rows_to_data(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def rows_from_data(data: list[dict[str, Any]]) -> list[Row]:
    return [Row(**d) for d in data]


def group(rows: list[Row]) -> dict[tuple[str, int, str], dict[str, Row]]:
    groups: dict[tuple[str, int, str], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.config, r.n, r.mode), {})[r.method] = r
    return groups


def _ok(r: Row | None) -> bool:
    return r is not None and r.status == "ok" and r.time_s is not None


def fastest_baseline(g: dict[str, Row]) -> Row | None:
    done = [r for m, r in g.items() if m in BASELINE_METHODS and _ok(r)]
    return min(done, key=lambda r: r.time_s) if done else None


def unfinished_bound(g: dict[str, Row]) -> float | None:
    """Lower bound on the time of the baselines that did not finish: the smallest
    projection among those over the limit (None if none has one)."""
    bounds = [r.extra["projected_s"] for m, r in g.items()
              if m in BASELINE_METHODS and r.status == "over_limit" and "projected_s" in r.extra]
    return min(bounds) if bounds else None


def summarise(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (config, N, mode): ours vs G, vs the trace floor, vs the fastest baseline, and a
    pass/fail per issue-5 target (None where the table cannot tell)."""
    out = []
    for (config, n, mode), g in group(rows).items():
        ours, floor, floor_tr = g.get("ours"), g.get("floor_G"), g.get("floor_trace")
        nocheck = g.get("ours_nocheck")
        fb = fastest_baseline(g)
        e: dict[str, Any] = {"config": config, "n": n, "mode": mode}
        if not _ok(ours):
            e["ours_status"] = None if ours is None else ours.status
            out.append(e)
            continue
        e["ours_s"] = ours.time_s
        e["ours_peak"] = ours.peak_bytes
        e["ours_err"] = ours.err
        e["vs_G"] = ours.time_s / floor.time_s if _ok(floor) else None
        e["vs_floor_trace"] = ours.time_s / floor_tr.time_s if _ok(floor_tr) else None
        e["G_s"] = floor.time_s if _ok(floor) else None
        e["nocheck_s"] = nocheck.time_s if _ok(nocheck) else None
        e["self_check_cost"] = ours.time_s / nocheck.time_s if _ok(nocheck) else None
        e["fastest"] = fb.method if fb else None
        e["fastest_s"] = fb.time_s if fb else None
        e["vs_fastest"] = ours.time_s / fb.time_s if fb else None
        bound = unfinished_bound(g)
        if fb is None and bound is not None:
            e["vs_fastest_upper"] = ours.time_s / bound
        goal = GOAL_TRACE_MLP if mode == "trace" and config in MLP_CONFIGS \
            else GOAL_VS_FASTEST.get(mode)
        e["goal_vs_fastest"] = goal
        ratio = e["vs_fastest"] if e["vs_fastest"] is not None else e.get("vs_fastest_upper")
        e["pass_fastest"] = None if ratio is None or goal is None else ratio <= goal
        if mode == "target" and config in G_CONFIGS and e["vs_G"] is not None:
            e["pass_G"] = e["vs_G"] <= GOAL_VS_G
        e["pass_memory"] = ours.peak_bytes is not None and ours.peak_bytes <= OURS_MEMORY
        e["pass_err"] = None if ours.err is None else ours.err <= ERR_TOL
        out.append(e)
    return out


def missed_reasons(e: dict[str, Any]) -> list[str]:
    """The issue-5 targets an entry of :func:`summarise` misses, in words."""
    why = []
    if e.get("pass_fastest") is False:
        ratio = e["vs_fastest"] if e["vs_fastest"] is not None else e.get("vs_fastest_upper")
        why.append(f"{ratio:.2g}x fastest > {e['goal_vs_fastest']:g}x")
    if e.get("pass_G") is False:
        why.append(f"{e['vs_G']:.2g}x G > {GOAL_VS_G:g}x")
    if e.get("pass_memory") is False:
        why.append(f"peak {e['ours_peak'] / MiB:.0f} MiB > 1 GiB")
    if e.get("pass_err") is False and e.get("ours_err") is not None:
        why.append(f"err {e['ours_err']:.1e} > {ERR_TOL:g}")
    return why


def machine_info(threads: int, torch_version: str) -> dict[str, str]:
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
        from importlib.metadata import version
        nng = version("nngeometry")
    except Exception:
        nng = "not installed"
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    return {"engine": _engine_version(),"cpu": cpu, "cores": str(os.cpu_count()), "threads": str(threads),
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.1f} GiB",
            "python": platform.python_version(), "torch": torch_version,
            "numpy": numpy.__version__, "nngeometry": nng, "os": platform.platform(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "loadavg": load}


def _engine_version() -> str:
    """The commit of the measured code, marked dirty when ``ntk_callback`` has local
    changes (what the workers import is the working tree)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "ntk_callback"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    version = (head or "unknown") + (" + local changes to ntk_callback" if dirty else "")
    try:  # the workers import whatever ntk_callback the driver finds (PYTHONPATH first)
        import ntk_callback
        where = os.path.dirname(os.path.dirname(os.path.abspath(ntk_callback.__file__)))
        if os.path.realpath(where) != os.path.realpath(root):
            version += f" (but ntk_callback imported from {where})"
    except Exception:
        pass
    return version


# --------------------------------------------------------------------------- text

def fmt_time(r: Row) -> str:
    if _ok(r):
        return f"{r.time_s:.4g}"
    return {"over_limit": "> limit", "skipped_memory": "skipped (memory)",
            "not_installed": "not installed", "killed": "killed",
            "error": "error", "unsupported": "n/a"}.get(r.status, r.status)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def console_line(r: Row) -> str:
    mem = "-" if r.peak_bytes is None else f"{r.peak_bytes / MiB:.0f} MiB"
    err = "-" if r.err is None else f"{r.err:.1e}"
    note = f"  [{r.note}]" if r.note else ""
    wall = r.extra.get("wall_s")
    wall = "" if wall is None else f"  (worker {wall:.1f} s)"
    return f"{r.method:16s} {fmt_time(r):>16s} s  peak {mem:>9s}  err {err:>8s}{wall}{note}"


def _span(xs: list[float], digits: int = 2) -> str:
    return f"{min(xs):.{digits}g}x-{max(xs):.{digits}g}x" if xs else "-"


def headline(summary: list[dict[str, Any]], self_check_kw: bool | None = None) -> str:
    """The headline bullets. ``self_check_kw``: whether the measured ``empirical_ntk``
    had the ``self_check`` keyword (None: unknown, e.g. an old saved run)."""
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
        line = (f"- **{mode} mode**: ours takes {best['vs_fastest']:.2g}x-"
                f"{worst['vs_fastest']:.2g}x the time of the fastest baseline (worst: "
                f"{C.CONFIGS[worst['config']].title}, N={worst['n']}, vs {worst['fastest']}); "
                f"{_span(gs)} the floor G")
        ft = [e["vs_floor_trace"] for e in done if e["mode"] == mode
              and e.get("vs_floor_trace") is not None]
        if ft:
            line += f", {min(ft):.2g}x-{max(ft):.2g}x the trace floor 1F+OB"
        parts.append(line + ".")
    peaks = [e["ours_peak"] for e in done if e["ours_peak"] is not None]
    errs = [e["ours_err"] for e in done if e["ours_err"] is not None]
    peak = f"at most {max(peaks) / MiB:.0f} MiB" if peaks else "-"
    err = f"{max(errs):.1e}" if errs else "- (no reference)"
    parts.append(f"- Peak memory of ours: {peak}; max rel err vs float64: {err}.")
    costs = [e["self_check_cost"] for e in done if e.get("self_check_cost") is not None]
    if costs:
        worst = max((e for e in done if e.get("self_check_cost") is not None),
                    key=lambda e: e["self_check_cost"])
        line = (f"- Self-check cost (ours / ours with `self_check=False`): {_span(costs, 3)} "
                f"(most: {C.CONFIGS[worst['config']].title}, N={worst['n']}, {worst['mode']})")
        if self_check_kw is False:
            line += ("; `empirical_ntk` had no `self_check` keyword, so both rows are the "
                     "same call and this is timing noise")
        parts.append(line + ".")
    tr = [e for e in done if e["config"] in TRANSFORMER_CONFIGS and e["mode"] == "target"
          and e["vs_G"] is not None]
    if tr:
        parts.append("- Transformers, target mode, ours / G: " + ", ".join(
            f"{e['config']} N={e['n']} {e['vs_G']:.2g}x" for e in tr)
            + f" (target <= {GOAL_VS_G:g}x).")
    missed = [(e, missed_reasons(e)) for e in done]
    missed = [(e, why) for e, why in missed if why]
    met = len(done) - len(missed)
    parts.append(f"- Issue-5 targets met on {met} of {len(done)} (config, N, mode) cells.")
    if missed:
        parts.append("- Missed: " + "; ".join(
            f"{C.CONFIGS[e['config']].title} N={e['n']} {e['mode']} ({', '.join(why)})"
            for e, why in missed) + ".")
    return "\n".join(parts)


def transformer_lines(summary: list[dict[str, Any]]) -> str:
    """Plain-text ours / G (and ours / fastest) for the transformer configs."""
    es = [e for e in summary if e["config"] in TRANSFORMER_CONFIGS]
    if not es:
        return ""
    out = ["Transformers (issue target: ours <= 2x G in target mode):"]
    for e in es:
        if "ours_s" not in e:
            out.append(f"  {e['config']} N={e['n']} {e['mode']}: ours {e.get('ours_status')}")
            continue
        g = "-" if e["vs_G"] is None else f"{e['vs_G']:.2f}x"
        fb = "-" if e["vs_fastest"] is None else f"{e['vs_fastest']:.3g}x {e['fastest']}"
        sc = "-" if e.get("self_check_cost") is None else f"{e['self_check_cost']:.2f}x"
        verdict = {True: "met", False: "MISSED"}.get(e.get("pass_G"), "")
        out.append(f"  {e['config']} N={e['n']} {e['mode']}: ours {e['ours_s']:.4g} s = {g} G "
                   f"{verdict}; vs fastest {fb}; self-check cost {sc}")
    return "\n".join(out)


def render_markdown(run: dict[str, Any]) -> str:
    """RESULTS.md from a run dict: ``settings`` (argv, repeats, max_seconds, n0,
    max_memory_gb), ``info`` / ``info_end`` (:func:`machine_info`), ``wall_s``,
    ``rows`` (:func:`rows_to_data`) and ``checks``."""
    s, info, info_end = run["settings"], run["info"], run["info_end"]
    rows = rows_from_data(run["rows"])
    summary = summarise(rows)
    lines: list[str] = []
    add = lines.append
    cmd = " ".join(["python benchmarks/bench_ntk.py", *s["argv"]])
    add("# Empirical NTK benchmark: ours beside the baselines")
    add("")
    add(f"Generated by `{cmd}` on {info['date']} in {run['wall_s'] / 60:.1f} min "
        "(raw rows in `RESULTS.json`; re-render with `bench_ntk.py --render RESULTS.json`). "
        "Do not edit by hand.")
    add("")
    add("## Machine and settings")
    add("")
    add(f"- CPU: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; "
        f"**{info['threads']} thread(s)** (`torch.set_num_threads`); {info['os']}")
    add(f"- Load average at start / end: {info['loadavg']} / {info_end['loadavg']} "
        "(the machine is shared; timings are medians to damp the noise)")
    add(f"- python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, "
        f"nngeometry {info['nngeometry']}; ntk_callback at commit {info.get('engine', 'unknown')}")
    add(f"- Timing: warm-up, then the median of up to {s['repeats']} runs "
        f"(fewer when their total passes the {s['max_seconds']:.0f} s per-method limit). "
        f"The baselines and ours-generic first run pilots on 2, 4, ... {s['n0']} probes; "
        "when the projection to N (growth exponent fitted on the last two pilots, clamped to "
        "[1, 1] for the Jacobian methods and [1, 2] for the NTK-vector products and "
        f"nngeometry) exceeds {s['max_seconds']:.0f} s they are reported as `> limit` with "
        "the projection; a method without pilots whose warm-up alone passes the limit is "
        "timed by that warm-up (1 run); a worker still running at 3x the limit + 60 s is "
        "killed.")
    add("- Memory: each (config, mode, method) runs in a fresh worker process forked from a "
        "fork server that has imported torch and computed nothing. *Peak* = the worker's "
        "`ru_maxrss` at the end minus its `ru_maxrss` after loading the model and probes "
        "and one 1-probe forward/backward (peak resident-set delta, MiB; not tracemalloc). "
        "A method whose estimated memory (Jacobian N x O x P x 4 bytes and the like) exceeds "
        f"{s['max_memory_gb']:g} GiB is skipped, and a worker whose resident set passes the "
        "cap is killed, so the machine is never pushed out of memory.")
    add("- Check: every kernel is compared with a float64 reference (ours with "
        "`dtype=torch.float64`), itself cross-checked against the float64 `vmap(jacrev)` "
        "baseline (table at the end). *err* = max |K - K_ref| / max |K_ref|.")
    add("- Ratios: *vs G* = time / time of the floor G (one batched forward + one "
        "`autograd.grad` of the summed target logits; the same in both modes); *vs 1F+OB* = "
        "time / the trace floor (one forward + O grads); *vs fastest* = time / time of the "
        "fastest baseline that finished (floors and ours excluded).")
    add("- Issue-5 targets: target mode ours <= 1.0x fastest baseline everywhere and <= 2x G "
        "on the CNN, the ResNet, the wide MLP and the transformers (BERT, ViT, GPT-2); trace "
        "mode ours <= 0.5x fastest baseline everywhere and <= 0.1x on the two MLPs; ours "
        "peak <= 1 GiB everywhere.")
    add("- *Self-check cost* = time of ours / time of ours with `self_check=False` "
        + ("(this engine's `empirical_ntk` has no `self_check` keyword yet: both rows are the "
           "same call)." if s.get("self_check_kw") is False else "(the engine's self-check)."))
    if any(r.config in TRANSFORMER_CONFIGS for r in rows):
        impl = s.get("transformers_impl")
        add("- Transformers: " + ("Hugging Face models from tiny configs "
                                  "(`attn_implementation=\"eager\"`)" if impl == "HF" else
                                  "plain `nn.Module` equivalents (transformers not used)"
                                  if impl == "plain" else "see the titles")
            + ", wrapped to return (N, O) logits; BERT probes are a dict batch "
            "(`input_ids`, `attention_mask` with padding); GPT-2's O is its vocabulary (64). "
            "A method that cannot run on a model shows `n/a` or `error` with the reason.")
    add("")
    add("## Headline")
    add("")
    add(headline(summary, s.get("self_check_kw")))
    add("")
    add("| config | N | mode | ours s | vs G | vs 1F+OB | fastest baseline | its s "
        "| ours vs fastest | self-check cost | ours peak MiB | ours err | issue-5 targets |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in summary:
        title = C.CONFIGS[e["config"]].title
        if "ours_s" not in e:
            add(f"| {title} | {e['n']} | {e['mode']} | {e.get('ours_status')} "
                "| | | | | | | | | |")
            continue
        vs = fmt_ratio(e["vs_fastest"])
        if e["vs_fastest"] is None and e.get("vs_fastest_upper") is not None:
            vs = f"< {e['vs_fastest_upper']:.3g}x (none finished)"
        elif e["vs_fastest"] is None:
            vs = "n/a (no baseline ran)"
        why = missed_reasons(e)
        verdict = "MISSED: " + ", ".join(why) if why else "met"
        fastest_s = "-" if e["fastest_s"] is None else f"{e['fastest_s']:.4g}"
        peak = "-" if e["ours_peak"] is None else f"{e['ours_peak'] / MiB:.0f}"
        err = "-" if e["ours_err"] is None else f"{e['ours_err']:.1e}"
        add(f"| {title} | {e['n']} | {e['mode']} | {e['ours_s']:.4g} | {fmt_ratio(e['vs_G'])} "
            f"| {fmt_ratio(e.get('vs_floor_trace'))} | {e['fastest'] or '-'} | {fastest_s} "
            f"| {vs} | {fmt_ratio(e.get('self_check_cost'))} | {peak} | {err} | {verdict} |")
    add("")
    tr = [e for e in summary if e["config"] in TRANSFORMER_CONFIGS]
    if tr:
        meta = run.get("meta", {})
        add("## Transformers: ours vs the floor G")
        add("")
        add(f"The issue's target: ours <= {GOAL_VS_G:g}x G in target mode on the transformers. "
            "G = one batched forward + one `autograd.grad` of the summed target logits.")
        add("")
        add("| config | P | O | N | mode | ours s | G s | ours / G | ours (no self-check) / G "
            "| ours vs fastest | fastest baseline | <= 2x G (target) |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for e in tr:
            m = meta.get(e["config"], {})
            p_ = f"{m['P']:,}" if "P" in m else "-"
            o_ = m.get("O", "-")
            head = f"| {C.CONFIGS[e['config']].title} | {p_} | {o_} | {e['n']} | {e['mode']} "
            if "ours_s" not in e:
                add(head + f"| {e.get('ours_status')} | | | | | | |")
                continue
            g_s = "-" if e["G_s"] is None else f"{e['G_s']:.4g}"
            nc = (e["nocheck_s"] / e["G_s"] if e["nocheck_s"] is not None and e["G_s"]
                  else None)
            verdict = {True: "met", False: "MISSED"}.get(e.get("pass_G"), "-")
            add(head + f"| {e['ours_s']:.4g} | {g_s} | {fmt_ratio(e['vs_G'])} | {fmt_ratio(nc)} "
                f"| {fmt_ratio(e['vs_fastest'])} | {e['fastest'] or '-'} | {verdict} |")
        add("")
    add("## Full table")
    add("")
    add("| config | N | mode | method | time s | runs | vs G | vs fastest | peak MiB | err "
        "| note |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for (config, n, mode), g in group(rows).items():
        floor, fb = g.get("floor_G"), fastest_baseline(g)
        for method in METHODS:
            r = g.get(method)
            if r is None:
                continue
            vs_g = r.time_s / floor.time_s if _ok(r) and _ok(floor) else None
            vs_fb = r.time_s / fb.time_s if _ok(r) and fb else None
            peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / MiB:.0f}"
            err = "-" if r.err is None else f"{r.err:.1e}"
            add(f"| {C.CONFIGS[config].title} | {n} | {mode} | {LABELS[method]} | {fmt_time(r)} "
                f"| {r.repeats or '-'} | {fmt_ratio(vs_g)} | {fmt_ratio(vs_fb)} | {peak} | {err} "
                f"| {r.note} |")
    add("")
    add("## Reference cross-check (float64 ours vs float64 vmap(jacrev))")
    add("")
    add("The reference is ours in float64 unless that fails (then a float64 per-output, "
        "per-probe `autograd.grad` loop); it is checked against the float64 `vmap(jacrev)` "
        "baseline, or the float64 per-sample `backward()` loop where vmap fails.")
    add("")
    add("| config | N | mode | reference | checked against | probes compared | rel err "
        "| note |")
    add("|---|---|---|---|---|---|---|---|")
    for c in run["checks"]:
        err = "-" if c.get("err") is None else f"{c['err']:.1e}"
        note = c.get("note") or c.get("error") or ""
        add(f"| {C.CONFIGS[c['config']].title} | {c['n']} | {c['mode']} "
            f"| {c.get('ref_by', 'ours' if c.get('err') is not None else 'failed')} "
            f"| {c.get('checker', 'vmap_jacrev' if c.get('err') is not None else '-')} "
            f"| {c['n_check']} | {err} | {note} |")
    add("")
    add("## Methods")
    add("")
    for method in METHODS:
        add(f"- **{LABELS[method].replace('**', '')}**: {DESCRIPTIONS[method]}")
    add("")
    return "\n".join(lines)


__all__ = ["BASELINE_METHODS", "LABELS", "METHODS", "Row", "TRANSFORMER_CONFIGS",
           "console_line", "fastest_baseline", "headline", "machine_info", "missed_reasons",
           "render_markdown", "rows_from_data", "rows_to_data", "summarise",
           "transformer_lines"]
