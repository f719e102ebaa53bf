"""Whole-dataset kernels and spectra: time, memory and accuracy at scale.

Each measurement runs in its own fresh process (so that peak RSS is its own) and prints
one JSON line; ``all`` runs them in turn and writes ``benchmarks/RESULTS_SCALE.md``.

* ``spectrum``: ``ntk_spectrum`` of an MLP 20-16-10 (tanh) over N = 60,000 Gaussian
  inputs, trace and target mode, Lanczos in float64 (``--route matfree`` passes through
  the model, ``--route factors`` products on captured factors); exact eigenvalues from the
  parameter-space Gram route in float64 (per-probe Jacobian rows, ``torch.linalg.eigh``;
  a different computation from the Lanczos products); time and peak RSS over the
  process's baseline (data and model included).
* ``cnn``: the PyTorch NTK tutorial's CNN (``bench_configs.TutorialCNN``) on N probes
  (3x32x32), target mode, float32: the dense kernel from a ``DataLoader`` (blocked) vs
  one pass of forward + backward over the same N inputs (batches of 500), peak RSS.
* ``cnn_spectrum``: top-k matrix-free spectrum of the CNN at a small N against the dense
  eigenvalues (float64), time a Lanczos product.
* ``cnn_factors``: top-k spectrum of the CNN at N = 10,000 (k = 100) by the ``"factors"``
  route (``--budget`` bytes for the factors), float64; with ``--eig`` against
  ``eigvalsh`` of the dense float64 kernel.
* ``ddp``: N = 1024 CNN probes, target mode, float64, 1 process vs 2 gloo processes
  (``comm=TorchDistributedComm()``), one thread each: time and the largest relative
  difference of the kernels; the same for a trace-mode spectrum (MLP, N = 20,000).

    nice python benchmarks/bench_scale.py all            # ~30-60 min on 2 shared cores
    nice python benchmarks/bench_scale.py cnn --n 2048   # one measurement
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from ntk_callback import empirical_ntk, ntk_spectrum  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))


def cnn() -> nn.Module:
    from bench_configs import TutorialCNN
    torch.manual_seed(0)
    return TutorialCNN()


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------ measurements
def m_spectrum(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    n, k = args.n, args.k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    model = mlp()
    out: dict = {"n": n, "k": k, "model": "MLP 20-16-10 tanh", "route": args.route,
                 "P": sum(p.numel() for p in model.parameters())}
    modes = args.modes.split(",")
    found = {}
    for mode in modes:  # all Lanczos runs first: the Gram references would raise the peak
        base = current_rss_mib()
        t, c = time.perf_counter(), time.process_time()
        found[mode] = ntk_spectrum(model, x, y, k=k, mode=mode, dtype=torch.float64,
                                   route=args.route)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        # ru_maxrss is the process's peak so far: its rise over the RSS before the call
        # bounds the call's extra memory from above
        out[mode] = {"seconds": elapsed, "cpu_seconds": cpu,
                     "peak_extra_mib": rss_mib() - base}
    for mode in modes:
        t = time.perf_counter()
        exact = ntk_spectrum(model, x, y, k=k, mode=mode, dtype=torch.float64, route="gram")
        vals = found[mode]
        out[mode].update({"gram_seconds": time.perf_counter() - t,
                          "max_rel_err": float(((vals - exact).abs() / exact.abs()).max()),
                          "top": [float(v) for v in vals[:3]]})
        print(json.dumps({mode: out[mode]}), file=sys.stderr, flush=True)
    return out


def forward_backward_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             batch: int = 500) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward pass over x in batches."""
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, x.shape[0], batch):
        loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum")
        loss.backward()
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    model.zero_grad(set_to_none=True)
    return elapsed, cpu


