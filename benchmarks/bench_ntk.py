"""Side-by-side empirical-NTK benchmark (README "Speed and memory").

Every method runs on the same model, weights and probe batch, single-threaded by default,
each (config, mode, method) in a fresh worker process (forked from a fork server that has
only imported torch) so that its peak memory can be measured; each kernel is checked
against a float64 reference. Results are printed as they come and, for a full run,
written to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_ntk.py            # full run (long; RESULTS.md)
    python benchmarks/bench_ntk.py --quick    # N=64 per model (~10 min, mostly transformers)
    python benchmarks/bench_ntk.py --smoke    # seconds; used by the tests
    python benchmarks/bench_ntk.py --quick --configs bert,vit,gpt2 \
        --output /tmp/tr.md --json /tmp/tr.json  # a subset, written off the tree
    python benchmarks/bench_ntk.py --device cuda  # the GPU table, in one process
                                                  # (bench_device.py; RESULTS_GPU.md)

Methods (see ``baselines.py``): the floor G (one batched forward + one ``autograd.grad``
of the summed target logits), in trace mode also the floor 1F+OB (one forward + O
grads), the per-sample ``backward()`` loop, the tutorial's ``vmap(jacrev)`` + einsum,
``vmap(grad)`` per-sample gradients (target mode), the tutorial's NTK-vector products,
nngeometry's ``GramMatrix`` (when installed), and ours (``empirical_ntk``, default
``implementation="auto"``; the same with ``self_check=False``, to measure the cost of
the engine's self-check; and ``implementation="generic"``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import baselines as B  # noqa: E402
import bench_configs as C  # noqa: E402
import bench_report as R  # noqa: E402
import bench_worker as W  # noqa: E402
from bench_report import Row  # noqa: E402

GiB = R.GiB
FULL_PLAN = {"mlp_small": (64, 256, 512), "mlp_wide": (64, 256, 512), "cnn": (64, 256),
             "resnet": (64, 256), "mobilenet": (32, 64), "efficientnet": (32, 64),
             "bert": (64,), "vit": (64,), "gpt2": (64,)}
QUICK_PLAN = {c: (32,) if c in ("mobilenet", "efficientnet") else (64,) for c in FULL_PLAN}
SMOKE_PLAN = {"mlp_small": (16,)}
SMOKE_N = 4          # --smoke --configs X: N for a config outside SMOKE_PLAN
# Imported by the fork server when a transformer config runs (so each worker need not).
HF_PRELOAD = ["transformers.models.bert.modeling_bert", "transformers.models.vit.modeling_vit",
              "transformers.models.gpt2.modeling_gpt2"]


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

    def __init__(self, extra_preload: list[str] | None = None) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "torch._dynamo", "ntk_callback", "baselines",
                                         "bench_configs", "bench_worker",
                                         *(extra_preload or [])])

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


def run_benchmark(args: argparse.Namespace
                  ) -> tuple[list[Row], list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Every (config, N, mode, method) of the plan; returns the rows, the reference
    cross-checks and each config's sizes (P, O, activations per probe)."""
    hf = C.use_hf() and any(c in C.TRANSFORMERS for c in args.plan)
    runner = Runner(HF_PRELOAD if hf else None)
    rows: list[Row] = []
    checks: list[dict[str, Any]] = []
    metas: dict[str, dict[str, int]] = {}
    have_nngeometry = B.nngeometry_available()
    with tempfile.TemporaryDirectory(prefix="bench_ntk_") as tmp:
        for config, sizes in args.plan.items():
            for n in sizes:
                model, x, t = C.make_problem(config, n, seed=args.seed)
                meta = C.describe(model, x)
                metas[config] = meta
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
                    check = {"config": config, "n": n, "mode": mode}
                    if ref_res["status"] != "ok":
                        # Time the methods anyway; their err stays empty.
                        check.update(n_check=0, err=None, error=ref_res.get("error", ""))
                        checks.append(check)
                        ref = None
                        print(f"  [{mode}] float64 reference FAILED: {ref_res.get('error')}\n"
                              f"{ref_res.get('traceback', '')}", flush=True)
                    else:
                        ref = torch.load(ref_path, weights_only=True)
                        check.update(n_check=ref_res["n_check"], err=ref_res["check_rel_err"],
                                     ref_by=ref_res["ref_by"], checker=ref_res["checker"])
                        notes = [ref_res.get("ref_note"), ref_res.get("checker_note")]
                        check["note"] = "; ".join(x for x in notes if x)
                        checks.append(check)
                        print(f"  [{mode}] float64 reference ({ref_res['ref_by']}) vs float64 "
                              f"{ref_res['checker']} on {ref_res['n_check']} probes: rel err "
                              f"{ref_res['check_rel_err']:.1e}"
                              + (f"  [{check['note']}]" if check["note"] else ""), flush=True)
                    for method in args.methods:
                        if not W.supports(method, mode):
                            continue
                        row = measure_one(runner, args, base_task, method, mode, meta, n,
                                          config, ref, tmp, have_nngeometry)
                        rows.append(row)
                        print("  " + R.console_line(row), flush=True)
    return rows, checks, metas


