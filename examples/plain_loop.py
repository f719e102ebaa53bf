"""NTKMonitor in a hand-written PyTorch training loop (no Lightning).

    .venv/bin/python examples/plain_loop.py    # a few seconds on a CPU, logs in logs/plain_loop
    .venv/bin/tensorboard --logdir logs        # scalars ntk/*, ntk/spectrum_set/*, images

A small MLP learns y = sin(3 x) with mini-batch SGD on the mean squared error. The
monitor measures the initial kernel K0 on 64 probes before the first step, counts the
learning rate of every optimizer step (for the training-dynamics metrics of this
regression model), reports after every epoch, and at the end computes the top-k NTK
spectrum over the whole training set without forming the kernel.

Options: --epochs, --examples, --num-probes, --spectrum-k, --logdir, --seed, --threads.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from ntk_callback import NTKMonitor


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--examples", type=int, default=1024, help="training examples")
    parser.add_argument("--num-probes", type=int, default=64)
    parser.add_argument(
        "--spectrum-k", type=int, default=10, help="eigenvalues of the whole-set spectrum"
    )
    parser.add_argument("--logdir", default=os.path.join("logs", "plain_loop"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x = torch.linspace(-1, 1, args.examples).unsqueeze(1)
    y = torch.sin(3 * x).squeeze(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(1, 128), nn.Tanh(), nn.Linear(128, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    probe_idx = torch.randperm(args.examples, generator=torch.Generator().manual_seed(args.seed))[
        : args.num_probes
    ]
    writer = SummaryWriter(args.logdir)
    monitor = NTKMonitor(
        model,
        probes=(x[probe_idx], y[probe_idx]),
        loss_reduction="mean",
        steps_per_epoch=len(loader),
    )
    monitor.start(step=0, writer=writer, optimizers=[optimizer])  # K0, before any step

    step = 0
    for epoch in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(xb).squeeze(1), yb)
            loss.backward()
            optimizer.step()
            monitor.on_optimizer_step(optimizer)  # this step's learning rate, for the dynamics
            step += 1
        out = monitor.report(step=step, epoch=epoch, writer=writer)
        if out is not None:
            metrics, report = out
            print(report.format_compact())

    # the top-k spectrum over the whole training set, matrix-free, in a fixed order
    ordered = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=False)
    spectrum = monitor.spectrum(
        ordered, k=args.spectrum_k, step=step, epoch=args.epochs - 1, writer=writer
    )
    monitor.refresh_figures(writer)
    writer.close()
    result = dict(monitor.history[-1]["metrics"])
    if spectrum is not None:
        m = spectrum["metrics"]
        print(
            f"whole-set spectrum over {args.examples} examples: lambda_1 {m['lambda_1']:.4g}, "
            f"trace {m['trace']:.4g}, {m['seconds']:.2f} s"
        )
        result.update({f"spectrum_set/{k}": v for k, v in m.items()})
    return result


if __name__ == "__main__":
    main()
