"""Overhead of NTKReportCallback on the blobs example's fit time.

Runs ``examples/blobs.py``'s training (TensorBoard logger, same seed, same data) with and
without the callback at its default settings (64 probes, target mode, a report after
every epoch, console report, TensorBoard histogram and images), interleaved in one process
(ABBA order, so drift of the machine's speed hits both arms alike), and prints the fit
times, the median of the per-pair ratios and the time spent inside the callback's hooks
(on a shared, noisy machine the hook time is the steadier estimate of the overhead, and
CPU time, also printed, steadier than wall time), broken down per report into the kernel, the label-free alignment kernel, the analysis,
the pictures (the annotated heatmap; the history pictures spectrum/drift/layers, drawn at
some reports only) and the rest (writing images and histogram to TensorBoard, scalars,
console report, probe drawing at train start).

    python benchmarks/bench_callback_overhead.py                # 5 pairs, 10 epochs, 1 thread
    python benchmarks/bench_callback_overhead.py --pairs 9 --epochs 20 --threads 2
    python benchmarks/bench_callback_overhead.py --no-figures   # log_figures=False (--no-images: False)

Target (issue 4): median ratio <= 1.10.

GPU mode (``--model resnet18 --device cuda``): ResNet-18 (CIFAR stem, ``resnet18.py``)
trained on synthetic 32x32 images (``--images`` 8192, batch ``--batch`` 256, 3 epochs, SGD)
without and with ``NTKReportCallback(num_probes=256)`` at its defaults (target mode, a
report every epoch, TensorBoard logging); prints and writes (``--json``) the fit times,
the seconds per report and the callback's share of the fit time. ``--model cnn`` (the
tutorial CNN) with ``--device cpu`` is the same code path in seconds (the tests run it):

    python benchmarks/bench_callback_overhead.py --model resnet18 --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import types
from collections import defaultdict
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import blobs  # noqa: E402

import ntk_callback.loggers  # noqa: E402
from ntk_callback import NTKReportCallback  # noqa: E402

# Seconds spent in each part of the callback's work, added up per fit (reset by run_once):
# wall time, and the process's CPU time under "cpu:<part>" (steadier on a loaded machine).
PARTS: Dict[str, float] = defaultdict(float)
_depth = [0]


def _timed_call(fn: Callable[..., Any], part: Callable[[tuple, dict], str]) -> Callable[..., Any]:
    """``fn`` that adds its wall time to ``PARTS[part(args, kwargs)]`` (outermost call only,
    so a kernel function calling another is counted once)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _depth[0]:
            return fn(*args, **kwargs)
        _depth[0] += 1
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            name = part(args, kwargs)
            PARTS[name] += time.perf_counter() - start
            PARTS[f"cpu:{name}"] += time.process_time() - cpu
            _depth[0] -= 1

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _kernel_part(args: tuple, kwargs: dict) -> str:
    targets = args[2] if len(args) > 2 else kwargs.get("targets")
    return "kernel" if targets is not None else "alignment kernel"  # the label-free one has none


def install_timers() -> None:
    """Wrap the engine's kernel functions and the analysis wherever the package bound them
    (module globals, so wherever the callback's code lives), and the picture rendering."""
    import ntk_callback.engine as engine
    import ntk_callback.report as report

    originals = {
        engine.empirical_ntk: _kernel_part,
        engine.layerwise_ntk: _kernel_part,
        report.analyze_ntk: lambda a, k: "analysis",
    }
    wrapped = {fn: _timed_call(fn, part) for fn, part in originals.items()}
    for name, module in list(sys.modules.items()):
        if not name.startswith("ntk_callback") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, types.FunctionType) and value in wrapped:
                setattr(module, attr, wrapped[value])
    media = ntk_callback.loggers.ReportMedia
    render = media._render

    def timed_render(self: Any, name: str) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return render(self, name)
        finally:
            part = "heatmap" if "kernel" in name else "history pictures"
            PARTS[part] += time.perf_counter() - start
            PARTS[f"cpu:{part}"] += time.process_time() - cpu
            PARTS[f"n:{name}"] += 1

    media._render = timed_render  # type: ignore[method-assign]


