"""The structured planner's route for every Linear / Conv weight of a model, for a probe
count, a mode, a memory budget and a device profile, without computing a kernel.

The terms are built on zero-stride (expanded) tensors of the shapes one forward of a
single probe records, and offered to :func:`ntk_callback.engine.structured.planner.choose`
in the order the capture pass meets them (the reverse of the forward: the backward
reaches the last layer first), each rows-route term taking its rows out of the budget
that is left, as :func:`ntk_callback.engine.structured.driver.compute` does. Used by the
tests of the CUDA cost model (no GPU needed) and printed by ``bench_ntk.py --device``.

    python benchmarks/route_preview.py --model resnet18 --n 256 --mode target
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from ntk_callback.engine.device import CPU, DeviceProfile, cuda_profile  # noqa: E402
from ntk_callback.engine.modes import SUM, TARGET, TRACE  # noqa: E402
from ntk_callback.engine.structured.planner import choose, rows_bytes  # noqa: E402
from ntk_callback.engine.structured.terms import ConvTerm, OuterTerm, Term  # noqa: E402

GiB = 1 << 30


@dataclass
class Route:
    layer: str
    kind: str              # "conv" / "linear"
    params: int            # P of the weight
    positions: int         # S (output positions of a conv, 1 for a Linear on vectors)
    rows_bytes: int        # what the rows route would hold
    route: str


def weight_terms(model: nn.Module, example: torch.Tensor, n: int, k: int
                 ) -> list[tuple[str, Term]]:
    """(layer name, weight term) for every Conv2d / Linear of ``model``, in backward order,
    from one forward of ``example`` (one probe), on expanded tensors of ``n`` probes and
    ``k`` cotangent rows (no memory beyond one probe's)."""
    seen: list[tuple[str, Term]] = []
    hooks = []

    def hook(name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        a = args[0].detach()
        if isinstance(module, nn.Conv2d):
            d = out.detach().new_empty((1, 1) + tuple(out.shape[1:])).expand(
                (k, n) + tuple(out.shape[1:]))
            seen.append((name, ConvTerm(f"{name}.weight", a.expand((n,) + tuple(a.shape[1:])),
                                        d, module)))
        else:
            c, o = a.shape[-1], out.shape[-1]
            s = a.numel() // c
            data = a.new_empty((1, 1, c)).expand(n, s, c)
            seen.append((name, OuterTerm(f"{name}.weight", data,
                                         out.new_empty((1, 1, 1, o)).expand(k, n, s, o))))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: hook(name, m, args, out)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen[::-1]


def preview(model: nn.Module, example: torch.Tensor, n: int, mode: str, budget: int,
            device: DeviceProfile, num_outputs: int = 10, itemsize: int = 4) -> list[Route]:
    """Each weight's route, as the driver would choose it for ``n`` probes."""
    kind = {"target": TARGET, "trace": TRACE, "sum": SUM}[mode]
    k = 1 if mode in ("target", "sum") else num_outputs
    left = budget
    out = []
    for name, term in weight_terms(model, example, n, k):
        route = choose(term, k, n, None, kind, left, itemsize, None, device)
        size = rows_bytes(term, k, n, itemsize)
        if route == "rows":
            left -= size
        _, s, _, _, p = term.size()
        out.append(Route(name, "conv" if isinstance(term, ConvTerm) else "linear", p, s,
                         size, route))
    return out


def format_routes(routes: list[Route]) -> str:
    lines = [f"{'layer':24s} {'kind':6s} {'P':>9s} {'S':>5s} {'rows MiB':>9s}  route"]
    for r in routes:
        lines.append(f"{r.layer:24s} {r.kind:6s} {r.params:9d} {r.positions:5d} "
                     f"{r.rows_bytes / 2**20:9.0f}  {r.route}")
    rows = sum(r.rows_bytes for r in routes if r.route == "rows")
    lines.append(f"rows held: {rows / GiB:.2f} GiB; "
                 f"{sum(r.route == 'gram' for r in routes)} Gram-route weights")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import resnet18
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18"])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--mode", default="target")
    ap.add_argument("--free-gib", type=float, default=78.0,
                    help="free memory of the CUDA profile (GiB; default 78, an idle H100)")
    ap.add_argument("--budget-gib", type=float, help="explicit budget (default: the device's)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = resnet18.ResNet18().eval()
    x = torch.randn(1, 3, 32, 32)
    for profile in (CPU, cuda_profile(int(args.free_gib * GiB))):
        budget = int(args.budget_gib * GiB) if args.budget_gib else profile.default_budget()
        print(f"\n== {profile.kind}, budget {budget / GiB:.2f} GiB, N={args.n}, {args.mode} ==")
        print(format_routes(preview(model, x, args.n, args.mode, budget, profile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
