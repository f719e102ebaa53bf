r"""A finite-step check of the kernel, independent of the kernel engine's algebra.

The NTK is the first-order response of the outputs to a gradient step:
``k_eta(x, x') = (f(x; theta + eta * grad f(x')) - f(x; theta)) / eta  ->  k(x, x')`` as
``eta -> 0``, with error O(eta) (forward scheme) or O(eta^2) (central scheme,
``(f(theta + eta g) - f(theta - eta g)) / (2 eta)``). It needs only forward passes and one
gradient a probe, so a user can confirm what :func:`empirical_ntk` reports.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from . import batch as B
from .errors import NTKError
from .modes import KernelMode, ModeLike, mode_names
from .problem import build_problem, resolve_dtype
from .state import cast_floating, frozen_measurement


def finite_difference_ntk(model: torch.nn.Module, inputs: Any, targets: Any = None, *,
                          mode: ModeLike = "target", eta: float = 1e-4,
                          scheme: str = "central",
                          dtype: torch.dtype | None = torch.float64, eval_mode: bool = True,
                          output_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    r"""Finite-step kernel ``K_eta[i, j] = <v_i, f(x_i; theta + eta g_j) - f(x_i; theta)> / eta``
    with ``g_j = d <v_j, f(x_j)> / d theta`` and ``v_i`` the mode's cotangent (``target``:
    the one-hot of ``t_i``; ``sum``: all ones; ``trace``: summed over the unit vectors of
    the outputs; any mode of an (N, N) kernel: summed over its cotangent rows). Shape
    (N, N); converges to ``empirical_ntk(..., mode=mode)`` as eta -> 0.

    ``scheme="forward"`` is the definition above (error O(eta)); ``"central"`` replaces the
    difference by ``(f(theta + eta g) - f(theta - eta g)) / 2`` (error O(eta^2)). Computed in
    ``dtype`` (float64 by default: the difference of two nearby outputs loses digits).
    Costs N (or N * O for trace) gradients and twice as many batched forward passes.
    Side-effect free like :func:`empirical_ntk`.
    """
    scalar = mode_names(scalar_only=True)
    kind = KernelMode.parse(mode) if isinstance(mode, KernelMode) or mode in scalar else None
    if kind is None or not kind.scalar:
        raise NTKError("finite_difference_ntk supports the modes of an (N, N) kernel, "
                       f"{', '.join(map(repr, scalar))}, not {mode!r}.")
    if scheme not in ("forward", "central"):
        raise NTKError(f"scheme must be 'forward' or 'central', not {scheme!r}.")
    if not (isinstance(eta, (int, float)) and eta > 0):
        raise NTKError(f"eta={eta!r} must be a positive step size, e.g. 1e-4.")
    with frozen_measurement(model, eval_mode), cast_floating(model, resolve_dtype(model, dtype)):
        problem = build_problem(model, inputs, targets, mode=kind, dtype=dtype,
                                output_fn=output_fn)
        theta = problem.params
        names = list(theta)
        n, cot = problem.n1, problem.cot1  # cot: (N, k, O)

        def outputs(delta: dict[str, torch.Tensor] | None, sign: float) -> torch.Tensor:
            live = theta if delta is None else {k: theta[k] + sign * delta[k] for k in names}
            with torch.no_grad():
                return problem.forward(problem.tensors(live), problem.x1)

        base = outputs(None, 0.0)
        problem.check_outputs(base, "inputs")
        kernel = torch.zeros(n, n, dtype=problem.dtype, device=problem.device)
        for j in range(n):
            xj = B.take(problem.x1, slice(j, j + 1))
            for a in range(cot.shape[1]):
                live = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
                out = problem.forward(problem.tensors(live), xj)[0]
                grads = torch.autograd.grad(out @ cot[j, a], [live[k] for k in names],
                                            allow_unused=True)
                step = {k: (torch.zeros_like(theta[k]) if g is None else eta * g)
                        for k, g in zip(names, grads)}
                plus = outputs(step, 1.0)
                diff = plus - base if scheme == "forward" else (plus - outputs(step, -1.0)) / 2
                kernel[:, j] += (diff * cot[:, a]).sum(1) / eta
        return kernel