def m_cnn(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from torch.utils.data import DataLoader, TensorDataset
    x, y = images(args.n)
    model = cnn()
    forward_backward_seconds(model, x[:64], y[:64])  # warm-up
    g, g_cpu = forward_backward_seconds(model, x, y)
    base = current_rss_mib()
    loader = DataLoader(TensorDataset(x, y), batch_size=500)
    t, c = time.perf_counter(), time.process_time()
    kernel = empirical_ntk(model, loader, block_size=args.block, progress=args.progress,
                           memory_budget=args.budget)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    kernel_mib = kernel.numel() * kernel.element_size() / 2**20
    peak_extra = rss_mib() - base
    out = {"n": args.n, "block_size": args.block, "budget_mib": args.budget / 2**20,
           "forward_backward_seconds": g, "kernel_seconds": elapsed, "ratio": elapsed / g,
           "forward_backward_cpu_seconds": g_cpu, "kernel_cpu_seconds": cpu,
           "cpu_ratio": cpu / g_cpu,
           "peak_extra_mib": peak_extra, "kernel_mib": kernel_mib,
           "finite": bool(torch.isfinite(kernel).all()),
           "symmetric": bool(torch.equal(kernel, kernel.T))}
    if args.eig:
        t = time.perf_counter()
        ev = torch.linalg.eigvalsh(kernel.double())
        out["dense_eigvalsh_seconds"] = time.perf_counter() - t
        out["lambda_max"] = float(ev[-1])
    return out


def m_cnn_spectrum(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    x, y = images(args.n, seed=1)
    model = cnn()
    t = time.process_time()
    dense = empirical_ntk(model, x, y, dtype=torch.float64)
    t_dense = time.process_time() - t
    exact = torch.linalg.eigvalsh(dense).flip(0)[:args.k]
    from ntk_callback.engine import spectrum as S
    count = {"n": 0}
    original = S._Operator.matvec

    def counted(self, v):  # count the Lanczos products
        count["n"] += 1
        return original(self, v)

    S._Operator.matvec = counted
    t, c = time.perf_counter(), time.process_time()
    vals = ntk_spectrum(model, x, y, k=args.k, mode="target", dtype=torch.float64,
                        route="matfree")
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    g, g_cpu = forward_backward_seconds(model, x, y)
    S._Operator.matvec = original
    err = float(((vals - exact).abs() / exact.abs()).max())
    return {"n": args.n, "k": args.k, "seconds": elapsed, "cpu_seconds": cpu,
            "forward_backward_cpu_seconds": g_cpu, "products": count["n"],
            "seconds_per_product": elapsed / max(1, count["n"]),
            "dense_kernel_cpu_seconds": t_dense,
            "max_rel_err": err, "lambda_max": float(vals[0])}


def _ddp_worker(rank: int, world: int, init: str, n: int, kind: str, path: str) -> None:
    import torch.distributed as dist

    from ntk_callback.engine import TorchDistributedComm
    torch.set_num_threads(1)
    comm = None
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        comm = TorchDistributedComm()
    if kind == "kernel":
        x, y = images(n, seed=2)
        model = cnn().double()
        empirical_ntk(model, x[:16], y[:16])  # warm-up
        if comm is not None:
            dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        result = empirical_ntk(model, x, y, comm=comm)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 20, generator=g, dtype=torch.float64)
        model = mlp().double()
        if comm is not None:
            dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        result = ntk_spectrum(model, x, k=10, mode="trace", route="matfree", comm=comm)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    torch.save({"seconds": elapsed, "cpu_seconds": cpu, "result": result}, f"{path}.{rank}")
    if comm is not None:
        dist.destroy_process_group()


def m_ddp(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        kinds = (("kernel", args.n), ("spectrum", args.spectrum_n))
        for kind, n in [(k, n) for k, n in kinds if k in args.ddp_kinds.split(",")]:
            runs = {}
            for world in (1, 2):
                path = os.path.join(tmp, f"{kind}{world}.pt")
                init = f"file://{os.path.join(tmp, f'rdv_{kind}{world}')}"
                mp.spawn(_ddp_worker, args=(world, init, n, kind, path), nprocs=world, join=True)
                runs[world] = [torch.load(f"{path}.{r}", weights_only=False)
                               for r in range(world)]
            a = runs[1][0]["result"]
            rel = max(float((a - r["result"]).abs().max() / a.abs().max()) for r in runs[2])
            wall2 = max(r["seconds"] for r in runs[2])
            cpu2 = max(r["cpu_seconds"] for r in runs[2])
            out[kind] = {"n": n, "one_process_seconds": runs[1][0]["seconds"],
                         "two_process_seconds": wall2,
                         "speedup": runs[1][0]["seconds"] / wall2,
                         "one_process_cpu_seconds": runs[1][0]["cpu_seconds"],
                         "two_process_max_rank_cpu_seconds": cpu2,
                         "cpu_speedup": runs[1][0]["cpu_seconds"] / cpu2,
                         "max_rel_diff": rel}
            print(json.dumps({kind: out[kind]}), file=sys.stderr, flush=True)
    return out


def m_cnn_factors(args: argparse.Namespace) -> dict:
    """Top-k spectrum of the CNN at N probes, target mode, float64, by the ``"factors"``
    route (per-probe factors captured once, Lanczos products on them), against
    ``eigvalsh`` of the dense float64 kernel (blocked, from a DataLoader)."""
    torch.set_num_threads(args.threads)
    from torch.utils.data import DataLoader, TensorDataset

    from ntk_callback.engine import factors as F
    x, y = images(args.n, seed=1)
    model = cnn()
    forward_backward_seconds(model, x[:64], y[:64])  # warm-up
    g, g_cpu = forward_backward_seconds(model, x, y)
    seen: dict = {}
    original = F.capture

    def timed_capture(*a, **kw):  # the capture's share of the time, and the factors' size
        c = time.process_time()
        op = original(*a, **kw)
        seen.update(capture_cpu_seconds=time.process_time() - c, factor_mib=op.nbytes() / 2**20,
                    op=op)
        return op

    F.capture = timed_capture
    import ntk_callback.engine.spectrum as S
    S.capture = timed_capture
    base = current_rss_mib()
    t, c = time.perf_counter(), time.process_time()
    vals = ntk_spectrum(model, x, y, k=args.k, mode="target", dtype=torch.float64,
                        route="factors", memory_budget=args.budget)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    peak_extra = rss_mib() - base
    S.capture = F.capture = original
    op = seen.pop("op")
    out = {"n": args.n, "k": args.k, "budget_mib": args.budget / 2**20, "seconds": elapsed,
           "cpu_seconds": cpu, "products": op.products,
           "cpu_seconds_per_product": (cpu - seen["capture_cpu_seconds"]) / max(1, op.products),
           "peak_extra_mib": peak_extra, "forward_backward_cpu_seconds": g_cpu,
           "forward_backward_seconds": g, **seen,
           "paths": sorted(set(op.paths.values()))}
    print(json.dumps(out), file=sys.stderr, flush=True)
    if args.eig:
        loader = DataLoader(TensorDataset(x, y), batch_size=500)
        t, c = time.perf_counter(), time.process_time()
        dense = empirical_ntk(model, loader, dtype=torch.float64, block_size=args.block,
                              memory_budget=min(args.budget, 2 << 30))
        out["dense_kernel_seconds"] = time.perf_counter() - t
        out["dense_kernel_cpu_seconds"] = time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        exact = torch.linalg.eigvalsh(dense).flip(0)[:args.k]
        out["dense_eigvalsh_seconds"] = time.perf_counter() - t
        out["dense_eigvalsh_cpu_seconds"] = time.process_time() - c
        out["max_rel_err"] = float(((vals - exact).abs() / exact.abs()).max())
        out["lambda_max"], out["lambda_k"] = float(exact[0]), float(exact[-1])
    return out


MEASUREMENTS = {"spectrum": m_spectrum, "cnn": m_cnn, "cnn_spectrum": m_cnn_spectrum,
                "cnn_factors": m_cnn_factors, "ddp": m_ddp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=list(MEASUREMENTS) + ["all"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--modes", default="trace,target")
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None,
                    help="bytes (default: 1 GiB; cnn_factors: 5 GiB, for its factors)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spectrum-n", type=int, default=20000)
    ap.add_argument("--eig", action="store_true")
    ap.add_argument("--ddp-kinds", default="kernel,spectrum",
                    help="ddp: which of kernel,spectrum to measure")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--route", default="matfree",
                    help="spectrum: the Lanczos products' route (matfree or factors)")
    args = ap.parse_args()
    defaults = {"spectrum": (60000, 10), "cnn": (10000, None), "cnn_spectrum": (256, 20),
                "cnn_factors": (10000, 100),
                "ddp": (1024, None)}
    if args.what == "all":
        results = {}
        for what in MEASUREMENTS:
            cmd = [sys.executable, __file__, what, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[what] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results, indent=1))
        return
    n, k = defaults[args.what]
    args.budget = args.budget or (5 << 30 if args.what == "cnn_factors" else 1 << 30)
    args.n = args.n or n
    args.k = args.k or k
    print(json.dumps(MEASUREMENTS[args.what](args)), flush=True)


if __name__ == "__main__":
    main()
