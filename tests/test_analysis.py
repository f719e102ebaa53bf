"""Every metric of ntk_callback.analysis against an independent numpy/scipy computation.

The references below deliberately take other routes than the implementation (scipy's
LAPACK driver instead of torch.linalg, explicit loops, linear solves instead of
eigenvalues, explicit gradient-descent iteration instead of a spectral formula), so a
shared bug cannot cancel out.
"""
from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

import ntk_callback.analysis as A
from ntk_callback.analysis import AlignmentUndefinedWarning

RTOL = 1e-8
EPS = np.finfo(np.float64).eps
SIZES = [2, 5, 17, 64]


# ---------------------------------------------------------------- references


def random_psd(n: int, seed: int, rank: int | None = None) -> np.ndarray:
    """G G^T with a spread of column scales, so the spectrum spans a few decades."""
    rng = np.random.default_rng(seed)
    m = n + 3 if rank is None else rank
    G = rng.standard_normal((n, m)) * np.logspace(0, -1.5, m)
    return G @ G.T


def ref_eigs(K: np.ndarray) -> np.ndarray:
    Ks = (K + K.T) / 2
    w = scipy.linalg.eigh(Ks, eigvals_only=True, driver="evd")
    return np.maximum(w[::-1], 0.0)


def ref_onehot_centered(y: np.ndarray, C: int, center: bool = True) -> np.ndarray:
    Y = np.zeros((len(y), C))
    for i, c in enumerate(y):
        Y[i, c] = 1.0
    return Y - Y.mean(axis=0) if center else Y


def ref_alignment(K: np.ndarray, L: np.ndarray) -> float:
    # <K, L>_F via an explicit double loop over entries.
    n = K.shape[0]
    inner = sum(K[i, j] * L[i, j] for i in range(n) for j in range(n))
    return inner / (math.sqrt((K**2).sum()) * math.sqrt((L**2).sum()))


