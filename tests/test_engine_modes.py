"""The kernel mode type (``engine/modes.py``): parsing, the registry, and new modes added
through the abstraction alone, checked against the independent float64 reference.

Two modes that are not built in are defined here the way the module documents it:

* ``MeanTrace`` -- neural-tangents' averaged trace, ``K = (1/O) sum_a full[i, j, a, a]``
  (rows ``e_a / sqrt(O)``, diagonal pairs);
* ``Projection`` -- the kernel of given output weights ``W`` (k, O): diagonal pairs give
  ``sum_r W_r^T full[i, j] W_r``, all pairs ``W_r^T full[i, j] W_s`` (k != O, so the
  engine must read the kernel's shape from the mode, not from the number of outputs).

Every structured route, the generic path, cross kernels, per-layer keys and the
self-check must handle them without an edit outside the mode's class.
"""
from __future__ import annotations

import math

import pytest
import torch

from ntk_callback import NTKError, empirical_ntk, finite_difference_ntk, layerwise_ntk
from ntk_callback.engine import AllPairs, DiagonalPairs, KernelMode, mode_names, register_mode
from ntk_callback.engine import modes as M
from reference import full_kernel_func
from test_engine_structured import CASES, _build, _paths, rel


class MeanTrace(DiagonalPairs):
    name = "mean_trace"

    def cotangent_rows(self, targets, n, num_outputs, name, dtype):
        return torch.eye(num_outputs, dtype=dtype).expand(n, -1, -1) / math.sqrt(num_outputs)


class Projection(DiagonalPairs):
    name = "projection"

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights  # (k, O)

    def cotangent_rows(self, targets, n, num_outputs, name, dtype):
        return self.weights.to(dtype).expand(n, -1, -1)


class PairProjection(AllPairs):
    name = "pair_projection"

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights

    def cotangent_rows(self, targets, n, num_outputs, name, dtype):
        return self.weights.to(dtype).expand(n, -1, -1)


W = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, 3.0]], dtype=torch.float64)  # k=2, O=3


def expected(mode: KernelMode, full: torch.Tensor) -> torch.Tensor:
    o = full.shape[-1]
    if isinstance(mode, MeanTrace):
        return torch.diagonal(full, dim1=2, dim2=3).sum(-1) / o
    if isinstance(mode, Projection):
        return torch.einsum("ra,ijab,rb->ij", W, full, W)
    return torch.einsum("ra,ijab,sb->ijrs", W, full, W)


NEW_MODES = [MeanTrace(), Projection(W), PairProjection(W)]