def measure_one(runner: Runner, args: argparse.Namespace, base_task: dict[str, Any],
                method: str, mode: str, meta: dict[str, int], n: int, config: str,
                ref: torch.Tensor | None, tmp: str, have_nngeometry: bool) -> Row:
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
    if res.get("warmup_timed"):
        row.extra["warmup_timed"] = True
    if row.status == "over_limit":
        row.note = f"projected {res['projected_s']:.0f} s > {args.max_seconds:.0f} s limit"
    elif row.status in ("killed", "error", "unsupported"):
        row.note = res.get("error", "")
        if res.get("traceback"):
            row.extra["traceback"] = res["traceback"]
    elif res.get("note"):
        row.note = res["note"]
    if row.status == "ok" and ref is not None and os.path.exists(out):
        row.err = rel_err(torch.load(out, weights_only=True), ref)
    return row


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="N=64 of each model, 2 runs, 3 s limit, 4 GiB cap: ~2 minutes "
                           "for the four non-transformers, ~10 for all")
    size.add_argument("--smoke", action="store_true", help="tiny run for the tests (seconds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    ap.add_argument("--repeats", type=int, help="timed runs per method (5; quick 2; smoke 1)")
    ap.add_argument("--max-seconds", type=float,
                    help="per-method time limit (120; quick 3; smoke 20)")
    ap.add_argument("--max-memory-gb", type=float,
                    help="skip methods estimated to need more (GiB; 16, quick 4)")
    ap.add_argument("--configs", help=f"comma list of {', '.join(C.CONFIGS)} (sizes from "
                                      "the --quick / --smoke / full plan)")
    ap.add_argument("--sizes", help="comma list of N overriding the plan's sizes")
    ap.add_argument("--modes", default="target,trace", help="comma list (target,trace)")
    ap.add_argument("--methods", help=f"comma list of {', '.join(R.METHODS)}")
    ap.add_argument("--n0", type=int, default=16, help="probes of the pilot run (16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="markdown file (default benchmarks/RESULTS.md for a full "
                                     "run, none for --quick/--smoke)")
    ap.add_argument("--json", help="raw run data as JSON (default benchmarks/RESULTS.json for a "
                                   "full run, none for --quick/--smoke)")
    ap.add_argument("--render", metavar="JSON",
                    help="only re-render the markdown of a saved run (to --output, default "
                         "the JSON path with .md)")
    args = ap.parse_args(argv)
    args.argv = argv
    plan = SMOKE_PLAN if args.smoke else QUICK_PLAN if args.quick else FULL_PLAN
    if args.configs:
        names = args.configs.split(",")
        bad = [c for c in names if c not in C.CONFIGS]
        if bad:
            ap.error(f"unknown config(s) {bad}; choose from {list(C.CONFIGS)}")
        base = SMOKE_PLAN if args.smoke else QUICK_PLAN if args.quick else FULL_PLAN
        plan = {c: base.get(c, (SMOKE_N,) if args.smoke else FULL_PLAN[c]) for c in names}
    if args.sizes:
        plan = {c: tuple(int(s) for s in args.sizes.split(",")) for c in plan}
    args.plan = plan
    args.modes = args.modes.split(",")
    args.methods = args.methods.split(",") if args.methods else list(R.METHODS)
    bad = [m for m in args.methods if m not in R.METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(R.METHODS)}")
    args.repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    args.max_seconds = args.max_seconds or (20.0 if args.smoke else 3.0 if args.quick else 120.0)
    args.max_memory_gb = args.max_memory_gb or (4.0 if args.quick else 16.0)
    args.max_memory = args.max_memory_gb * GiB
    args.check_bytes = 2 * GiB
    if not (args.quick or args.smoke or args.render):
        args.output = args.output or str(HERE / "RESULTS.md")
        args.json = args.json or str(HERE / "RESULTS.json")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--device" or a.startswith("--device=") for a in argv):
        import bench_device  # one process on one device: synchronised times, CUDA peaks
        return bench_device.main(argv)
    args = parse_args(argv)
    if args.render:
        run = json.loads(Path(args.render).read_text())
        out = args.output or str(Path(args.render).with_suffix(".md"))
        Path(out).write_text(R.render_markdown(run))
        print(f"wrote {out}")
        return 0
    info = R.machine_info(args.threads, torch.__version__)
    print(f"bench_ntk: {info['cpu']}, {args.threads} thread(s), torch {info['torch']}, "
          f"limit {args.max_seconds:.0f} s, memory cap {args.max_memory / GiB:.0f} GiB", flush=True)
    start = time.perf_counter()
    rows, checks, metas = run_benchmark(args)
    run = {"settings": {"argv": argv, "repeats": args.repeats, "max_seconds": args.max_seconds,
                        "n0": args.n0, "max_memory_gb": args.max_memory_gb,
                        "threads": args.threads, "plan": args.plan, "modes": args.modes,
                        "self_check_kw": W.HAS_SELF_CHECK,
                        "transformers_impl": "HF" if C.use_hf() else "plain"},
           "info": info, "info_end": R.machine_info(args.threads, torch.__version__),
           "wall_s": time.perf_counter() - start,
           "rows": R.rows_to_data(rows), "checks": checks, "meta": metas}
    print("\n" + R.headline(R.summarise(rows), W.HAS_SELF_CHECK).replace("**", ""))
    print(R.transformer_lines(R.summarise(rows)))
    print(f"(total {run['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1, default=str))
    if args.output:
        Path(args.output).write_text(R.render_markdown(run))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