def ref_cka(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return ref_alignment(H @ K @ H, H @ L @ H)


def close(a: float, b: float, rtol: float = RTOL, atol: float = 0.0) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


# ------------------------------------------------------------------ spectrum


@pytest.mark.parametrize("n", SIZES)
def test_eigenvalues_and_spectral_scalars(n: int) -> None:
    K = random_psd(n, seed=n)
    lam_ref = ref_eigs(K)
    lam = A.eigenvalues(torch.from_numpy(K))
    assert lam.dtype == torch.float64 and lam.shape == (n,)
    assert torch.all(lam[:-1] >= lam[1:])
    np.testing.assert_allclose(lam.numpy(), lam_ref, rtol=RTOL, atol=0)

    assert isinstance(A.lambda_max(K), float)
    assert close(A.lambda_max(K), lam_ref[0]) and close(A.lambda_min(K), lam_ref[-1])
    kappa = lam_ref[0] / lam_ref[-1]
    assert close(A.condition_number(K), kappa)
    assert close(A.log10_condition_number(K), math.log10(kappa))
    assert close(A.min_raw_eigenvalue(K), np.linalg.eigvalsh(K).min())
    assert close(A.trace(K), sum(K[i, i] for i in range(n)))
    assert close(A.frobenius_norm(K), math.sqrt(sum(v * v for v in K.ravel())))
    assert A.symmetry_residual(K) == 0.0

    p = lam_ref / lam_ref.sum()
    assert close(A.effective_rank(K), 1.0 / (p**2).sum())
    assert close(A.entropy_effective_rank(K), math.exp(scipy.stats.entropy(p)))
    for gamma in (1e-3, 0.7, 50.0):
        # tr(K (K + gamma I)^-1) by a linear solve, not by eigenvalues.
        ref = np.trace(np.linalg.solve(K + gamma * np.eye(n), K))
        assert close(A.effective_dimension(K, gamma), ref)


def test_effective_ranks_of_known_spectra() -> None:
    assert close(A.effective_rank(np.eye(7)), 7.0)
    assert close(A.entropy_effective_rank(np.eye(7)), 7.0)
    v = np.arange(1.0, 6.0)
    rank_one = np.outer(v, v)
    assert close(A.effective_rank(rank_one), 1.0)
    assert close(A.entropy_effective_rank(rank_one), 1.0, atol=1e-12)
    assert close(A.effective_dimension(np.eye(4) * 3.0, 1.0), 4 * 0.75)


def test_singular_kernel_condition_inf_log10_finite() -> None:
    n = 12
    K = random_psd(n, seed=3, rank=5)  # rank 5 < 12: lambda_min is pure round-off
    assert A.condition_number(K) == math.inf
    log10_kappa = A.log10_condition_number(K)
    assert math.isfinite(log10_kappa)
    assert close(log10_kappa, -math.log10(n * EPS), rtol=1e-12)
    # All-ones kernel: exact rank one with exact zero eigenvalues.
    ones = np.ones((6, 6))
    assert A.condition_number(ones) == math.inf
    assert close(A.log10_condition_number(ones), -math.log10(6 * EPS), rtol=1e-12)
    assert A.lambda_min(ones) >= 0.0


def test_condition_threshold_is_n_eps_lambda_max() -> None:
    n = 4
    thr = n * EPS
    just_above = np.diag([1.0, 0.5, 0.25, 2 * thr])
    assert close(A.condition_number(just_above), 1.0 / (2 * thr))
    at = np.diag([1.0, 0.5, 0.25, thr])
    assert A.condition_number(at) == math.inf


def test_negative_round_off_is_clamped_and_reported() -> None:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    w = np.array([3.0, 2.0, 1.0, 0.5, 0.0, -1e-13])
    K = (Q * w) @ Q.T
    lam = A.eigenvalues(K)
    assert float(lam.min()) == 0.0
    # Eigenvalues near 0 carry absolute round-off ~ N eps lambda_max, so compare absolutely.
    atol = 6 * EPS * 3.0
    assert close(A.min_raw_eigenvalue(K), np.linalg.eigvalsh((K + K.T) / 2).min(), atol=atol)
    assert close(A.min_raw_eigenvalue(K), -1e-13, rtol=0, atol=atol)
    assert A.condition_number(K) == math.inf


def test_log10_eigenvalue_histogram_counts() -> None:
    K = np.diag([1e-20, 1e-6, 1e-5, 1e-3, 1e-3, 1.0, 10.0, 0.0])
    h = A.log10_eigenvalue_histogram(K, bins=4)
    assert h.num_zero == 2  # 0 and 1e-20 are below 8 * eps * 10
    assert h.counts.dtype == torch.int64 and h.edges.dtype == torch.float64
    assert int(h.counts.sum()) == 6
    edges = np.linspace(-6.0, 1.0, 5)
    np.testing.assert_allclose(h.edges.numpy(), edges, rtol=1e-12)
    logs = [-6.0, -5.0, -3.0, -3.0, 0.0, 1.0]
    counts = [0] * 4
    for v in logs:  # explicit binning; the last bin is closed on the right
        counts[min(int((v - edges[0]) / (edges[1] - edges[0])), 3)] += 1
    assert h.counts.tolist() == counts
    with pytest.raises(ValueError, match="bins"):
        A.log10_eigenvalue_histogram(K, bins=0)


# ----------------------------------------------------------------- alignment


@pytest.mark.parametrize("n", SIZES[1:])
def test_alignment_int_labels(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    K = random_psd(n, seed=200 + n)
    y = rng.integers(0, 3, size=n)
    y[:3] = [0, 1, 2]
    Yc = ref_onehot_centered(y, 3)
    Yraw = ref_onehot_centered(y, 3, center=False)
    same_class = np.array([[1.0 if y[i] == y[j] else 0.0 for j in range(n)] for i in range(n)])
    yt = torch.from_numpy(y)

    kta = A.kernel_target_alignment(torch.from_numpy(K), yt)
    assert isinstance(kta, float)
    assert close(kta, ref_alignment(K, Yc @ Yc.T))
    assert close(A.kernel_target_alignment(K, yt, centered=False), ref_alignment(K, same_class))
    # The one-hot matrix passed as a 2-D float target matrix is the same target.
    assert close(A.kernel_target_alignment(K, Yraw, centered=False), ref_alignment(K, same_class))
    assert close(A.kernel_target_alignment(K, Yraw), kta, rtol=1e-12)
    cka = A.centered_kernel_alignment(K, yt)
    assert close(cka, ref_cka(K, same_class))
    # Extra (absent) classes add zero columns: the value must not change.
    assert close(A.kernel_target_alignment(K, yt, num_classes=7), kta, rtol=1e-12)
    assert close(A.centered_kernel_alignment(K, yt, num_classes=7), cka, rtol=1e-12)


@pytest.mark.parametrize("shape", [(9,), (9, 1), (9, 4)])
def test_alignment_float_targets(shape: tuple) -> None:
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    n = shape[0]
    K = random_psd(n, seed=7)
    t = rng.standard_normal(shape) + 2.0
    T = t.reshape(n, -1)
    Tc = T - T.mean(axis=0)
    assert close(A.kernel_target_alignment(K, t), ref_alignment(K, Tc @ Tc.T))
    assert close(A.kernel_target_alignment(K, t, centered=False), ref_alignment(K, T @ T.T))
    assert close(A.centered_kernel_alignment(K, torch.from_numpy(t)), ref_cka(K, T @ T.T))
    # Centred alignment ignores a constant offset of the targets.
    assert close(A.kernel_target_alignment(K, t + 5.0), A.kernel_target_alignment(K, t), rtol=1e-10)


def test_alignment_exact_values() -> None:
    y = np.array([0, 1, 1, 2, 0, 2, 2])
    Y = ref_onehot_centered(y, 3, center=False)
    Yc = ref_onehot_centered(y, 3)
    assert close(A.kernel_target_alignment(Y @ Y.T, y, centered=False), 1.0, rtol=1e-14)
    assert close(A.kernel_target_alignment(Yc @ Yc.T, y), 1.0, rtol=1e-14)
    assert close(A.centered_kernel_alignment(Y @ Y.T, y), 1.0, rtol=1e-14)
    # Scale invariance of the kernel.
    K = random_psd(7, seed=1)
    assert close(A.kernel_target_alignment(1e6 * K, y), A.kernel_target_alignment(K, y), rtol=1e-12)


def test_alignment_single_class_is_nan_with_warning() -> None:
    K = random_psd(6, seed=2)
    y = torch.full((6,), 3, dtype=torch.int64)
    with pytest.warns(AlignmentUndefinedWarning, match="single class"):
        assert math.isnan(A.kernel_target_alignment(K, y))
    with pytest.warns(AlignmentUndefinedWarning, match="single class"):
        assert math.isnan(A.centered_kernel_alignment(K, y))
    # The uncentred alignment is defined: YY^T = 11^T.
    ref = K.sum() / (6 * np.linalg.norm(K))
    assert close(A.kernel_target_alignment(K, y, centered=False), ref)


def test_alignment_equal_float_targets_is_nan_with_warning() -> None:
    K = random_psd(5, seed=4)
    t = np.full(5, 0.1)  # the mean of 0.1s is not exactly 0.1: round-off must not fake a value
    with pytest.warns(AlignmentUndefinedWarning, match="targets are equal"):
        assert math.isnan(A.kernel_target_alignment(K, t))
    with pytest.warns(AlignmentUndefinedWarning, match="targets are equal"):
        assert math.isnan(A.centered_kernel_alignment(K, t))
    with pytest.warns(AlignmentUndefinedWarning, match="targets are zero"):
        assert math.isnan(A.kernel_target_alignment(K, np.zeros(5), centered=False))


@pytest.mark.parametrize("kind", ["labels", "regression"])
def test_alignment_chance_level_is_the_mean_over_all_permutations(kind: str) -> None:
    """Closed form against a brute-force numpy mean over all 6! = 720 relabellings."""
    import itertools

    n = 6
    K = random_psd(n, seed=11) + 2.0  # a constant offset: the uncentred forms depend on it
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1, 2, 2]) if kind == "labels" else rng.standard_normal(n)
    Y = np.eye(3)[y] if kind == "labels" else y.reshape(n, 1)

    def align(T_rows: np.ndarray, centred_y: bool, centred_k: bool) -> float:
        Yp = T_rows - T_rows.mean(0) if centred_y else T_rows
        T = Yp @ Yp.T
        Ak = K
        if centred_k:
            H = np.eye(n) - 1.0 / n
            Ak = H @ K @ H
        return float((Ak * T).sum() / (np.linalg.norm(Ak) * np.linalg.norm(T)))

    for centred_y, centred_k in ((True, False), (False, False), (True, True)):
        brute = np.mean([align(Y[list(p)], centred_y, centred_k) for p in itertools.permutations(range(n))])
        got = A.alignment_chance_level(K, y, centered=centred_y, center_kernel=centred_k)
        assert close(got, brute, rtol=1e-10, atol=1e-14), (centred_y, centred_k, got, brute)
    # K = I with balanced labels: sqrt((C - 1) / N) for the centred-target KTA
    lab = np.arange(12) % 3
    assert close(A.alignment_chance_level(np.eye(12), lab), math.sqrt(2 / 12), rtol=1e-12)