class TimedNTKReportCallback(NTKReportCallback):
    """NTKReportCallback that adds up the wall time of its training hooks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = 0.0

    def _timed(self, hook: str, trainer: Any, pl_module: Any) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        getattr(super(), hook)(trainer, pl_module)
        self.hook_seconds += time.perf_counter() - start
        PARTS["cpu:hooks"] += time.process_time() - cpu

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._timed("on_train_start", trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._timed("on_train_epoch_end", trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._timed("on_train_end", trainer, pl_module)


def run_once(
    with_callback: bool, epochs: int, logdir: str, num_probes: int, **settings: Any
) -> Dict[str, float]:
    cb = TimedNTKReportCallback(num_probes=num_probes, **settings) if with_callback else None
    PARTS.clear()
    cpu = time.process_time()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the console reports
        result = blobs.fit(epochs=epochs, logdir=logdir, seed=0, callback=cb, quiet=True)
    return {
        "seconds": result["seconds"],
        "cpu_seconds": time.process_time() - cpu,
        "hook_seconds": cb.hook_seconds if cb is not None else 0.0,
        "reports": float(len(cb.history)) if cb is not None else 0.0,
        **{f"part:{k}": v for k, v in PARTS.items()},
    }


def _image_classifier(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import resnet18

        return resnet18.ResNet18()
    import bench_configs

    return bench_configs.TutorialCNN()


def image_fit(model_name: str, device: str, epochs: int, images: int, batch: int, logdir: str | None,
              callback: Any = None, seed: int = 0) -> Dict[str, Any]:
    """Train an image classifier on synthetic 32x32 data (10 classes) on ``device``;
    returns the fit's wall seconds (synchronised) and the trained weights."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    pl = blobs.pl
    pl.seed_everything(seed, workers=True, verbose=False)
    net = _image_classifier(model_name)

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(images, 3, 32, 32, generator=gen), torch.randint(0, 10, (images,), generator=gen))
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed + 1))
    logger = blobs.TensorBoardLogger(logdir, name="image") if logdir is not None else False
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=logger,
        callbacks=[callback] if callback is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    module = Classifier()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        trainer.fit(module, loader)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "state": {k: v.detach().cpu() for k, v in module.state_dict().items()}}


