"""Infinite-width reference kernels for fully-connected ReLU networks.

:func:`relu_ntk` (and :func:`relu_nngp`) give the analytic kernels of

    f(x) = Dense_out( relu( Dense_depth( ... relu( Dense_1(x) ) ... ) ) )

in the NTK parameterisation, with exactly the conventions of neural-tangents'
``stax.serial(*[stax.Dense(W, W_std=w_std, b_std=b_std), stax.Relu()] * depth,
stax.Dense(1, W_std=w_std, b_std=b_std))`` and ``kernel_fn(x1, x2, 'ntk')``.
:class:`NTKParamMLP` is the matching finite-width torch model, whose empirical NTK
converges to :func:`relu_ntk` as its width grows (``examples/width_sweep.py``).

Sources: Cho & Saul 2009 (arc-cosine kernels); Jacot, Gabriel & Hongler 2018 (the NTK
recursion); Lee et al. 2018 and Arora et al. 2019 (ReLU closed forms); Novak et al. 2020
(neural-tangents, whose ``stax.Dense`` / ``stax.Relu`` conventions are reproduced).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["NTKLinear", "NTKParamMLP", "relu_nngp", "relu_ntk"]

_PI = math.pi
# Below this angle g(t) = sin t - t cos t is summed from its Taylor series: the direct
# formula cancels (both terms ~ t, the difference ~ t^3 / 3).
_SERIES_BELOW = 0.25
# Taylor coefficients of g(t) = sum_k (-1)^(k+1) 2k t^(2k+1) / (2k+1)!, k = 1..7; at
# t = 0.25 the first omitted term is ~1e-20 relative to g.
_G_SERIES = [(-1) ** (k + 1) * 2 * k / math.factorial(2 * k + 1) for k in range(1, 8)]


def _g(t: torch.Tensor) -> torch.Tensor:
    """``g(t) = sin t - t cos t`` for t in [0, pi], to full relative precision.

    ``g`` is the ReLU arc-cosine function in disguise: ``J1(theta) = sin theta +
    (pi - theta) cos theta = g(pi - theta)`` (Cho & Saul 2009, n = 1).
    """
    direct = torch.sin(t) - t * torch.cos(t)
    t2 = t * t
    series = torch.zeros_like(t)
    for c in reversed(_G_SERIES):  # Horner in t^2
        series = series * t2 + c
    series = series * t2 * t
    return torch.where(t < _SERIES_BELOW, series, direct)


def _as_points(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray of shape (N, d), "
                        f"got {type(x).__name__}; wrap it with torch.as_tensor(...).")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, d) (one input vector per row), got "
                         f"shape {tuple(x.shape)}; flatten each input with "
                         f"x.reshape(len(x), -1) or add a batch axis with x[None].")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}.")
    x = x.to(torch.float64)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero features (shape {tuple(x.shape)}); the kernel "
                         "needs d >= 1.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; the kernel of such inputs is undefined.")
    return x


def _check_hyper(depth: Any, w_std: Any, b_std: Any) -> tuple[int, float, float]:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
        raise ValueError(f"depth={depth!r} must be an int >= 0 (the number of hidden "
                         "Dense -> ReLU layers; 0 is a linear model).")
    w, b = float(w_std), float(b_std)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"w_std={w_std!r} must be a finite number >= 0 (stax.Dense W_std).")
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"b_std={b_std!r} must be a finite number >= 0 (stax.Dense b_std).")
    return int(depth), w, b


def _relu_kernels(x1: Any, x2: Any, depth: Any, w_std: Any,
                  b_std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(NNGP, NTK) of the network's scalar output; see :func:`relu_ntk` for the maths."""
    depth, w, b = _check_hyper(depth, w_std, b_std)
    p1 = _as_points(x1, "x1")
    same = x2 is None
    p2 = p1 if same else _as_points(x2, "x2")
    if p2.shape[1] != p1.shape[1]:
        raise ValueError(f"x1 has {p1.shape[1]} features but x2 has {p2.shape[1]}; both must "
                         "be (N, d) with the same d.")
    if p2.device != p1.device:
        raise ValueError(f"x1 is on {p1.device} but x2 is on {p2.device}; move both to one "
                         "device.")
    d = p1.shape[1]

    # Layer 0 (the first Dense) is a dot product of augmented vectors
    # u = [w x / sqrt(d), b]: Sigma_0 = u . u' = w^2 x.x'/d + b^2.
    def augment(p: torch.Tensor) -> torch.Tensor:
        bias = torch.full((p.shape[0], 1), b, dtype=p.dtype, device=p.device)
        return torch.cat([p * (w / math.sqrt(d)), bias], dim=1)

    u1 = augment(p1)
    u2 = u1 if same else augment(p2)
    a1 = torch.linalg.vector_norm(u1, dim=1)  # sqrt(Sigma(x, x)), per layer
    a2 = a1 if same else torch.linalg.vector_norm(u2, dim=1)

    def unit(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.where(a[:, None] > 0, u / torch.where(a > 0, a, 1.0)[:, None], 0.0)

    n1, n2 = unit(u1, a1), unit(u2, a2)
    # Half-angle chords of the unit vectors: |n - n'| = 2 sin(theta/2), |n + n'| = 2
    # cos(theta/2). Computed from differences, not from 1 - cos, so theta (near 0) and
    # pi - theta (near pi) keep full relative precision where arccos would lose half the
    # digits (its derivative is infinite at cos = +-1).
    exact = "donot_use_mm_for_euclid_dist"
    chord_minus = torch.cdist(n1, n2, p=2.0, compute_mode=exact)
    chord_plus = torch.cdist(n1, -n2, p=2.0, compute_mode=exact)
    sigma = u1 @ u2.T
    if same:  # make the kernel exactly symmetric
        chord_minus = (chord_minus + chord_minus.T) / 2
        chord_plus = (chord_plus + chord_plus.T) / 2
        sigma = (sigma + sigma.T) / 2
    ab = a1[:, None] * a2[None, :]
    # E = 2 (|u||u'| - u.u') = 4 |u||u'| sin^2(theta/2) >= 0, tracked through the layers
    # by its own recursion (below) so that small angles never come from a cancellation.
    e = ab * chord_minus**2
    degenerate = ab == 0  # a zero-norm pre-activation: angle undefined; stax uses pi/2
    half_pi = torch.full_like(ab, _PI / 2)
    theta = torch.where(degenerate, half_pi, 2 * torch.atan2(chord_minus, chord_plus))
    phi = torch.where(degenerate, half_pi, 2 * torch.atan2(chord_plus, chord_minus))  # pi - theta
    ntk = sigma.clone()  # Theta_0 = Sigma_0 (only the first layer's parameters)

    w2, b2 = w * w, b * b
    for _ in range(depth):
        # ReLU then Dense:  Sigma' = w^2 |u||u'| J1(theta) / (2 pi) + b^2,
        #                   Theta' = Sigma' + w^2 (pi - theta) / (2 pi) * Theta.
        sigma = w2 * ab * _g(phi) / (2 * _PI) + b2
        ntk = sigma + w2 * (phi / (2 * _PI)) * ntk
        # Next layer's norms: Sigma'(x, x) = w^2 Sigma(x, x) / 2 + b^2.
        s1, s2 = a1 * (w / math.sqrt(2)), a2 * (w / math.sqrt(2))
        a1n = torch.hypot(s1, torch.full_like(s1, b))
        a2n = torch.hypot(s2, torch.full_like(s2, b))
        abn = a1n[:, None] * a2n[None, :]
        # E' = 2 (|u'||u''| - Sigma') as a sum of non-negative, cancellation-free terms:
        #   2 b^2 (s1 - s2)^2 / (|u'||u''| + s1 s2 + b^2) + w^2 (E/2 - |u||u'| g(theta) / pi)
        # (the second bracket is |u||u'| ((1 - cos theta) - g(theta)/pi)
        #  >= |u||u'|(1 - cos theta)/2).
        ds = s1[:, None] - s2[None, :]
        den = abn + s1[:, None] * s2[None, :] + b2
        bias_part = torch.where(den > 0, 2 * b2 * ds**2 / torch.where(den > 0, den, 1.0), 0.0)
        e = (bias_part + w2 * (e / 2 - ab * _g(theta) / _PI)).clamp_min(0.0)
        # P' = 2 (|u'||u''| + Sigma') = 4 |u'||u''| cos^2(theta'/2); Sigma' >= 0 after a ReLU.
        p = 2 * (abn + sigma)
        a1, a2, ab = a1n, a2n, abn
        degenerate = ab == 0
        theta = torch.where(degenerate, half_pi, 2 * torch.atan2(e.sqrt(), p.sqrt()))
        phi = torch.where(degenerate, half_pi, 2 * torch.atan2(p.sqrt(), e.sqrt()))
    return sigma, ntk


def relu_ntk(x1: Any, x2: Any = None, *, depth: int, w_std: float = 2**0.5,
             b_std: float = 0.0) -> torch.Tensor:
    r"""Analytic (infinite-width) NTK of a fully-connected ReLU network, float64.

    The network has ``depth`` hidden layers ``Dense -> ReLU`` and a ``Dense`` readout to
    one scalar output, in the NTK parameterisation of neural-tangents' ``stax.Dense``:
    each layer computes ``w_std / sqrt(fan_in) * W h + b_std * b`` with every entry of
    ``W`` and ``b`` drawn from N(0, 1). The result equals
    ``stax.serial(*[stax.Dense(n, W_std=w_std, b_std=b_std), stax.Relu()] * depth,
    stax.Dense(1, W_std=w_std, b_std=b_std))[2](x1, x2, 'ntk')`` (for any hidden ``n``),
    which is the limit of :func:`ntk_callback.empirical_ntk` of :class:`NTKParamMLP` as
    its width goes to infinity.

    Recursion (Jacot et al. 2018; arc-cosine closed forms of Cho & Saul 2009; Arora et
    al. 2019), with ``d`` the input dimension::

        Sigma_0(x, x') = w_std^2 x.x' / d + b_std^2,          Theta_0 = Sigma_0
        for l = 1 .. depth, with
        cos(theta) = Sigma_{l-1}(x,x') / sqrt(Sigma_{l-1}(x,x) Sigma_{l-1}(x',x')):
            Sigma_l(x, x') = w_std^2 / (2 pi) * sqrt(Sigma_{l-1}(x,x) Sigma_{l-1}(x',x'))
                             * (sin theta + (pi - theta) cos theta) + b_std^2
            Theta_l(x, x') = Sigma_l(x, x') + w_std^2 * (pi - theta) / (2 pi) * Theta_{l-1}(x, x')
        K = Theta_depth

    ``Sigma_l(x, x) = w_std^2 Sigma_{l-1}(x, x) / 2 + b_std^2``. With the default
    ``w_std = sqrt(2)`` (He scaling) and ``b_std = 0`` the diagonal stays
    ``2 |x|^2 / d`` at every layer and ``Theta(x, x) = 2 (depth + 1) |x|^2 / d``. A
    zero-norm pre-activation has an undefined angle; as in neural-tangents theta = pi/2 is
    used there (only reachable with ``b_std = 0`` and ``x = 0``, where the kernel row is 0
    anyway).

    Numerics: theta is never taken from ``arccos`` (which loses half the digits at
    cos = +-1, where its derivative is infinite). Layer 0 computes ``theta`` and
    ``pi - theta`` as ``2 atan2`` of the chords ``|n - n'|`` and ``|n + n'|`` of the
    unit augmented inputs; deeper layers carry ``E = 2 (|u||u'| - Sigma)`` through an
    exact, cancellation-free recursion. Parallel, nearly parallel, antiparallel and
    nearly antiparallel inputs therefore get ~1e-15 relative accuracy (checked against
    a 50-digit mpmath evaluation in ``tests/test_theory.py``).

    Args:
        x1: (N1, d) torch tensor or numpy array (any real dtype; computed in float64).
        x2: (N2, d), or None for ``x2 = x1`` (then the result is exactly symmetric).
        depth: number of hidden ReLU layers (>= 0; 0 is the linear model).
        w_std: ``W_std`` of every Dense layer.
        b_std: ``b_std`` of every Dense layer.

    Returns:
        (N1, N2) float64 tensor on the device of ``x1``.
    """
    return _relu_kernels(x1, x2, depth, w_std, b_std)[1]


def relu_nngp(x1: Any, x2: Any = None, *, depth: int, w_std: float = 2**0.5,
              b_std: float = 0.0) -> torch.Tensor:
    """Analytic NNGP kernel ``Sigma_depth`` (the covariance of the scalar output at
    initialisation) of the network described in :func:`relu_ntk`; neural-tangents'
    ``kernel_fn(x1, x2, 'nngp')``. Same arguments, (N1, N2) float64."""
    return _relu_kernels(x1, x2, depth, w_std, b_std)[0]


class NTKLinear(nn.Module):
    """``y = w_std / sqrt(in_features) * W x + b_std * b`` with ``W, b ~ N(0, 1)``:
    ``stax.Dense`` in the NTK parameterisation.

    Implemented as a bias-free :class:`torch.nn.Linear` (``self.linear``) applied to the
    augmented input ``[w_std / sqrt(in_features) * x, b_std]``: its weight is ``[W, b]``
    (the last column is the bias ``b``), so output, gradients and kernel are exactly
    those of the formula above, and the engine's fast structured rule for
    ``nn.Linear`` applies. With ``b_std == 0`` the bias column is omitted (it would
    contribute exactly zero to output and kernel).
    """

    def __init__(self, in_features: int, out_features: int, w_std: float = 2**0.5,
                 b_std: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.w_std, self.b_std = float(w_std), float(b_std)
        self.has_bias = self.b_std != 0
        self.linear = nn.Linear(self.in_features + int(self.has_bias), self.out_features,
                                bias=False)
        with torch.no_grad():
            self.linear.weight.normal_()

    @property
    def weight(self) -> torch.Tensor:
        """``W``, shape (out_features, in_features) (a view of ``linear.weight``)."""
        return self.linear.weight[:, : self.in_features]

    @property
    def bias(self) -> torch.Tensor | None:
        """``b``, shape (out_features,), or None when ``b_std == 0``."""
        return self.linear.weight[:, -1] if self.has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * (self.w_std / math.sqrt(self.in_features))
        if self.has_bias:
            x = torch.cat([x, x.new_full((*x.shape[:-1], 1), self.b_std)], dim=-1)
        return self.linear(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w_std={self.w_std:g}, b_std={self.b_std:g}")


class NTKParamMLP(nn.Module):
    """Finite-width counterpart of :func:`relu_ntk`: ``depth`` hidden ``NTKLinear ->
    ReLU`` layers of ``width`` units and an ``NTKLinear`` readout to one output.

    Input (N, in_features), output (N, 1). At initialisation its empirical NTK
    (``ntk_callback.empirical_ntk(model, x)``) is a random kernel whose mean over
    initialisations tends to ``relu_ntk(x, depth=depth, w_std=w_std, b_std=b_std)`` and
    whose fluctuations shrink like ``1 / sqrt(width)`` (Jacot et al. 2018). Weights are
    drawn from the global torch RNG; seed it with ``torch.manual_seed`` first.
    """

    def __init__(self, in_features: int, width: int, depth: int, w_std: float = 2**0.5,
                 b_std: float = 0.0) -> None:
        super().__init__()
        depth, w_std, b_std = _check_hyper(depth, w_std, b_std)
        if int(in_features) < 1 or int(width) < 1:
            raise ValueError(f"in_features={in_features!r} and width={width!r} must be "
                             "positive ints.")
        layers: list[nn.Module] = []
        fan_in = int(in_features)
        for _ in range(depth):
            layers += [NTKLinear(fan_in, int(width), w_std, b_std), nn.ReLU()]
            fan_in = int(width)
        layers.append(NTKLinear(fan_in, 1, w_std, b_std))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