def test_cka_of_constant_kernel_is_nan_with_warning() -> None:
    with pytest.warns(AlignmentUndefinedWarning, match="centred kernel"):
        assert math.isnan(A.centered_kernel_alignment(np.full((5, 5), 3.3), [0, 1, 0, 1, 1]))


# --------------------------------------------------------------------- drift


@pytest.mark.parametrize("n", SIZES)
def test_drift(n: int) -> None:
    K0 = random_psd(n, seed=n)
    Kt = K0 + 0.3 * random_psd(n, seed=n + 1)
    diff = np.sqrt(((Kt - K0) ** 2).sum())
    assert close(A.relative_change(Kt, K0), diff / np.sqrt((K0**2).sum()))
    cos = (Kt * K0).sum() / (np.linalg.norm(Kt, "fro") * np.linalg.norm(K0, "fro"))
    assert close(A.kernel_distance(torch.from_numpy(Kt), K0), 1.0 - cos, rtol=1e-8, atol=1e-15)
    assert A.relative_change(K0, K0) == 0.0
    assert abs(A.kernel_distance(K0, K0)) < 1e-15
    assert close(A.kernel_distance(K0, 3.0 * K0), 0.0, atol=1e-15)
    with pytest.raises(ValueError, match="same probes"):
        A.relative_change(random_psd(n + 1, seed=0), K0)


