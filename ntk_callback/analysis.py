"""Pure functions that turn an empirical NTK into the numbers a researcher reads.

Everything here is plain PyTorch (no Lightning, no engine import) and follows the
conventions below exactly:

* Inputs may be ``torch.Tensor`` or ``numpy.ndarray`` (kernels, targets, residuals), on
  any device and of any real dtype. They are copied to the CPU in float64: kernels are
  N x N with N the number of probes, so a float64 CPU eigendecomposition is both exact
  to the last digit and cheaper than a GPU round trip.
* A kernel ``K`` of shape (N, N) is symmetrised first, ``Ks = (K + K^T) / 2``, and every
  metric is computed on ``Ks`` (only :func:`symmetry_residual` looks at the raw ``K``).
* ``lambda`` denotes the eigenvalues of ``Ks`` in descending order with negative values
  (round-off) clamped to 0; the most negative raw value is :func:`min_raw_eigenvalue`.
* Scalars are returned as Python ``float``; vectors as float64 CPU ``torch.Tensor``.
* A value that is mathematically undefined (an all-zero kernel, a single class) is
  returned as ``nan``, never raised; alignment functions also emit an
  :class:`AlignmentUndefinedWarning` naming the cause. Bad input (non-square kernel,
  NaN/inf entries, targets of the wrong length) raises ``ValueError``.

A kernel of ``mode="full"`` (shape (N, N, O, O)) must be reduced to (N, N) first, e.g.
``K.diagonal(dim1=2, dim2=3).sum(-1)`` for the ``trace`` kernel.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

#: float64 machine epsilon; ``N * EPS64 * lambda_max`` is the numerical-zero threshold
#: for eigenvalues (the size of round-off in a float64 eigendecomposition of an N x N
#: matrix).
EPS64: float = float(torch.finfo(torch.float64).eps)

__all__ = [
    "AlignmentUndefinedWarning",
    "alignment_chance_level",
    "EPS64",
    "EigenvalueHistogram",
    "centered_kernel_alignment",
    "condition_number",
    "effective_dimension",
    "effective_rank",
    "eigenvalues",
    "entropy_effective_rank",
    "frobenius_norm",
    "kernel_distance",
    "kernel_target_alignment",
    "lambda_max",
    "lambda_min",
    "log10_condition_number",
    "log10_eigenvalue_histogram",
    "log10_scale_change",
    "min_raw_eigenvalue",
    "predicted_residual",
    "relative_change",
    "residual_spectral_energy",
    "symmetry_residual",
    "trace",
]


class AlignmentUndefinedWarning(RuntimeWarning):
    """An alignment was requested where it is undefined (0/0); the result is NaN.

    Typical causes: every probe has the same class label (or all regression targets are
    equal), a single probe, or an all-zero (or, for CKA, constant) kernel.
    """


class EigenvalueHistogram(NamedTuple):
    """Histogram of ``log10(lambda)`` over the numerically non-zero eigenvalues.

    counts:   int64 tensor (bins,), how many eigenvalues fall in each bin
    edges:    float64 tensor (bins + 1,), bin edges in log10 units (``numpy.histogram``
              conventions: the last bin is closed on the right)
    num_zero: eigenvalues ``<= N * EPS64 * lambda_max`` (numerically zero, including
              clamped negatives); their log10 is -inf, so they are counted here instead
    """

    counts: torch.Tensor
    edges: torch.Tensor
    num_zero: int


# --------------------------------------------------------------------------- input


def _to_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    """Detached CPU tensor of ``x`` (dtype kept), or a ValueError naming ``what``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.ascontiguousarray(x))  # copies negative-stride views
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{what} must be a torch.Tensor or numpy array of numbers; got {type(x).__name__} "
                f"that cannot be converted ({err})."
            ) from err
    if t.is_complex():
        raise ValueError(f"{what} is complex ({t.dtype}); the NTK analysis needs a real array.")
    return t.cpu()


