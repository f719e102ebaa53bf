"""Width sweep: finite-width empirical NTK versus the infinite-width analytic kernel.

For fully-connected ReLU networks in the NTK parameterisation (``NTKParamMLP``, the
torch twin of neural-tangents' ``stax.Dense``/``stax.Relu`` stack) and widths from 64 to
4096 this script measures, averaged over a few random initialisations,

1. the relative error of the empirical NTK at initialisation against ``relu_ntk``,
   ``||K_emp - K_inf||_F / ||K_inf||_F``, which falls like ``width^(-1/2)`` (the kernel
   is an average over ``width`` independent units; Jacot et al. 2018);
2. the kernel drift during training, ``relative_change(K_T, K_0)`` after ``--steps``
   steps of full-batch gradient descent on a small regression task, which also vanishes
   as the width grows (the lazy / kernel regime; Jacot et al. 2018, Chizat & Bach
   2018). Lee et al. 2019 bound it by ``O(width^(-1/2))``; the kernel's time derivative
   is ``O(1/width)`` (Dyer & Gur-Ari 2020; Huang & Yau 2020), so slopes between -1/2
   and -1 are expected (about -0.7 with the defaults).

It prints a table and the fitted log-log slopes and saves ``docs/width_sweep.png``.

    python examples/width_sweep.py            # full sweep, ~1-2 minutes on a laptop CPU
    python examples/width_sweep.py --quick    # seconds; smaller widths, no plot by default

Training uses the loss ``1/2 sum_i (f(x_i) - y_i)^2`` (sum, not mean, as in
``ntk_callback.analysis.predicted_residual``) with learning rate ``--lr-scale /
lambda_max(K_inf)``, the same for every width, so that the linearised dynamics
``r_{t+1} = (I - lr K) r_t`` are stable and identical in the infinite-width limit.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from ntk_callback import empirical_ntk
from ntk_callback.analysis import relative_change
from ntk_callback.theory import NTKParamMLP, relu_ntk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--seeds", type=int, default=3,
                   help="initialisations per width > 1024; narrower (cheap) widths get 3x")
    p.add_argument("--depth", type=int, default=2, help="hidden ReLU layers")
    p.add_argument("--w-std", type=float, default=2**0.5)
    p.add_argument("--b-std", type=float, default=0.1)
    p.add_argument("--n", type=int, default=16, help="training points (= kernel probes)")
    p.add_argument("--dim", type=int, default=8, help="input dimension")
    p.add_argument("--steps", type=int, default=50, help="gradient-descent steps")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="learning rate = lr_scale / lambda_max(K_inf)")
    p.add_argument("--plot", default=None,
                   help="where to save the figure (default docs/width_sweep.png; none with --quick)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true",
                   help="small widths, 2 seeds, 20 steps (a few seconds; used by the tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.seeds, args.steps = [32, 64, 128, 256], 2, 20
    if args.plot is None and not args.quick:
        args.plot = os.path.join(ROOT, "docs", "width_sweep.png")
    if args.no_plot:
        args.plot = None
    if min(args.widths) < 1 or args.seeds < 1 or args.steps < 1 or len(args.widths) < 2:
        p.error("need at least two widths >= 1, seeds >= 1 and steps >= 1")
    return args


def make_task(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs on the sphere of radius sqrt(dim) and a smooth nonlinear target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(dim)
    v = torch.randn(dim, generator=g) / math.sqrt(dim)
    y = torch.sin(2 * x @ v) + 0.5 * torch.cos(x[:, 0])
    return x, y


def run_one(width: int, seed: int, x: torch.Tensor, y: torch.Tensor, k_inf: torch.Tensor,
            lr: float, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(seed)
    model = NTKParamMLP(x.shape[1], width, args.depth, args.w_std, args.b_std)
    k0 = empirical_ntk(model, x, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    loss0 = None
    for _ in range(args.steps):  # plain full-batch gradient descent
        loss = 0.5 * ((model(x)[:, 0] - y) ** 2).sum()
        loss0 = loss.item() if loss0 is None else loss0
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    with torch.no_grad():
        loss_t = 0.5 * float(((model(x)[:, 0] - y) ** 2).sum())
    k_t = empirical_ntk(model, x, dtype=torch.float64)
    return {
        "error": float((k0 - k_inf).norm() / k_inf.norm()),
        "drift": relative_change(k_t, k0),
        "loss_ratio": loss_t / loss0,
    }


def slope(widths: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def plot(path: str, widths: np.ndarray, err: list[np.ndarray], drift: list[np.ndarray],
         s_err: float, s_drift: float, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, vals, s, title, ylabel in (
        (axes[0], err, s_err, "empirical NTK at init vs relu_ntk",
         r"$\|K_{emp} - K_\infty\|_F / \|K_\infty\|_F$"),
        (axes[1], drift, s_drift, f"kernel drift after {args.steps} GD steps",
         r"$\|K_T - K_0\|_F / \|K_0\|_F$"),
    ):
        mean = np.array([v.mean() for v in vals])
        std = np.array([v.std() for v in vals])
        ax.errorbar(widths, mean, yerr=std, fmt="o", capsize=3, label="mean ± std over seeds")
        fit = np.exp(np.polyval(np.polyfit(np.log(widths), np.log(mean), 1), np.log(widths)))
        ax.plot(widths, fit, "-", label=f"fit: slope {s:.2f}")
        ref = mean[0] * (widths / widths[0]) ** -0.5
        ax.plot(widths, ref, "--", color="gray", label=r"$\propto$ width$^{-1/2}$")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"ReLU MLP, depth {args.depth}, NTK parameterisation "
                 f"(w_std={args.w_std:.3g}, b_std={args.b_std:g}), N={args.n}, d={args.dim}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    x, y = make_task(args.n, args.dim)
    k_inf = relu_ntk(x, depth=args.depth, w_std=args.w_std, b_std=args.b_std)
    lr = args.lr_scale / float(torch.linalg.eigvalsh(k_inf)[-1])
    widths = np.array(sorted(args.widths), dtype=float)
    # Narrow networks cost little: give them more seeds for a steadier mean.
    n_seeds = [args.seeds * (3 if w <= 1024 and not args.quick else 1) for w in widths]
    err, drift, loss_ratio = ([np.zeros(k) for k in n_seeds] for _ in range(3))
    print(f"depth={args.depth} w_std={args.w_std:.4g} b_std={args.b_std:g} N={args.n} "
          f"d={args.dim} steps={args.steps} lr={lr:.4g}")
    print(f"{'width':>7} | {'seeds':>5} | {'kernel error':>17} | {'kernel drift':>17} | "
          f"{'loss_T/loss_0':>13}")
    for i, width in enumerate(widths.astype(int)):
        for s in range(n_seeds[i]):
            r = run_one(int(width), s, x, y, k_inf, lr, args)
            err[i][s], drift[i][s], loss_ratio[i][s] = r["error"], r["drift"], r["loss_ratio"]
        print(f"{width:>7} | {n_seeds[i]:>5} | {err[i].mean():.4f} ± {err[i].std():.4f} | "
              f"{drift[i].mean():.5f} ± {drift[i].std():.5f} | {loss_ratio[i].mean():13.2e}")
    mean_err = np.array([e.mean() for e in err])
    mean_drift = np.array([d.mean() for d in drift])
    s_err, s_drift = slope(widths, mean_err), slope(widths, mean_drift)
    print(f"kernel error slope (log-log): {s_err:+.3f}   (theory: -0.5)")
    print(f"kernel drift slope (log-log): {s_drift:+.3f}   (theory: between -0.5, the bound of "
          "Lee et al. 2019, and -1, Dyer & Gur-Ari 2020)")
    if args.plot:
        plot(args.plot, widths, err, drift, s_err, s_drift, args)
        print(f"saved {args.plot}")
    print(f"total {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
