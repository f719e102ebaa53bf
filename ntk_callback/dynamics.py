r"""What the kernel predicts: linearised training dynamics (pure functions, float64).

Conventions (Lee et al. 2019, "Wide neural networks of any depth evolve as linear models
under gradient descent"): the loss is ``L = 1/2 sum_i (f(x_i) - y_i)^2`` over the n
training points (a SUM, not a mean) and plain gradient descent with step ``lr`` runs for
``steps`` steps. Linearised around the initial parameters, the training residual
``r = f(X) - y`` and the outputs on other points x* evolve as

    r_t      = (I - lr K)^t r_0                           = sum_i (1 - lr l_i)^t (q_i . r_0) q_i
    f_t(x*)  = f_0(x*) - K(x*, X) sum_{s<t} lr r_s
             = f_0(x*) - K(x*, X) sum_i [(1 - (1 - lr l_i)^t) / l_i] (q_i . r_0) q_i

with (l_i, q_i) the eigenpairs of the symmetrised K = K(X, X); for l_i = 0 the bracket is
``lr t``, and for t -> infinity it is ``1 / l_i`` (kernel regression with the pseudo-
inverse). With PyTorch's ``mse_loss`` (mean over a batch of B points and O outputs) one
SGD step with learning rate ``eta`` moves the residual, in expectation over batches drawn
from M training points, like the SUM loss with ``lr = 2 * eta / (M * O)``; see
:func:`sum_loss_lr`.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

from . import analysis as A

ArrayLike = Union[torch.Tensor, np.ndarray]


def _f64(x: ArrayLike, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"`{what}` contains NaN or inf.")
    return t


def _check_lr_steps(lr: float, steps: int | None) -> None:
    if not math.isfinite(float(lr)) or float(lr) < 0:
        raise ValueError(f"lr must be a finite non-negative number; got {lr!r}.")
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 0):
        raise ValueError("steps must be a non-negative integer or None (infinite time); "
                         f"got {steps!r}.")


def sum_loss_lr(lr: float, num_train: int, num_outputs: int = 1, reduction: str = "mean") -> float:
    """Learning rate in the SUM-loss convention of this module for an optimizer step ``lr``.

    ``reduction="mean"``: PyTorch ``mse_loss`` averaged over a batch of B points and O
    outputs, ``(1/(B O)) sum (f - y)^2``; its gradient is ``2/(B O) sum J^T r``. Averaged
    over batches drawn uniformly from ``num_train`` points, a step moves every residual
    like ``2 lr / (num_train * O)`` times the sum-loss step (exact for full-batch GD).
    ``reduction="sum"``: ``sum (f - y)^2`` -> ``2 lr``; ``reduction="half_sum"`` -> ``lr``.
    """
    if reduction == "mean":
        return 2.0 * float(lr) / (int(num_train) * int(num_outputs))
    if reduction == "sum":
        return 2.0 * float(lr)
    if reduction == "half_sum":
        return float(lr)
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'half_sum'.")


def _gain(lam: torch.Tensor, lr: float, steps: int | None) -> torch.Tensor:
    """sum_{s<t} lr (1 - lr l)^s per eigenvalue (the 'time integral' of each mode)."""
    tol = lam.shape[0] * torch.finfo(torch.float64).eps * max(float(lam.max()), 0.0)
    pos = lam > tol
    out = torch.zeros_like(lam)
    if steps is None:
        out[pos] = 1.0 / lam[pos]
        return out
    out[pos] = (1.0 - torch.pow(1.0 - lr * lam[pos], int(steps))) / lam[pos]
    out[~pos] = lr * int(steps)
    return out


def linearized_predictions(K_train: ArrayLike, K_cross: ArrayLike, f0_train: ArrayLike,
                           f0_test: ArrayLike, y_train: ArrayLike, lr: float = 1.0,
                           steps: int | None = None) -> torch.Tensor:
    """Outputs on test points of the network linearised at initialisation after ``steps``
    steps of gradient descent on ``1/2 sum (f - y)^2`` (``steps=None``: the t -> infinity
    limit, kernel regression ``f0(x*) + K(x*, X) K^+ (y - f0(X))``).

    Shapes: K_train (n, n), K_cross (m, n) = K(x*, X), f0_train / y_train (n,) or (n, O),
    f0_test (m,) or (m, O) -> float64 tensor shaped like f0_test. Each output column evolves
    under the same kernel (exact for target-mode kernels of scalar models, and for
    K (x) I_O full kernels). Source: Lee et al. 2019, eq. (9)-(10); Jacot et al. 2018.
    """
    _check_lr_steps(lr, steps)
    Ks = A._kernel(K_train, "K_train")
    n = Ks.shape[0]
    Kx = _f64(K_cross, "K_cross")
    if Kx.dim() != 2 or Kx.shape[1] != n:
        raise ValueError(f"K_cross must have shape (m, {n}); got {tuple(Kx.shape)}.")
    f0 = _f64(f0_train, "f0_train")
    r0 = f0 - _f64(y_train, "y_train").reshape(f0.shape)
    f0t = _f64(f0_test, "f0_test")
    if r0.shape[0] != n or f0t.shape[0] != Kx.shape[0]:
        raise ValueError("f0_train/y_train must have n rows and f0_test m rows, matching the "
                         "kernels.")
    lam, Q = A._eigh_desc(Ks)
    g = _gain(lam.clamp_min(0.0), float(lr), steps)
    coeff = Q.T @ r0
    coeff = coeff * (g if r0.dim() == 1 else g[:, None])
    return f0t - Kx @ (Q @ coeff)


def linearization_gap(f_actual: ArrayLike, f_linear: ArrayLike,
                      f_init: ArrayLike | None = None) -> float:
    """How far the trained network is from its linearisation (lazy vs rich regime).

    ``||f_actual - f_linear|| / ||f_actual - f_init||`` when ``f_init`` is given (the
    share of the actual change of the outputs that the linear model misses: ~0 in the
    lazy/kernel regime, O(1) in the rich/feature-learning regime; Chizat & Bach 2018),
    else ``||f_actual - f_linear|| / ||f_actual||``. Frobenius norms; NaN when the
    denominator is 0.
    """
    fa = _f64(f_actual, "f_actual")
    fl = _f64(f_linear, "f_linear").reshape(fa.shape)
    den = fa - _f64(f_init, "f_init").reshape(fa.shape) if f_init is not None else fa
    d = float(den.norm())
    return float((fa - fl).norm()) / d if d > 0 else float("nan")


def mode_time_constants(K: ArrayLike, lr: float) -> torch.Tensor:
    """Steps per e-fold of every eigenmode under linearised GD, ``-1 / log|1 - lr l_i|``,
    descending eigenvalue order (float64, (N,)); ``inf`` for modes that do not decay
    (l_i = 0, or |1 - lr l_i| >= 1: diverging when lr l_i > 2)."""
    _check_lr_steps(lr, 0)
    lam = A.eigenvalues(K)
    factor = (1.0 - float(lr) * lam).abs()
    out = torch.full_like(lam, float("inf"))
    ok = (factor < 1.0) & (factor > 0.0)
    out[ok] = -1.0 / torch.log(factor[ok])
    out[factor == 0.0] = 0.0
    return out


def _mode_energies(K: ArrayLike, r: ArrayLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped eigenvalues (descending) and the residual energy (q_i . r)^2 of each mode
    (summed over columns for an (N, O) residual)."""
    lam, Q = A._eigh_desc(A._kernel(K))
    c2 = (Q.T @ _f64(r, name)) ** 2
    return lam.clamp_min(0.0), (c2 if c2.dim() == 1 else c2.sum(1))