def image_main(args: argparse.Namespace) -> Dict[str, Any]:
    """Fits without and with the callback (``--pairs`` ABBA pairs after one warm-up of each)."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        common = dict(model_name=args.model, device=args.device, images=args.images, batch=args.batch)
        image_fit(epochs=1, logdir=None, **common)  # warm-up: cuDNN, allocator, imports
        image_fit(epochs=1, logdir=os.path.join(tmp, "warm"), callback=TimedNTKReportCallback(num_probes=args.num_probes), **common)
        without: List[float] = []
        runs: List[Dict[str, float]] = []
        identical = True
        for i in range(args.pairs):
            state = None
            for flag in ((False, True) if i % 2 == 0 else (True, False)):
                cb = TimedNTKReportCallback(num_probes=args.num_probes) if flag else None
                res = image_fit(epochs=args.epochs, logdir=os.path.join(tmp, f"r{i}{int(flag)}"), callback=cb, **common)
                if state is not None:
                    identical &= all(torch.equal(state[k], res["state"][k]) for k in state)
                state = res["state"]
                if cb is None:
                    without.append(res["seconds"])
                else:
                    reports = max(1, len(cb.history))
                    runs.append({"fit_s": res["seconds"], "hook_s": cb.hook_seconds, "reports": len(cb.history),
                                 "per_report_s": cb.hook_seconds / reports, "hook_share": cb.hook_seconds / res["seconds"]})
                print(f"pair {i}: {'with   ' if flag else 'without'} callback  fit {res['seconds']:7.3f} s", flush=True)
    out = {
        "model": args.model, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "images": args.images, "batch": args.batch, "epochs": args.epochs, "num_probes": args.num_probes,
        "fit_without_s": statistics.median(without),
        "fit_with_s": statistics.median(r["fit_s"] for r in runs),
        "per_report_s": statistics.median(r["per_report_s"] for r in runs),
        "hook_share": statistics.median(r["hook_share"] for r in runs),
        "reports": runs[0]["reports"], "runs": runs, "without": without,
        "weights_identical_with_and_without": identical,
    }
    print(f"\n{args.model} on {out['device_name']}: {args.images} images, batch {args.batch}, {args.epochs} epochs, "
          f"NTKReportCallback(num_probes={args.num_probes}) defaults")
    print(f"fit without callback {out['fit_without_s']:.2f} s, with {out['fit_with_s']:.2f} s; "
          f"{out['reports']} reports, {out['per_report_s']:.3f} s per report, callback share of the fit "
          f"{100 * out['hook_share']:.1f} %; weights identical with and without: {identical}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="blobs", choices=["blobs", "resnet18", "cnn"],
                        help="blobs (the example, CPU) or an image classifier on synthetic 32x32 data")
    parser.add_argument("--device", default="cpu", help="image models: cpu or cuda")
    parser.add_argument("--images", type=int, default=8192, help="image models: training images")
    parser.add_argument("--batch", type=int, default=256, help="image models: batch size")
    parser.add_argument("--json", help="image models: write the summary here")
    parser.add_argument("--pairs", type=int, default=5, help="with/without pairs (ABBA interleaved)")
    parser.add_argument("--epochs", type=int, help="default 10 (blobs), 3 (image models)")
    parser.add_argument("--num-probes", type=int, help="default 64 (blobs), 256 (image models)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: less noise)")
    parser.add_argument("--no-figures", action="store_true",
                        help="log_figures=False: heatmap and histogram only, no spectrum/drift/layers pictures")
    parser.add_argument("--no-images", action="store_true", help="log_images=False: scalars and console only")
    args = parser.parse_args(argv)
    image = args.model != "blobs"
    args.epochs = args.epochs or (3 if image else 10)
    args.num_probes = args.num_probes or (256 if image else 64)
    if image:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import logging
        import warnings

        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        args.pairs = min(args.pairs, 2) if args.pairs == 5 else args.pairs
        image_main(args)
        return
    settings: Dict[str, Any] = {}
    if args.no_figures:
        settings["log_figures"] = False
    if args.no_images:
        settings["log_images"] = False
    torch.set_num_threads(args.threads)

    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    install_timers()

    with tempfile.TemporaryDirectory() as tmp:
        run_once(True, 1, os.path.join(tmp, "warmup"), args.num_probes, **settings)  # imports, matplotlib fonts, allocator
        run_once(False, 1, os.path.join(tmp, "warmup"), args.num_probes)
        without: List[float] = []
        with_cb: List[Dict[str, float]] = []
        without_runs: List[Dict[str, float]] = []
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for flag in order:
                res = run_once(flag, args.epochs, os.path.join(tmp, f"run{i}_{int(flag)}"), args.num_probes, **settings)
                (with_cb.append(res) if flag else (without.append(res["seconds"]), without_runs.append(res)))
                print(f"pair {i}: {'with   ' if flag else 'without'} callback  fit {res['seconds']:7.3f} s", flush=True)

    ratios = [w["seconds"] / wo for w, wo in zip(with_cb, without)]
    hook = statistics.median(w["hook_seconds"] for w in with_cb)
    reports = with_cb[0]["reports"]
    print()
    print(f"blobs example, {args.epochs} epochs, {args.num_probes} probes, target mode, threads={args.threads}"
          + "".join(f", {k}={v}" for k, v in settings.items()))
    print(f"fit without callback: median {statistics.median(without):.3f} s   "
          f"with: median {statistics.median(w['seconds'] for w in with_cb):.3f} s")
    share = statistics.median(w["hook_seconds"] / (w["seconds"] - w["hook_seconds"]) for w in with_cb)
    print(f"callback hooks: median {hook:.3f} s per fit, {reports:.0f} reports, {1e3 * hook / reports:.1f} ms per report; "
          f"hook time / rest of the fit = {share:.3f} (the overhead measured directly, immune to machine drift)")
    names = ("kernel", "alignment kernel", "analysis", "heatmap", "history pictures")
    for clock, pre, total in (("wall", "part:", "hook_seconds"), ("CPU", "part:cpu:", "part:cpu:hooks")):
        parts = {n: statistics.median(w.get(f"{pre}{n}", 0.0) for w in with_cb) for n in names}
        rest = statistics.median(w.get(total, 0.0) - sum(w.get(f"{pre}{n}", 0.0) for n in names) for w in with_cb)
        whole = statistics.median(w.get(total, 0.0) for w in with_cb)
        print(f"per report, {clock:4s} ms (median over fits): hooks {1e3 * whole / reports:.1f} = " + "  ".join(
            f"{n} {1e3 * v / reports:.1f}" for n, v in parts.items()
        ) + f"  rest {1e3 * rest / reports:.1f}")
    drawn = statistics.median(w.get("part:n:spectrum", 0.0) for w in with_cb)
    each = statistics.median(w.get("part:cpu:history pictures", 0.0) / max(w.get("part:n:spectrum", 0.0), 1.0) for w in with_cb)
    print(f"  (history pictures: spectrum, drift, layers, drawn {drawn:.0f} times in {reports:.0f} reports, {1e3 * each:.0f} CPU ms "
          "a time, averaged over all reports above; rest: TensorBoard image/histogram writes, scalars, console, probe drawing)")
    cpu_share = statistics.median(
        w["part:cpu:hooks"] / (w["cpu_seconds"] - w["part:cpu:hooks"]) for w in with_cb
    )
    print(f"CPU time: fit without callback median {statistics.median(w['cpu_seconds'] for w in without_runs):.3f} s, "
          f"with {statistics.median(w['cpu_seconds'] for w in with_cb):.3f} s; "
          f"hook CPU / rest of the fit's CPU = {cpu_share:.3f}")
    print(f"overhead: median ratio with/without = {statistics.median(ratios):.3f}x "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
