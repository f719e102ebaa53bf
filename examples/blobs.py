"""Gaussian blobs + an MLP, trained with NTKReportCallback and TensorBoard.

    .venv/bin/python examples/blobs.py                     # trains ~10 s on a CPU, logs under logs/
    .venv/bin/tensorboard --logdir logs                    # scalars ntk/*, images ntk/kernel, ntk/spectrum, ntk/drift

Options: --epochs, --logdir, --num-probes, --every-n-epochs, --seed, --threads, and
--save-figures DIR to also write the last report's pictures (kernel heatmap, spectrum,
drift) as PNG files into DIR (the images in docs/ come from ``--save-figures docs``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
except ImportError:  # the unified package only
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.loggers import TensorBoardLogger  # type: ignore[no-redef]

from ntk_callback import NTKReportCallback


def make_blobs(
    n_per_class: int = 4000, num_classes: int = 4, dim: int = 8, spread: float = 1.0, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num_classes`` isotropic Gaussian blobs in ``dim`` dimensions.

    Centres are drawn from N(0, 2.5^2 I), points from N(centre, spread^2 I). Returns
    ``(x, y)``: x (num_classes * n_per_class, dim) float32, y int64 labels, shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    centres = 2.5 * torch.randn(num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


class BlobsMLP(pl.LightningModule):
    """A ``dim -> hidden -> hidden -> num_classes`` ReLU MLP trained with cross-entropy and SGD."""

    def __init__(self, dim: int = 8, hidden: int = 64, num_classes: int = 4, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def make_loaders(seed: int = 0, batch_size: int = 32) -> Tuple[DataLoader, DataLoader]:
    x, y = make_blobs(seed=seed)
    n_train = int(0.8 * len(y))
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(val, batch_size=256),
    )


def fit(
    epochs: int = 10,
    logdir: Optional[str] = "logs",
    seed: int = 0,
    callback: Optional[NTKReportCallback] = None,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Train the blobs MLP; returns ``{"trainer", "model", "callback", "logger", "seconds"}``.

    ``logdir=None`` trains without a logger (used by the overhead benchmark).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    model = BlobsMLP()
    train, val = make_loaders(seed)
    logger = TensorBoardLogger(logdir, name="blobs") if logdir is not None else False
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[callback] if callback is not None else [],
        deterministic=True,
        enable_checkpointing=False,
        enable_progress_bar=not quiet,
        enable_model_summary=not quiet,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - start
    return {"trainer": trainer, "model": model, "callback": callback, "logger": logger, "seconds": seconds}


def save_figures(callback: NTKReportCallback, out_dir: str) -> None:
    """Write the last report's heatmap, the spectrum of every report and the drift curves as PNGs."""
    from ntk_callback import plotting

    if callback.last_kernel is None or callback.probes is None:
        print("no NTK report to draw", file=sys.stderr)
        return
    labels = callback.probes[1]
    last = callback.history[-1]
    try:  # the annotated heatmap the loggers get (colour bar, class labels, report in the title)
        heatmap = plotting.kernel_heatmap_figure(callback.last_kernel, labels, step=last["step"], epoch=last["epoch"],
                                                 tag=last["tag"])
    except ImportError:
        heatmap = plotting.kernel_heatmap_image(callback.last_kernel, labels)
    paths = [plotting.save_png(os.path.join(out_dir, "kernel_heatmap.png"), heatmap)]
    try:
        paths.append(plotting.save_png(os.path.join(out_dir, "spectrum.png"), plotting.spectrum_figure(callback.history)))
        paths.append(plotting.save_png(os.path.join(out_dir, "drift.png"), plotting.drift_figure(callback.history)))
    except ImportError as err:
        print(f"skipping spectrum/drift pictures: {err}", file=sys.stderr)
    for p in paths:
        print(f"wrote {p}")


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--logdir", default="logs", help="TensorBoard root directory (default: logs)")
    parser.add_argument("--num-probes", type=int, default=64)
    parser.add_argument("--every-n-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-figures", metavar="DIR", default=None,
                        help="also write kernel_heatmap.png, spectrum.png and drift.png into DIR")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a model this small only loses time synchronising threads)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    callback = NTKReportCallback(num_probes=args.num_probes, every_n_epochs=args.every_n_epochs, seed=args.seed)
    run = fit(epochs=args.epochs, logdir=args.logdir, seed=args.seed, callback=callback)
    if args.save_figures:
        save_figures(callback, args.save_figures)
    log_dir = run["logger"].log_dir
    print(f"\nTrained {args.epochs} epochs in {run['seconds']:.1f} s; {len(callback.history)} NTK reports.")
    print(f"TensorBoard logs: {os.path.abspath(log_dir)}")
    print(f"View them with:   .venv/bin/tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
