"""Label-free kernels for alignment: the trace kernel, exactly or from random projections.

The target-mode kernel ``K[i, j] = <df_{t_i}(x_i)/dθ, df_{t_j}(x_j)/dθ>`` picks each
probe's own label logit, so the labels enter the kernel itself: its last-layer part is
``<h_i, h_j> [t_i = t_j]``, block-diagonal by class before any learning. Alignment with
the labels (KTA, CKA) must therefore be measured on a kernel that does not see them. Two
such kernels, both computed by :func:`~ntk_callback.engine.empirical_ntk`:

* the trace kernel ``K_tr = J J^T`` (``mode="trace"``, sum over the O outputs; J is the
  (N O) x P Jacobian), which costs O backward rows per probe;
* the projected kernel ``K_V = J V V^T J^T`` with ``V`` an (O, k) matrix of independent
  ``N(0, 1/k)`` entries: ``E[V V^T] = I_O``, so ``E[K_V] = K_tr`` (an unbiased estimate)
  at the cost of k rows per probe. It is ``empirical_ntk(model, x, mode="trace",
  output_fn=lambda out: out @ V)``: the trace kernel of the projected outputs.

:func:`output_projections` draws ``V`` from its own seeded ``torch.Generator`` on the CPU,
so the global RNG streams never move and the same ``(num_outputs, k, seed)`` always give
the same ``V`` (the kernel at initialisation and every later one use the same estimate).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def output_projections(num_outputs: int, k: int, seed: int,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(num_outputs, k) CPU tensor with entries ``N(0, 1) / sqrt(k)`` (so ``E[V V^T] = I``),
    drawn from ``torch.Generator().manual_seed(seed)`` (global RNGs untouched)."""
    if int(num_outputs) < 1 or int(k) < 1:
        raise ValueError(f"output_projections: num_outputs={num_outputs!r} and k={k!r} must "
                         "be >= 1.")
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(int(num_outputs), int(k), generator=gen, dtype=torch.float64)
    scaled: torch.Tensor = v / float(k) ** 0.5
    return scaled.to(dtype)


def projected_output_fn(V: torch.Tensor,
                        output_fn: Callable[[Any], torch.Tensor] | None = None
                        ) -> Callable[[Any], torch.Tensor]:
    """``out -> output_fn(out) @ V``: the (N, O) outputs projected to (N, k).

    ``V`` is moved to the outputs' device and dtype at every call (the engine may run the
    model in float64 or on a GPU). Used with ``mode="trace"`` it gives ``J V V^T J^T``."""
    if V.ndim != 2:
        raise ValueError(f"projected_output_fn: V must be (O, k); got shape {tuple(V.shape)}.")

    def fn(out: Any) -> torch.Tensor:
        if output_fn is not None:
            out = output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model's output is a {type(out).__name__}, not a tensor; pass "
                            "output_fn=... mapping it to (N, O) logits.")
        if out.ndim == 1:
            out = out.unsqueeze(-1)
        if out.shape[-1] != V.shape[0]:
            raise ValueError(f"the model has {out.shape[-1]} outputs per probe but the "
                             f"projections were drawn for {V.shape[0]}.")
        projected: torch.Tensor = out @ V.to(device=out.device, dtype=out.dtype)
        return projected

    return fn


__all__ = ["output_projections", "projected_output_fn"]