def _raw_kernel(K: ArrayLike, name: str = "K") -> torch.Tensor:
    """Validated float64 CPU copy of a square kernel (not symmetrised)."""
    t = _to_tensor(K, f"kernel {name}")
    if t.ndim == 4 and t.shape[0] == t.shape[1] and t.shape[2] == t.shape[3]:
        raise ValueError(
            f"kernel {name} has shape {tuple(t.shape)}, a mode='full' (N, N, O, O) kernel; the "
            "analysis needs an (N, N) kernel. Reduce it first, e.g. "
            "K.diagonal(dim1=2, dim2=3).sum(-1) for the trace kernel, or compute with "
            "mode='target'."
        )
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(
            f"kernel {name} must be a square (N, N) matrix; got shape {tuple(t.shape)}."
        )
    if t.shape[0] == 0:
        raise ValueError(f"kernel {name} is empty (0 x 0); the analysis needs at least one probe.")
    t = t.to(dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"kernel {name} has {bad} NaN/inf entries; the model's outputs or gradients "
            "overflowed. Check the model for non-finite outputs, or compute the kernel with "
            "dtype=torch.float64."
        )
    return t


def _sym(K: torch.Tensor) -> torch.Tensor:
    return (K + K.T) / 2


def _kernel(K: ArrayLike, name: str = "K") -> torch.Tensor:
    """Validated, symmetrised float64 kernel ``Ks = (K + K^T) / 2``."""
    return _sym(_raw_kernel(K, name))


def _raw_eigenvalues_desc(Ks: torch.Tensor) -> torch.Tensor:
    """Raw (unclamped) eigenvalues of a symmetric float64 matrix, descending."""
    return torch.flip(torch.linalg.eigvalsh(Ks), dims=(0,))