def test_log10_scale_change() -> None:
    K0 = random_psd(6, seed=3)
    Kt = 250.0 * K0 + random_psd(6, seed=4)
    assert close(A.log10_scale_change(Kt, K0), math.log10(np.trace(Kt) / np.trace(K0)), rtol=1e-12)
    assert close(A.log10_scale_change(1e4 * K0, K0), 4.0, rtol=1e-12)
    assert math.isnan(A.log10_scale_change(np.zeros((6, 6)), K0))


def test_kernel_distance_precise_when_nearly_parallel() -> None:
    K0 = random_psd(8, seed=5)
    E = random_psd(8, seed=6)
    d = A.kernel_distance(K0 + 1e-7 * E, K0)
    # 1 - cos(theta) ~ theta^2 / 2 with theta the angle; compute theta by projection.
    a = (K0 + 1e-7 * E).ravel()
    b = K0.ravel() / np.linalg.norm(K0)
    perp = a - (a @ b) * b
    theta = math.atan2(np.linalg.norm(perp), a @ b)
    assert d > 0
    assert close(d, 2 * math.sin(theta / 2) ** 2, rtol=1e-6)  # = 1 - cos(theta), no cancellation


# ------------------------------------------------------------------ dynamics


def ref_predicted(K: np.ndarray, r0: np.ndarray, lr: float, steps: int) -> np.ndarray:
    r = r0.copy()
    for _ in range(steps):  # linearised GD on 1/2 sum (f - y)^2: r <- r - lr K r
        r = r - lr * (K @ r)
    return r


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("out", [None, 3])
def test_predicted_residual_matches_iteration(n: int, out: int | None) -> None:
    rng = np.random.default_rng(n)
    K = random_psd(n, seed=n + 50)
    r0 = rng.standard_normal(n if out is None else (n, out))
    lmax = np.linalg.eigvalsh(K).max()
    for lr_scale, steps in [(1.0, 0), (1.0, 1), (0.5, 7), (1.9, 40), (2.5, 3), (2.5, 4)]:
        lr = lr_scale / lmax
        got = A.predicted_residual(torch.from_numpy(K), r0, lr, steps)
        ref = ref_predicted(K, r0, lr, steps)
        assert got.dtype == torch.float64 and got.shape == r0.shape
        scale = max(np.abs(ref).max(), np.abs(r0).max())
        np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL, atol=1e-12 * scale)


