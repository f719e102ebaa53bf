"""Overhead of NTKReportCallback on the blobs example's fit time.

Runs ``examples/blobs.py``'s training (TensorBoard logger, same seed, same data) with and
without the callback at its default settings (64 probes, target mode, a report after
every epoch, console report, TensorBoard histogram and images), interleaved in one process
(ABBA order, so drift of the machine's speed hits both arms alike), and prints the fit
times, the median of the per-pair ratios and the time spent inside the callback's hooks
(on a shared, noisy machine the hook time is the steadier estimate of the overhead).

    python benchmarks/bench_callback_overhead.py                # 5 pairs, 10 epochs, 1 thread
    python benchmarks/bench_callback_overhead.py --pairs 9 --epochs 20 --threads 2

Target (issue 4): median ratio <= 1.10.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import blobs  # noqa: E402

from ntk_callback import NTKReportCallback  # noqa: E402


class TimedNTKReportCallback(NTKReportCallback):
    """NTKReportCallback that adds up the wall time of its training hooks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = 0.0

    def _timed(self, hook: str, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        getattr(super(), hook)(trainer, pl_module)
        self.hook_seconds += time.perf_counter() - start

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._timed("on_train_start", trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._timed("on_train_epoch_end", trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._timed("on_train_end", trainer, pl_module)


def run_once(with_callback: bool, epochs: int, logdir: str, num_probes: int) -> Dict[str, float]:
    cb = TimedNTKReportCallback(num_probes=num_probes) if with_callback else None
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the console reports
        result = blobs.fit(epochs=epochs, logdir=logdir, seed=0, callback=cb, quiet=True)
    return {
        "seconds": result["seconds"],
        "hook_seconds": cb.hook_seconds if cb is not None else 0.0,
        "reports": float(len(cb.history)) if cb is not None else 0.0,
    }


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="with/without pairs (ABBA interleaved)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-probes", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: less noise)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        run_once(True, 1, os.path.join(tmp, "warmup"), args.num_probes)  # imports, matplotlib fonts, allocator
        run_once(False, 1, os.path.join(tmp, "warmup"), args.num_probes)
        without: List[float] = []
        with_cb: List[Dict[str, float]] = []
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for flag in order:
                res = run_once(flag, args.epochs, os.path.join(tmp, f"run{i}_{int(flag)}"), args.num_probes)
                (with_cb.append(res) if flag else without.append(res["seconds"]))
                print(f"pair {i}: {'with   ' if flag else 'without'} callback  fit {res['seconds']:7.3f} s", flush=True)

    ratios = [w["seconds"] / wo for w, wo in zip(with_cb, without)]
    hook = statistics.median(w["hook_seconds"] for w in with_cb)
    reports = with_cb[0]["reports"]
    print()
    print(f"blobs example, {args.epochs} epochs, {args.num_probes} probes, target mode, threads={args.threads}")
    print(f"fit without callback: median {statistics.median(without):.3f} s   "
          f"with: median {statistics.median(w['seconds'] for w in with_cb):.3f} s")
    share = statistics.median(w["hook_seconds"] / (w["seconds"] - w["hook_seconds"]) for w in with_cb)
    print(f"callback hooks: median {hook:.3f} s per fit, {reports:.0f} reports, {1e3 * hook / reports:.1f} ms per report; "
          f"hook time / rest of the fit = {share:.3f} (the overhead measured directly, immune to machine drift)")
    print(f"overhead: median ratio with/without = {statistics.median(ratios):.3f}x "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