def _eigh_desc(Ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_raw, Q)``: raw eigenvalues descending and eigenvectors as columns of Q."""
    lam, Q = torch.linalg.eigh(Ks)
    return torch.flip(lam, dims=(0,)), torch.flip(Q, dims=(1,))


def _residual(r: ArrayLike, n: int, name: str) -> torch.Tensor:
    """Validated float64 residual of shape (N,) or (N, O)."""
    t = _to_tensor(r, name)
    if t.ndim not in (1, 2) or t.shape[0] != n:
        raise ValueError(
            f"{name} must have shape (N,) or (N, O) with N = {n} (the kernel size); got "
            f"{tuple(t.shape)}."
        )
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN/inf entries.")
    return t


def _target_matrix(
    targets: ArrayLike, n: int, num_classes: int | None
) -> tuple[torch.Tensor, bool]:
    """``(Y, is_labels)``: the raw (uncentred) float64 target matrix of shape (N, C).

    1-D integer (or bool) targets are class labels and become one-hot rows with
    C = ``num_classes`` (default ``max(label) + 1``). Floating targets of shape (N,) or
    (N, O) (and 2-D integer arrays) are used as given, (N,) as one column.
    """
    t = _to_tensor(targets, "targets")
    if t.ndim == 0 or t.ndim > 2:
        raise ValueError(
            f"targets must have shape (N,) (class labels or scalar regression targets) or (N, O); "
            f"got {tuple(t.shape)}."
        )
    if t.shape[0] != n:
        raise ValueError(
            f"targets has {t.shape[0]} entries but the kernel is {n} x {n}; pass the targets of "
            "exactly the probes the kernel was computed on, in the same order."
        )
    is_labels = t.ndim == 1 and not t.is_floating_point()
    if is_labels:
        labels = t.to(torch.int64)
        lo, hi = int(labels.min()), int(labels.max())
        if num_classes is None:
            num_classes = hi + 1
        elif int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
        num_classes = int(num_classes)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"class labels must lie in [0, num_classes) = [0, {num_classes}); got labels in "
                f"[{lo}, {hi}]. Pass num_classes= large enough, or remap the labels."
            )
        Y = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
        return Y, True
    Y = t.to(torch.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if not bool(torch.isfinite(Y).all()):
        raise ValueError("targets contain NaN/inf entries.")
    return Y, False


# ------------------------------------------------------------------ spectrum


def eigenvalues(K: ArrayLike) -> torch.Tensor:
    """Eigenvalues of ``Ks = (K + K^T)/2``, descending, negatives clamped to 0.

    Shapes: K (N, N) -> float64 tensor (N,). Negative eigenvalues of a PSD kernel are
    round-off; their most negative raw value is :func:`min_raw_eigenvalue`.
    """
    return _raw_eigenvalues_desc(_kernel(K)).clamp_min(0.0)


def min_raw_eigenvalue(K: ArrayLike) -> float:
    """Smallest raw (unclamped) eigenvalue of ``Ks``; negative values are round-off.

    A value far below ``-N * EPS64 * lambda_max`` means the kernel is not PSD (for an NTK:
    a bug or a float32 kernel). K (N, N) -> float.
    """
    return float(_raw_eigenvalues_desc(_kernel(K))[-1])


def lambda_max(K: ArrayLike) -> float:
    """Largest eigenvalue of ``Ks`` (clamped at 0). K (N, N) -> float."""
    return float(eigenvalues(K)[0])


def lambda_min(K: ArrayLike) -> float:
    """Smallest eigenvalue of ``Ks``, negatives clamped to 0. K (N, N) -> float."""
    return float(eigenvalues(K)[-1])


def _condition_from(lam: torch.Tensor) -> float:
    n = lam.shape[0]
    lmax, lmin = float(lam[0]), float(lam[-1])
    if lmax <= 0.0:
        return math.nan  # all-zero kernel: 0 / 0
    if lmin <= n * EPS64 * lmax:
        return math.inf
    return lmax / lmin


def _log10_condition_from(lam: torch.Tensor) -> float:
    n = lam.shape[0]
    lmax, lmin = float(lam[0]), float(lam[-1])
    if lmax <= 0.0:
        return math.nan
    return math.log10(lmax / max(lmin, n * EPS64 * lmax))


def condition_number(K: ArrayLike) -> float:
    """Spectral condition number ``kappa = lambda_max / lambda_min`` of ``Ks``.

    Returns ``inf`` when ``lambda_min <= N * EPS64 * lambda_max`` (numerically singular:
    lambda_min is below float64 round-off of an N x N eigendecomposition), and ``nan``
    for an all-zero kernel (0 / 0). K (N, N) -> float. A float32 kernel carries noise of
    ~1e-7 * lambda_max, so its kappa saturates near 1e7 / N rather than reaching inf.
    """
    return _condition_from(eigenvalues(K))


def log10_condition_number(K: ArrayLike) -> float:
    """``log10(lambda_max / max(lambda_min, N * EPS64 * lambda_max))``, finite for singular K.

    Equals ``log10(condition_number(K))`` whenever that is finite; for a numerically
    singular kernel the denominator is floored at the round-off threshold, giving the
    ceiling ``log10(1 / (N * EPS64)) ~= 15.65 - log10(N)``, so loggers get a finite curve.
    ``nan`` for an all-zero kernel. K (N, N) -> float.
    """
    return _log10_condition_from(eigenvalues(K))


def trace(K: ArrayLike) -> float:
    """``tr(K) = sum_i K_ii = sum_i lambda_i`` (raw eigenvalues). K (N, N) -> float."""
    return float(torch.diagonal(_raw_kernel(K)).sum())


def frobenius_norm(K: ArrayLike) -> float:
    """``||Ks||_F = sqrt(sum_ij Ks_ij^2)``. K (N, N) -> float."""
    return float(torch.linalg.matrix_norm(_kernel(K)))


def symmetry_residual(K: ArrayLike) -> float:
    """``||K - K^T||_F / ||K||_F`` on the raw K (round-off asymmetry of the engine).

    0.0 for an exactly symmetric kernel, including the all-zero kernel. K (N, N) -> float.
    """
    raw = _raw_kernel(K)
    num = float(torch.linalg.matrix_norm(raw - raw.T))
    if num == 0.0:
        return 0.0
    return num / float(torch.linalg.matrix_norm(raw))


def _effective_rank_from(lam: torch.Tensor) -> float:
    s = float(lam.sum())
    if s <= 0.0:
        return math.nan
    return s * s / float((lam * lam).sum())


def _entropy_effective_rank_from(lam: torch.Tensor) -> float:
    s = float(lam.sum())
    if s <= 0.0:
        return math.nan
    p = lam / s
    p = p[p > 0]  # 0 log 0 = 0
    return math.exp(-float((p * torch.log(p)).sum()))


def effective_rank(K: ArrayLike) -> float:
    """Participation ratio ``(sum_i lambda_i)^2 / sum_i lambda_i^2``, in [1, N].

    The standard participation-ratio dimensionality (e.g. Gao et al. 2017, "A theory of
    multineuronal dimensionality, dynamics and measurement"). ``nan`` for an all-zero
    kernel. K (N, N) -> float.
    """
    return _effective_rank_from(eigenvalues(K))


def entropy_effective_rank(K: ArrayLike) -> float:
    """Entropy effective rank ``exp(-sum_i p_i log p_i)``, ``p_i = lambda_i / sum_j lambda_j``.

    Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"
    (EUSIPCO). In [1, N]; ``0 log 0 = 0``; ``nan`` for an all-zero kernel.
    K (N, N) -> float.
    """
    return _entropy_effective_rank_from(eigenvalues(K))


def effective_dimension(K: ArrayLike, gamma: float) -> float:
    """Effective dimension ``sum_i lambda_i / (lambda_i + gamma)`` of K (not K / N).

    The degrees of freedom of kernel ridge regression with ridge ``gamma`` (Zhang 2005,
    "Learning bounds for kernel regression using effective data dimensionality").
    ``gamma > 0``; 0.0 for an all-zero kernel. K (N, N) -> float.
    """
    g = float(gamma)
    if not math.isfinite(g) or g <= 0.0:
        raise ValueError(f"gamma must be a finite positive number; got {gamma!r}.")
    lam = eigenvalues(K)
    return float((lam / (lam + g)).sum())


def _histogram_from(lam: torch.Tensor, bins: int) -> EigenvalueHistogram:
    n = lam.shape[0]
    lmax = float(lam[0])
    positive = lam[lam > n * EPS64 * lmax] if lmax > 0 else lam[:0]
    counts, edges = np.histogram(np.log10(positive.numpy()), bins=bins)
    return EigenvalueHistogram(
        counts=torch.from_numpy(counts.astype(np.int64)),
        edges=torch.from_numpy(edges.astype(np.float64)),
        num_zero=n - int(positive.shape[0]),
    )


def log10_eigenvalue_histogram(K: ArrayLike, bins: int = 20) -> EigenvalueHistogram:
    """Histogram of ``log10(lambda_i)`` over eigenvalues ``> N * EPS64 * lambda_max``.

    ``bins`` equal-width bins spanning the smallest to the largest such log10 value
    (``numpy.histogram`` conventions: +-0.5 around a single value, [0, 1] when there is
    none). Numerically-zero eigenvalues are counted in ``num_zero``. K (N, N) ->
    :class:`EigenvalueHistogram`.
    """
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins!r}.")
    return _histogram_from(eigenvalues(K), int(bins))


# ----------------------------------------------------------------- alignment


def _undefined_target_reason(Y: torch.Tensor, is_labels: bool) -> str:
    n = Y.shape[0]
    if n == 1:
        return "there is only one probe, so the centred targets are zero"
    if is_labels:
        return (
            f"all {n} probes have the same class label (a single class), so the centred "
            "label kernel YY^T is zero"
        )
    return f"all {n} targets are equal, so the centred target kernel YY^T is zero"


def _alignment(
    Ks: torch.Tensor,
    Y: torch.Tensor,
    is_labels: bool,
    *,
    center_targets: bool,
    center_kernel: bool,
    chance: bool = False,
) -> tuple[float, str | None]:
    """``(alignment, None)`` or ``(nan, reason)`` when it is 0/0.

    alignment = <A, B>_F / (||A||_F ||B||_F) with A = Ks (or H Ks H) and B = Yc Yc^T;
    ``chance``: its mean over all permutations of the targets (see
    :func:`alignment_chance_level`).
    """
    n = Ks.shape[0]
    if center_targets:
        # Exactly equal rows centre to exactly zero in exact arithmetic; decide that before
        # subtracting so that round-off of the mean cannot fake a non-zero target kernel.
        if bool((Y == Y[0]).all()):
            return math.nan, _undefined_target_reason(Y, is_labels)
        Y = Y - Y.mean(dim=0, keepdim=True)
    T = Y @ Y.T
    norm_t = float(torch.linalg.matrix_norm(T))
    if norm_t == 0.0:
        return math.nan, "all targets are zero, so the target kernel YY^T is zero"
    A = Ks
    norm_k_raw = float(torch.linalg.matrix_norm(Ks))
    if norm_k_raw == 0.0:
        return math.nan, "the kernel is all zeros"
    if center_kernel:
        H = torch.eye(n, dtype=torch.float64) - 1.0 / n
        A = H @ Ks @ H
        norm_a = float(torch.linalg.matrix_norm(A))
        # HKH of a constant kernel c 11^T is zero up to round-off ~ N eps ||K||.
        if norm_a <= n * EPS64 * norm_k_raw:
            return math.nan, (
                "the centred kernel HKH is zero (K is constant, e.g. a single probe or "
                "identical probes)"
            )
    else:
        norm_a = norm_k_raw
    if chance:
        # E over uniform permutations P of <A, P T P^T>: every diagonal entry of P T P^T
        # averages tr T / N, every off-diagonal one (1^T T 1 - tr T) / (N (N - 1)).
        tr_a, tr_t = float(torch.diagonal(A).sum()), float(torch.diagonal(T).sum())
        off_t = (float(T.sum()) - tr_t) / (n * (n - 1)) if n > 1 else 0.0
        inner = tr_t / n * tr_a + off_t * (float(A.sum()) - tr_a)
        return inner / (norm_a * norm_t), None
    return float((A * T).sum()) / (norm_a * norm_t), None


def alignment_chance_level(
    K: ArrayLike,
    targets: ArrayLike,
    *,
    centered: bool = True,
    center_kernel: bool = False,
    num_classes: int | None = None,
) -> float:
    """The alignment ``K`` has with labels that carry no information: the mean of the
    alignment over all N! permutations of ``targets`` (same class counts, random order).

    With ``T = Yc Yc^T`` (or ``Y Y^T`` when not ``centered``) and ``A = Ks`` (``H Ks H``
    with ``center_kernel``), a permutation moves T's diagonal entries to the diagonal and
    its off-diagonal ones off it, so in closed form
    ``E <A, P T P^T> = (tr T / N) tr A + (1^T T 1 - tr T) / (N (N - 1)) (1^T A 1 - tr A)``
    and the norms do not change. Defaults give the chance level of
    :func:`kernel_target_alignment`; ``center_kernel=True`` that of
    :func:`centered_kernel_alignment`. It is not 0: a kernel with a strong diagonal
    (high effective rank) has chance KTA up to ``sqrt((C - 1) / N)`` (C balanced classes,
    K = I), and CKA's chance level is ~0.1-0.25 for N = 128, C = 10. An alignment is
    evidence of learning only well above it. K (N, N), targets as in
    :func:`kernel_target_alignment` -> float (NaN where the alignment is undefined).
    """
    Ks = _kernel(K)
    Y, is_labels = _target_matrix(targets, Ks.shape[0], num_classes)
    value, reason = _alignment(
        Ks, Y, is_labels, center_targets=centered, center_kernel=center_kernel, chance=True
    )
    if reason is not None:
        _warn_undefined("alignment_chance_level", reason)
    return value


def _warn_undefined(fn: str, reason: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{fn} is undefined and was set to NaN: {reason}. Use probes from at least two "
        "classes (or with varying targets) and a non-degenerate kernel.",
        AlignmentUndefinedWarning,
        stacklevel=stacklevel,
    )


def kernel_target_alignment(
    K: ArrayLike,
    targets: ArrayLike,
    num_classes: int | None = None,
    centered: bool = True,
) -> float:
    """Kernel-target alignment ``<Ks, YY^T>_F / (||Ks||_F ||YY^T||_F)``, in [-1, 1].

    Cristianini, Shawe-Taylor, Elisseeff & Kandola 2001, "On kernel-target alignment".

    Shapes: K (N, N); targets (N,) int class labels -> Y (N, C) one-hot with
    C = ``num_classes`` (default max label + 1; classes absent from the probes add zero
    columns and do not change the value), or (N,) / (N, O) float regression targets ->
    Y (N, 1) / (N, O). ``centered=True`` (the default) subtracts each column's mean from
    Y, so a constant offset of the targets does not count as alignment; ``centered=False``
    uses the raw Y. K itself is not centred (see :func:`centered_kernel_alignment`).

    Returns ``nan`` with an :class:`AlignmentUndefinedWarning` when it is 0/0: all probes
    of one class or all targets equal (centred), N = 1 (centred), all-zero targets
    (uncentred) or an all-zero kernel.
    """
    Ks = _kernel(K)
    Y, is_labels = _target_matrix(targets, Ks.shape[0], num_classes)
    value, reason = _alignment(Ks, Y, is_labels, center_targets=centered, center_kernel=False)
    if reason is not None:
        _warn_undefined("kernel_target_alignment", reason)
    return value


def centered_kernel_alignment(
    K: ArrayLike, targets: ArrayLike, num_classes: int | None = None
) -> float:
    """Centred kernel alignment ``<HKsH, HYY^TH>_F / (||HKsH||_F ||HYY^TH||_F)``.

    Cortes, Mohri & Rostamizadeh 2012, "Algorithms for learning kernels based on centered
    alignment" (JMLR). ``H = I - 11^T / N``; targets as in
    :func:`kernel_target_alignment` (``H Y`` is the column-mean-subtracted Y).
    Shapes: K (N, N), targets (N,) or (N, O) -> float in [-1, 1].

    ``nan`` with an :class:`AlignmentUndefinedWarning` when all probes share one class /
    all targets are equal, N = 1, or ``HKsH`` vanishes (K constant or all zero).
    """
    Ks = _kernel(K)
    Y, is_labels = _target_matrix(targets, Ks.shape[0], num_classes)
    value, reason = _alignment(Ks, Y, is_labels, center_targets=True, center_kernel=True)
    if reason is not None:
        _warn_undefined("centered_kernel_alignment", reason)
    return value


# --------------------------------------------------------------------- drift


def _pair(K_t: ArrayLike, K_0: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _kernel(K_t, "K_t"), _kernel(K_0, "K_0")
    if a.shape != b.shape:
        raise ValueError(
            f"K_t has shape {tuple(a.shape)} but K_0 has {tuple(b.shape)}; drift needs both "
            "kernels on the same probes (same N, same order)."
        )
    return a, b


def relative_change(K_t: ArrayLike, K_0: ArrayLike) -> float:
    """Relative kernel change ``||K_t - K_0||_F / ||K_0||_F`` (both symmetrised).

    The lazy-training diagnostic of Lee et al. 2019 ("Wide neural networks of any depth
    evolve as linear models under gradient descent"): ~0 in the kernel regime.
    K_t, K_0 (N, N) -> float; ``nan`` when K_0 is all zeros.
    """
    a, b = _pair(K_t, K_0)
    denom = float(torch.linalg.matrix_norm(b))
    if denom == 0.0:
        return math.nan
    return float(torch.linalg.matrix_norm(a - b)) / denom


def kernel_distance(K_t: ArrayLike, K_0: ArrayLike) -> float:
    """Kernel distance ``1 - <K_t, K_0>_F / (||K_t||_F ||K_0||_F)``, in [0, 2].

    Fort, Dziugaite, Paul, Kharaghani, Roy & Ganguli 2020, "Deep learning versus kernel
    learning: an empirical study of loss landscape geometry and the time evolution of the
    Neural Tangent Kernel". Computed as the identical ``||K_t/||K_t|| - K_0/||K_0|| ||_F^2 / 2``
    which keeps full relative precision when the kernels are nearly parallel (no
    cancellation in ``1 - cos``). K_t, K_0 (N, N) -> float; ``nan`` if either is all zero.
    """
    a, b = _pair(K_t, K_0)
    na, nb = float(torch.linalg.matrix_norm(a)), float(torch.linalg.matrix_norm(b))
    if na == 0.0 or nb == 0.0:
        return math.nan
    return 0.5 * float(torch.linalg.matrix_norm(a / na - b / nb)) ** 2


def log10_scale_change(K_t: ArrayLike, K_0: ArrayLike) -> float:
    """Change of the kernel's overall scale, ``log10(tr K_t / tr K_0)``.

    0: same scale; +1: ten times larger. The trace is the sum of the eigenvalues (the
    kernel's total "speed"), so this separates a change of scale from the change of shape
    that :func:`kernel_distance` measures. Eval-mode kernels of BatchNorm networks move
    by orders of magnitude when the running statistics leave their initial values (mean
    0, variance 1), which dominates :func:`relative_change`. K_t, K_0 (N, N) -> float;
    ``nan`` when either trace is not positive.
    """
    a, b = _pair(K_t, K_0)
    ta, tb = float(torch.diagonal(a).sum()), float(torch.diagonal(b).sum())
    if not (ta > 0.0 and tb > 0.0):
        return math.nan
    return math.log10(ta) - math.log10(tb)


# ------------------------------------------------------------------ dynamics


def residual_spectral_energy(K: ArrayLike, r: ArrayLike, k: int) -> float:
    """Fraction of the residual's energy in the top-k eigendirections of Ks.

    ``sum_{i<=k} (q_i . r)^2 / ||r||^2`` with q_i the unit eigenvectors of Ks in
    descending eigenvalue order. Under linearised gradient descent the component along q_i
    decays at rate lambda_i (Arora, Du, Hu, Li & Wang 2019, "Fine-grained analysis of
    optimization and generalization for overparameterized two-layer neural networks"), so a
    high value means fast initial progress. Shapes: K (N, N), r (N,) or (N, O) (then
    ``sum_o`` over columns in numerator and denominator, i.e. ``||Q_k^T R||_F^2 / ||R||_F^2``);
    ``0 <= k``, k > N is treated as N. ``nan`` for r = 0. Within a degenerate eigenspace
    cut by k the split is basis-dependent (only whole eigenspaces are well defined).
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer; got {k!r}.")
    Ks = _kernel(K)
    rr = _residual(r, Ks.shape[0], "r")
    total = float((rr * rr).sum())
    if total == 0.0:
        return math.nan
    _, Q = _eigh_desc(Ks)
    top = Q[:, : int(k)].T @ rr
    return float((top * top).sum()) / total


def predicted_residual(K: ArrayLike, r0: ArrayLike, lr: float, steps: int) -> torch.Tensor:
    """Residual after ``steps`` of linearised gradient descent: ``(I - lr Ks)^steps r0``.

    Lee et al. 2019, "Wide neural networks of any depth evolve as linear models under
    gradient descent": for the loss ``1/2 sum_i (f(x_i) - y_i)^2`` (a SUM, not a mean) the
    linearised network's residual r = f - y obeys ``r_{t+1} = r_t - lr K r_t``, so

        r_steps = sum_i (1 - lr lambda_i)^steps (q_i . r0) q_i

    with (lambda_i, q_i) the clamped eigenpairs of Ks. For the mean loss
    ``1/(2N) sum (f - y)^2`` pass ``lr / N``. Shapes: K (N, N), r0 (N,) or (N, O) (each
    column evolves under the same K, exact when the full kernel is K (x) I_O) -> float64
    tensor of r0's shape. ``lr >= 0`` and integer ``steps >= 0``; ``lr > 2 / lambda_max``
    diverges, as real GD would.
    """
    rate = float(lr)
    if not math.isfinite(rate) or rate < 0.0:
        raise ValueError(f"lr must be a finite non-negative number; got {lr!r}.")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}.")
    Ks = _kernel(K)
    rr = _residual(r0, Ks.shape[0], "r0")
    lam_raw, Q = _eigh_desc(Ks)
    gain = torch.pow(1.0 - rate * lam_raw.clamp_min(0.0), int(steps))
    coeff = Q.T @ rr
    coeff = coeff * (gain if rr.ndim == 1 else gain[:, None])
    return Q @ coeff