def steps_to_reduce(K: ArrayLike, r0: ArrayLike, lr: float, factor: float) -> float:
    """Fewest GD steps t with ``||r_t|| <= factor * ||r_0||`` under the linearised dynamics
    (:func:`ntk_callback.analysis.predicted_residual`); ``inf`` when it is never reached
    (energy in non-decaying or diverging modes). ``0 < factor <= 1``.

    A frozen-kernel estimate, not a forecast: it assumes K stays as it is for all t steps.
    A network whose kernel grows or aligns with the residual while it trains gets there
    sooner (the sine-regression example halves its residual in ~245 steps where the
    kernel at step 0 says 857)."""
    if not 0.0 < float(factor) <= 1.0:
        raise ValueError(f"factor must be in (0, 1]; got {factor!r}.")
    _check_lr_steps(lr, 0)
    lam, c2 = _mode_energies(K, r0, "r0")
    total = float(c2.sum())
    if total == 0.0:
        return 0.0
    rate = (1.0 - float(lr) * lam).abs()
    target = float(factor) ** 2 * total
    stuck = float(c2[rate >= 1.0].sum())
    if stuck > target * (1 + 1e-12):
        return float("inf")

    def energy(t: int) -> float:
        return float((c2 * rate ** (2 * t)).sum())

    if energy(0) <= target:
        return 0.0
    hi = 1
    while energy(hi) > target:
        hi *= 2
        if hi > 2**62:
            return float("inf")
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if energy(mid) > target else (lo, mid)
    return float(hi)


def slowest_modes(K: ArrayLike, r: ArrayLike, lr: float, k: int = 3) -> list[dict[str, float]]:
    """The ``k`` modes holding residual energy that decay slowest under linearised GD:
    ``[{"eigenvalue", "energy" (share of ||r||^2), "time_constant" (steps per e-fold)}]``,
    slowest first; modes with < 1e-12 of the energy are ignored."""
    lam, c2 = _mode_energies(K, r, "r")
    total = float(c2.sum())
    if total == 0.0:
        return []
    tau = mode_time_constants(K, lr)
    idx = [i for i in range(lam.shape[0]) if float(c2[i]) / total > 1e-12]
    idx.sort(key=lambda i: (-float(tau[i]), float(lam[i])))
    return [{"eigenvalue": float(lam[i]), "energy": float(c2[i]) / total,
             "time_constant": float(tau[i])} for i in idx[:k]]


__all__ = ["linearization_gap", "linearized_predictions", "mode_time_constants",
           "slowest_modes", "steps_to_reduce", "sum_loss_lr"]