@pytest.mark.parametrize("n", SIZES)
def test_residual_spectral_energy(n: int) -> None:
    rng = np.random.default_rng(n + 9)
    K = random_psd(n, seed=n + 10)
    w, V = scipy.linalg.eigh(K)
    V = V[:, ::-1]
    for r in (rng.standard_normal(n), rng.standard_normal((n, 2))):
        for k in sorted({0, 1, n // 2, n}):
            P = V[:, :k] @ V[:, :k].T  # projector on the top-k eigenspace
            ref = (np.linalg.norm(P @ r) / np.linalg.norm(r)) ** 2
            assert close(A.residual_spectral_energy(K, r, k), ref, atol=1e-14)
        assert close(A.residual_spectral_energy(K, r, n + 5), 1.0)
    with pytest.raises(ValueError, match="k must"):
        A.residual_spectral_energy(K, rng.standard_normal(n), -1)
    assert math.isnan(A.residual_spectral_energy(K, np.zeros(n), 1))


# ---------------------------------------------------------------- edge cases


def test_single_probe() -> None:
    K = torch.tensor([[2.5]])
    assert A.eigenvalues(K).tolist() == [2.5]
    assert A.condition_number(K) == 1.0
    assert A.log10_condition_number(K) == 0.0
    assert A.effective_rank(K) == 1.0 and A.entropy_effective_rank(K) == 1.0
    assert close(A.effective_dimension(K, 0.5), 2.5 / 3.0)
    assert A.trace(K) == 2.5 and A.frobenius_norm(K) == 2.5
    with pytest.warns(AlignmentUndefinedWarning, match="only one probe"):
        assert math.isnan(A.kernel_target_alignment(K, torch.tensor([1])))
    with pytest.warns(AlignmentUndefinedWarning):
        assert math.isnan(A.centered_kernel_alignment(K, torch.tensor([0.3])))
    assert close(A.kernel_target_alignment(K, [1], centered=False), 1.0)
    assert close(A.relative_change(K * 1.5, K), 0.5)
    got = A.predicted_residual(K, torch.tensor([2.0]), 0.1, 3)
    assert close(float(got[0]), 2.0 * (1 - 0.25) ** 3)
    assert A.residual_spectral_energy(K, [3.0], 1) == 1.0


def test_round_off_asymmetry_uses_symmetric_part() -> None:
    rng = np.random.default_rng(11)
    Ks = random_psd(10, seed=11)
    noise = 1e-13 * rng.standard_normal((10, 10))
    K = Ks + noise
    Kref = (K + K.T) / 2
    np.testing.assert_allclose(A.eigenvalues(K).numpy(), ref_eigs(Kref), rtol=RTOL)
    ref_sym = np.linalg.norm(K - K.T) / np.linalg.norm(K)
    assert ref_sym > 0 and close(A.symmetry_residual(K), ref_sym)
    assert close(A.frobenius_norm(K), np.linalg.norm(Kref))
    y = np.arange(10) % 3
    Yc = ref_onehot_centered(y, 3)
    assert close(A.kernel_target_alignment(K, y), ref_alignment(Kref, Yc @ Yc.T))
    # An exactly antisymmetric perturbation leaves every symmetric metric unchanged.
    S = rng.standard_normal((10, 10))
    K2 = Ks + (S - S.T)
    assert close(A.lambda_max(K2), A.lambda_max(Ks), rtol=1e-14)


def test_numpy_torch_float32_inputs_agree() -> None:
    K = random_psd(9, seed=21).astype(np.float32)
    y = np.arange(9) % 2
    Kd = K.astype(np.float64)  # the analysis must promote, not round, float32 inputs
    assert close(A.lambda_max(K), ref_eigs(Kd)[0])
    assert A.lambda_max(K) == A.lambda_max(torch.from_numpy(K))
    assert A.kernel_target_alignment(K, y) == A.kernel_target_alignment(
        torch.from_numpy(K), torch.from_numpy(y)
    )
    assert A.kernel_target_alignment(K, list(y)) == A.kernel_target_alignment(K, y)
    # A negative-stride numpy view is accepted.
    assert close(A.trace(Kd[::-1, ::-1]), float(np.trace(Kd)))
    # Inputs are not modified.
    Kt = torch.from_numpy(Kd.copy())
    A.eigenvalues(Kt)
    assert torch.equal(Kt, torch.from_numpy(Kd))


def test_zero_kernel() -> None:
    Z = torch.zeros(5, 5)
    assert A.eigenvalues(Z).tolist() == [0.0] * 5
    assert math.isnan(A.condition_number(Z))
    assert math.isnan(A.log10_condition_number(Z))
    assert math.isnan(A.effective_rank(Z)) and math.isnan(A.entropy_effective_rank(Z))
    assert A.effective_dimension(Z, 1.0) == 0.0
    assert A.trace(Z) == 0.0 and A.frobenius_norm(Z) == 0.0 and A.symmetry_residual(Z) == 0.0
    with pytest.warns(AlignmentUndefinedWarning, match="all zeros"):
        assert math.isnan(A.kernel_target_alignment(Z, [0, 1, 0, 1, 2]))
    with pytest.warns(AlignmentUndefinedWarning, match="all zeros"):
        assert math.isnan(A.centered_kernel_alignment(Z, [0, 1, 0, 1, 2]))
    assert math.isnan(A.relative_change(np.eye(5), Z))
    assert math.isnan(A.kernel_distance(Z, np.eye(5)))
    r0 = torch.arange(5.0)
    assert torch.equal(A.predicted_residual(Z, r0, 0.1, 10), r0.double())
    h = A.log10_eigenvalue_histogram(Z)
    assert h.num_zero == 5 and int(h.counts.sum()) == 0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "K, match",
    [
        (np.ones((3, 4)), "square"),
        (np.ones(3), "square"),
        (np.ones((2, 2, 3, 3)), "mode='full'"),
        (np.zeros((0, 0)), "empty"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN/inf"),
        (np.array([[np.inf]]), "NaN/inf"),
        (np.eye(2) + 0j, "complex"),
    ],
)
def test_bad_kernels_raise(K: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        A.eigenvalues(K)


def test_bad_arguments_raise() -> None:
    K = random_psd(4, seed=0)
    with pytest.raises(ValueError, match="targets has 3 entries but the kernel is 4 x 4"):
        A.kernel_target_alignment(K, [0, 1, 0])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        A.kernel_target_alignment(K, [0, 1, 2, 1], num_classes=2)
    with pytest.raises(ValueError, match="class labels"):
        A.centered_kernel_alignment(K, [0, -1, 1, 0])
    with pytest.raises(ValueError, match="targets must have shape"):
        A.kernel_target_alignment(K, np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="NaN/inf"):
        A.kernel_target_alignment(K, np.array([0.0, np.nan, 1.0, 2.0]))
    with pytest.raises(ValueError, match="gamma"):
        A.effective_dimension(K, 0.0)
    with pytest.raises(ValueError, match="steps"):
        A.predicted_residual(K, np.ones(4), 0.1, 1.5)
    with pytest.raises(ValueError, match="lr"):
        A.predicted_residual(K, np.ones(4), -0.1, 2)
    with pytest.raises(ValueError, match="r0 must have shape"):
        A.predicted_residual(K, np.ones(5), 0.1, 2)


def test_analysis_and_report_import_only_torch_numpy() -> None:
    """The analysis layer never imports Lightning or the engine."""
    allowed = {"__future__", "collections", "math", "warnings", "typing", "dataclasses", "numpy",
               "torch"}
    pkg = pathlib.Path(A.__file__).parent
    for name in ("analysis.py", "report.py"):
        tree = ast.parse((pkg / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the analysis module itself
                    assert node.module in (None, "analysis"), (name, node.module)
                    continue
                mods = [node.module.split(".")[0]]
            else:
                continue
            assert set(mods) <= allowed, (name, mods)