def _three_outputs(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model, x, y = _build(name)
    out = model(x)
    assert out.reshape(out.shape[0], -1).shape[1] == 3, name
    return model, x, y


def test_builtin_modes_parse_and_compare() -> None:
    assert mode_names() == ("target", "trace", "sum", "full")
    assert mode_names(scalar_only=True) == ("target", "trace", "sum")
    for name in mode_names():
        mode = KernelMode.parse(name)
        assert mode.name == name and KernelMode.parse(mode) is mode and str(mode) == name
    assert KernelMode.parse("target").needs_targets
    assert not any(KernelMode.parse(n).needs_targets for n in ("trace", "sum", "full"))
    assert KernelMode.parse("full").all_pairs and not KernelMode.parse("full").scalar
    with pytest.raises(NTKError, match="unknown mode 'diagonal'.*'target', 'trace', 'sum', 'full'"):
        KernelMode.parse("diagonal")
    with pytest.raises(TypeError, match="not with the string"):
        _ = M.FULL == "full"  # a leftover string comparison fails loudly


def test_builtin_cotangent_rows() -> None:
    y = torch.tensor([2, 0, 1])
    cot = M.TARGET.cotangents(y, 3, 4, "targets", torch.float64, torch.device("cpu"))
    assert torch.equal(cot, torch.eye(4, dtype=torch.float64)[y][:, None, :])
    assert torch.equal(M.SUM.cotangent_rows(None, 3, 4, "t", torch.float64),
                       torch.ones(3, 1, 4, dtype=torch.float64))
    for mode in (M.TRACE, M.FULL):
        assert torch.equal(mode.cotangent_rows(None, 3, 4, "t", torch.float64),
                           torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    assert M.FULL.kernel_shape(5, 6, 4) == (5, 6, 4, 4) and M.TRACE.kernel_shape(5, 6, 4) == (5, 6)


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("route", ["auto", "gram", "rows", "generic"])
@pytest.mark.parametrize("name", ["seq_linear", "conv2d_bn_gn", "tokens"])
def test_new_mode_matches_reference(name: str, route: str, mode: KernelMode) -> None:
    model, x, y = _three_outputs(name)
    ref = expected(mode, full_kernel_func(model.double(), x.double() if x.is_floating_point() else x))
    model.float()
    kwargs = {"implementation": "generic"} if route == "generic" else {
        "layer_paths": None if route == "auto" else _paths(model, route)}
    got, why = empirical_ntk(model, x, mode=mode, dtype=torch.float64, explain=True, **kwargs)
    assert got.shape == ref.shape
    assert rel(got, ref) <= 1e-12, f"{name}/{route}/{mode.name}: {rel(got, ref):.2e}"
    if route != "generic":  # the structured rules ran and passed their self-check
        assert any(p.startswith("structured") for p in why.paths.values())
        assert why.self_check and not why.reasons.get("")


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.name)
def test_new_mode_cross_and_layerwise(mode: KernelMode) -> None:
    model, x, y = _three_outputs("conv2d_bn_gn")
    x2 = torch.randn(3, *x.shape[1:])
    ref = expected(mode, full_kernel_func(model.double(), x.double(), x2.double()))
    model.float()
    got = empirical_ntk(model, x, mode=mode, inputs2=x2, dtype=torch.float64)
    assert rel(got, ref) <= 1e-12
    parts = layerwise_ntk(model, x, mode=mode, dtype=torch.float64)
    assert len(parts) > 1
    whole = empirical_ntk(model, x, mode=mode, dtype=torch.float64)
    assert rel(sum(parts.values()), whole) <= 1e-12


def test_registered_mode_by_name() -> None:
    model, x, y = _three_outputs("seq_linear")
    register_mode(MeanTrace())
    try:
        assert "mean_trace" in mode_names(scalar_only=True)
        got = empirical_ntk(model, x, mode="mean_trace", dtype=torch.float64)
        trace = empirical_ntk(model, x, mode="trace", dtype=torch.float64)
        assert rel(got, trace / 3) <= 1e-12
        # the finite-step check follows the mode's rows too
        fd = finite_difference_ntk(model, x, mode="mean_trace", eta=1e-5)
        assert rel(fd, got) <= 1e-6
    finally:
        del M._REGISTRY["mean_trace"]
    with pytest.raises(NTKError, match="unknown mode 'mean_trace'"):
        empirical_ntk(model, x, mode="mean_trace")


def test_bad_cotangent_rows_are_refused() -> None:
    class Wrong(DiagonalPairs):
        name = "wrong"

        def cotangent_rows(self, targets, n, num_outputs, name, dtype):
            return torch.ones(n, 2, num_outputs + 1, dtype=dtype)

    model, x, _ = _three_outputs("seq_linear")
    with pytest.raises(NTKError, match="cotangent rows of shape"):
        empirical_ntk(model, x, mode=Wrong())
    with pytest.raises(NTKError, match="named KernelMode"):
        register_mode(KernelMode())


@pytest.mark.parametrize("mode", NEW_MODES, ids=lambda m: m.name)
def test_new_mode_in_blocks(mode: KernelMode) -> None:
    """The blocked path (blocks of probes, mirrored) reads the kernel's shape and the
    mode's needs from the mode too."""
    model, x, y = _three_outputs("seq_linear")
    whole = empirical_ntk(model, x, mode=mode, dtype=torch.float64)
    blocked = empirical_ntk(model, x, mode=mode, dtype=torch.float64, block_size=2)
    assert blocked.shape == whole.shape
    assert rel(torch.as_tensor(blocked), whole) <= 1e-12
