"""The spectrum's ``"factors"`` route: kernel-vector products from per-probe factors
captured once, against the float64 per-sample reference (tests/reference.py).

Every zoo architecture (tests/zoo.py) and the layer-by-layer models (tests/models.py):
``K v`` from the factors against ``K_ref @ v`` for random vectors (the whole operator,
not only its top eigenvalues), in target and trace mode (sum and full on a few), float64;
top eigenvalues by ``ntk_spectrum(route="factors")`` against ``eigvalsh`` of the
reference kernel; a planted rule bug the self-check keeps out of the factors; the byte
limit (a clear error, or ``"auto"`` falling back to passes through the model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import models as M
import reference as R
import zoo as Z
from ntk_callback import NTKError, ntk_spectrum, ntk_trace_estimate
from ntk_callback.engine.spectrum import ntk_spectrum_and_norms
from ntk_callback.engine import structured
from ntk_callback.engine.factors import FactorOperator, capture
from ntk_callback.engine.problem import build_problem
from ntk_callback.engine.state import cast_floating, frozen_measurement
from ntk_callback.engine.structured import rules as RU
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"
)


def _operator(model: nn.Module, x, t, mode: str, self_check: bool = True,
              limit: int = 2 ** 30) -> FactorOperator:
    with frozen_measurement(model, True), cast_floating(model, torch.float64):
        problem = build_problem(model, x, t, mode=mode, dtype=torch.float64)
        return capture(problem, limit=limit, budget=2 ** 28, self_check=self_check)


def _flat(kernel: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "full":  # (N, N, O, O) -> (N*O, N*O), probe-major
        n, _, o, _ = kernel.shape
        return kernel.permute(0, 2, 1, 3).reshape(n * o, n * o)
    return kernel


def _check_products(op: FactorOperator, ref: torch.Tensor, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    scale = float(torch.linalg.matrix_norm(ref, ord=2))
    assert op.dim == ref.shape[0]
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        got = op.apply(v)
        assert got.shape == (op.dim,) and got.dtype == torch.float64
        assert float((got - ref @ v).norm()) <= 1e-10 * scale * float(v.norm())
    np.testing.assert_allclose(op.matvec(v.numpy()), (ref @ v).numpy(),
                               rtol=0, atol=1e-10 * scale * float(v.norm()))
    # the diagonal (the exact trace of the "factors" route), from the factors alone
    diag = op.diagonal()
    assert diag.dtype == torch.float64 and diag.shape == (op.dim,)
    assert float((diag - torch.diagonal(ref)).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("mode", ["target", "trace"])
@pytest.mark.parametrize("name", list(Z.ZOO))
def test_zoo_products_match_reference(name: str, mode: str) -> None:
    case = Z.build(name)
    ref = R.ntk_loop(case.model, case.inputs, case.targets, mode)
    op = _operator(case.model, case.inputs, case.targets, mode)
    # no false alarm of the products' own check (it would send every layer to exact rows)
    assert not any("factor products" in why for why in op.reasons.values()), op.reasons
    _check_products(op, ref)


@pytest.mark.parametrize("mode", ["sum", "full"])
@pytest.mark.parametrize("name", ["resnet_tiny", "gpt_tiny", "gru", "functional_only"])
def test_zoo_products_other_modes(name: str, mode: str) -> None:
    case = Z.build(name)
    ref = _flat(R.ntk_loop(case.model, case.inputs, case.targets, mode), mode)
    op = _operator(case.model, case.inputs, case.targets, mode)
    assert not any("factor products" in why for why in op.reasons.values()), op.reasons
    _check_products(op, ref)


@pytest.mark.parametrize("name", list(M.BUILDERS))
def test_layer_models_products_match_reference(name: str) -> None:
    case = M.BUILDERS[name]()
    for mode in ("target", "trace"):
        ref = R.ntk_loop(case.model, case.inputs, case.targets, mode)
        _check_products(_operator(case.model, case.inputs, case.targets, mode), ref)


@pytest.mark.parametrize("mode", ["target", "trace"])
@pytest.mark.parametrize("name", ["resnet_tiny", "bert_tiny", "lstm", "mha_seq_first"])
def test_top_eigenvalues_match_dense(name: str, mode: str) -> None:
    case = Z.build(name)
    ref = R.ntk_loop(case.model, case.inputs, case.targets, mode)
    exact = torch.linalg.eigvalsh(ref).flip(0)[:2]
    got = ntk_spectrum(case.model, case.inputs, case.targets, k=2, mode=mode,
                       dtype=torch.float64, route="factors")
    assert torch.allclose(got, exact, rtol=1e-9, atol=1e-12 * float(exact[0]))


def _mlp_case(n: int = 40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                          nn.Linear(24, 4))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_wide_layers_keep_inputs_not_rows(mode: str) -> None:
    # a Linear layer: c + k o numbers a probe instead of k o c; the self-checks pass (no
    # layer sent to the exact rows), with a capture in several chunks too
    model, x, y = _mlp_case(120)
    k = 1 if mode == "target" else 4
    for budget in (2 ** 28, 40_000):
        with frozen_measurement(model, True), cast_floating(model, torch.float64):
            problem = build_problem(model, x, y, mode=mode, dtype=torch.float64)
            op = capture(problem, limit=2 ** 30, budget=budget)
        kinds = sorted(type(p).__name__ for p in op.parts)
        assert kinds == ["OuterTerm"] * 3, (kinds, op.reasons)
        assert op.nbytes() < 120 * k * sum(p.numel() for p in model.parameters()) * 8 / 4
        assert all(path.startswith("structured") for path in op.paths.values()), op.reasons
        _check_products(op, _flat(R.ntk_loop(model, x, y, mode), mode))


def test_planted_rule_bug_is_kept_out(monkeypatch) -> None:
    model, x, y = _mlp_case()
    ref = R.ntk_loop(model, x, y, "trace")

    class Scaled(RU.LinearRule):
        def terms(self, module, attrs, call, d, memo):
            return [t.like(t.data, t.d * 1.001) for t in super().terms(module, attrs, call, d, memo)]

    monkeypatch.setitem(RU._RULES, nn.Linear, Scaled())
    wrong = _operator(model, x, y, "trace", self_check=False)
    v = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert float((wrong.apply(v) - ref @ v).norm()) > 1e-4 * float((ref @ v).norm())
    op = _operator(model, x, y, "trace")
    assert all(p.startswith("generic") for p in op.paths.values()), op.paths
    assert all("self-check" in why for why in op.reasons.values()), op.reasons
    _check_products(op, ref)


def test_byte_limit() -> None:
    model, x, y = _mlp_case()
    exact = torch.linalg.eigvalsh(R.ntk_loop(model, x, y, "trace")).flip(0)[:3]
    with pytest.raises(NTKError, match=r"need ~\d+\.\d KiB.*pass memory_budget=\d+"):
        ntk_spectrum(model, x, k=3, mode="trace", route="factors", memory_budget=30_000)
    # auto: too large for the budget -> products by passes through the model, same values
    got = ntk_spectrum(model, x, k=3, mode="trace", dtype=torch.float64, memory_budget=30_000,
                       chunk_size=40)
    assert torch.allclose(got, exact, rtol=1e-9)
    with pytest.raises(structured.factormode.FactorsTooLarge):
        _operator(model, x, y, "trace", limit=30_000)


def test_auto_route_float32_loader_and_estimates() -> None:
    model, x, y = _mlp_case(60)
    dense = R.ntk_loop(model, x, y, "trace")
    exact = torch.linalg.eigvalsh(dense).flip(0)[:4]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    got = ntk_spectrum(model, loader, k=4, mode="trace")  # float32, auto -> factors
    assert torch.allclose(got, exact, rtol=1e-5)
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 6
    est = ntk_trace_estimate(model, x, mode="trace", dtype=torch.float64, route="factors",
                             num_samples=40, seed=2)
    # the trace exact (the factors' diagonal), the Frobenius norm a Hutchinson estimate
    assert est.trace_exact and not est.exact and est.trace_stderr == 0.0
    assert est.trace == pytest.approx(float(torch.trace(dense)), rel=1e-12)
    frob = float(torch.linalg.matrix_norm(dense))
    assert abs(est.frobenius - frob) <= 4 * est.frobenius_stderr
    # both from one capture: the same values as the two calls
    vals, norms = ntk_spectrum_and_norms(model, x, k=4, mode="trace", dtype=torch.float64,
                                         route="factors", num_samples=40, seed=2)
    assert torch.allclose(vals, exact, rtol=1e-9) and norms == est


def test_several_ranks_refuse_factors() -> None:
    class TwoRanks:  # collectives of two ranks holding identical data
        rank, world_size = 0, 2

        def all_reduce(self, tensor, op="sum"):
            return tensor * 2 if op == "sum" else tensor

        def all_gather(self, tensor):
            return [tensor, tensor]

    model, x, y = _mlp_case()
    with pytest.raises(NTKError, match="one process"):
        ntk_spectrum(model, x, k=2, mode="trace", route="factors", comm=TwoRanks())


@pytest.mark.parametrize("broken", ["push", "pull"])
def test_planted_product_bug_is_kept_out(monkeypatch, broken: str) -> None:
    # a wrong Jacobian (push) or transposed-Jacobian (pull) product of a term kind: the
    # products' own check sends every layer to the exact rows
    model, x, y = _mlp_case()
    ref = R.ntk_loop(model, x, y, "target")
    original = getattr(structured.OuterTerm, broken)
    monkeypatch.setattr(structured.OuterTerm, broken,
                        lambda self, arg: original(self, arg) * 1.001)
    op = _operator(model, x, y, "target")
    assert all(p.startswith("generic") for p in op.paths.values()), op.paths
    assert any("factor products" in why for why in op.reasons.values()), op.reasons
    _check_products(op, ref)


def test_auto_falls_back_when_the_capture_fails(monkeypatch) -> None:
    # an unexpected failure of the factors' capture: "auto" uses passes through the model
    # (exact, no factors), an explicit route="factors" raises it
    import ntk_callback.engine.spectrum as S
    model, x, y = _mlp_case()
    exact = torch.linalg.eigvalsh(R.ntk_loop(model, x, y, "trace")).flip(0)[:3]

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a capture bug")

    monkeypatch.setattr(S, "capture", broken)
    got = ntk_spectrum(model, x, k=3, mode="trace", dtype=torch.float64)
    assert torch.allclose(got, exact, rtol=1e-9)
    with pytest.raises(RuntimeError, match="a capture bug"):
        ntk_spectrum(model, x, k=3, mode="trace", dtype=torch.float64, route="factors")
