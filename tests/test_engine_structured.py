"""The structured per-layer rules agree with the generic torch.func path, route by route.

Every layer type with a structured rule is forced through each of its routes
(``layer_paths``) and compared, in float64, with the all-generic kernel in every mode,
for the plain kernel, the cross kernel and the per-layer breakdown. Structural cases the
rules must not get wrong -- repeated calls, tied weights, in-place ops after a layer, a
reshape that folds the probe dimension, partially frozen layers -- are included.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from ntk_callback import empirical_ntk, layerwise_ntk
from ntk_callback.engine import structured

MODES = ("target", "trace", "sum", "full")
TOL = 1e-12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class SeqLinear(nn.Module):
    """Linear on (N, T, d) inputs: extra positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).mean(1)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same", dilation=2)
        self.c2 = nn.Conv1d(4, 4, 3, stride=2, groups=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x))).mean(-1))


class Conv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, (2, 3), stride=(2, 1), groups=2, bias=False)
        self.gn = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.tanh(self.gn(self.c2(h))).mean((2, 3)))


class WideConvNet(nn.Module):
    """Convs whose patches exceed ``structured.UNFOLD_MAX_PATCH`` entries (rows by a
    grouped convolution backward) beside small-patch ones (rows from unfolded patches)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="replicate")
        self.short = nn.Conv2d(3, 8, 1, stride=2)
        self.c3 = nn.Conv1d(8, 4, 9, padding=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))) + self.short(x))
        return self.fc(torch.tanh(self.c3(h.flatten(2))).mean(-1))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.emb(tokens)).mean(1))


class Repeated(nn.Module):
    """One Linear called twice (weight sharing through repeated calls) and an in-place
    ReLU right after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


class RepeatedNorm(nn.Module):
    """One BatchNorm2d and one LayerNorm, each called twice (extra positions of one
    normalisation term)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.tanh(self.bn(self.c2(h))).mean((2, 3))
        return self.fc(self.ln(torch.relu(self.ln(h))))


class Tied(nn.Module):
    """Embedding tied to the output projection: one tensor used by two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.proj = nn.Linear(5, 7, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.emb(tokens).mean(1)))


class Folded(nn.Module):
    """Folds the probe dimension into the batch of a Linear: not per-probe batched."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.head(torch.tanh(self.fc(x.reshape(-1, 3))).reshape(n, -1))


class PartFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)
        self.a.bias.requires_grad_(False)
        self.b.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x)))


def _batchnorm_stats(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    model.eval()


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "seq_linear": lambda: (SeqLinear(), torch.randn(5, 4, 5)),
    "conv1d": lambda: (Conv1dNet(), torch.randn(5, 2, 9)),
    "conv2d_bn_gn": lambda: (Conv2dNet(), torch.randn(5, 3, 6, 5)),
    "wide_conv": lambda: (WideConvNet(), torch.randn(5, 3, 6, 7)),
    "tokens": lambda: (TokenNet(), torch.randint(0, 11, (5, 6))),
    "repeated_inplace": lambda: (Repeated(), torch.randn(5, 4)),
    "repeated_norm": lambda: (RepeatedNorm(), torch.randn(5, 2, 4, 3)),
    "tied": lambda: (Tied(), torch.randint(0, 7, (5, 3))),
    "folded": lambda: (Folded(), torch.randn(5, 4, 3)),
    "part_frozen": lambda: (PartFrozen(), torch.randn(5, 4)),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, x = CASES[name]()
    if name in ("conv2d_bn_gn", "repeated_norm"):
        _batchnorm_stats(model, x)
    model.eval()
    return model, x, torch.tensor([0, 2, 1, 2, 0])


def _paths(model: nn.Module, route: str) -> dict[str, str]:
    return {n: route for n, m in model.named_modules() if structured.rule_for(m) is not None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ["auto", "gram", "rows"])
@pytest.mark.parametrize("name", list(CASES))
def test_routes_match_generic(name: str, route: str, mode: str) -> None:
    model, x, y = _build(name)
    ref = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, implementation="generic")
    paths = None if route == "auto" else _paths(model, route)
    got = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, layer_paths=paths)
    assert rel(got, ref) <= TOL, f"{name}/{route}/{mode}: {rel(got, ref):.2e}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["seq_linear", "conv2d_bn_gn", "wide_conv", "tokens",
                                  "repeated_inplace"])
def test_cross_kernel_routes(name: str, mode: str) -> None:
    model, x, y = _build(name)
    for route in ("gram", "rows"):
        got = empirical_ntk(model, x[:3], y[:3], inputs2=x[3:], targets2=y[3:], mode=mode,
                            dtype=torch.float64, layer_paths=_paths(model, route))
        full = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64,
                             implementation="generic")
        assert rel(got, full[:3, 3:]) <= TOL


@pytest.mark.parametrize("name", ["conv2d_bn_gn", "tokens", "repeated_inplace", "tied"])
def test_layerwise_routes_match_generic(name: str) -> None:
    model, x, y = _build(name)
    ref = layerwise_ntk(model, x, y, mode="trace", dtype=torch.float64, implementation="generic")
    got = layerwise_ntk(model, x, y, mode="trace", dtype=torch.float64)
    assert ref.keys() == got.keys()
    for key in ref:
        assert rel(got[key], ref[key]) <= TOL, key


def test_structured_rules_cover_the_layers() -> None:
    """The plan takes the supported layers (so the tests above exercise the rules),
    tied weights included."""
    from ntk_callback.engine.problem import build_problem
    from ntk_callback.engine.state import cast_floating, frozen_measurement

    model, x, y = _build("conv2d_bn_gn")
    with frozen_measurement(model), cast_floating(model, torch.float64):
        problem = build_problem(model, x, y, mode="target", dtype=torch.float64)
        plan = structured.plan(problem, "auto")
    assert set(plan.modules) == {"c1", "bn", "c2", "gn", "fc"}
    model, x, y = _build("tied")
    with frozen_measurement(model), cast_floating(model, torch.float64):
        problem = build_problem(model, x, y, mode="target", dtype=torch.float64)
        plan = structured.plan(problem, "auto")
    # the weight tied between the embedding and the head: both rules take it, rows summed
    assert plan.tied == {"emb.weight"} and "emb.weight" in plan.handled


def test_conv_rows_routes_both_used() -> None:
    """Every per-probe conv gradient method runs in the cases above: unfolded patches
    (several cotangent rows), strided input (pointwise), grouped backward."""
    model = WideConvNet()
    small = [m for m in (model.c1, model.c2, model.short, model.c3)
             if m.in_channels * int(torch.tensor(m.kernel_size).prod()) <= structured.UNFOLD_MAX_PATCH]
    assert small == [model.c1, model.short]
    assert [structured.pointwise(m) for m in (model.c1, model.c2, model.short, model.c3)] == [
        False, False, True, False]


def test_forced_generic_layer_and_bad_route() -> None:
    model, x, y = _build("seq_linear")
    ref = empirical_ntk(model, x, y, dtype=torch.float64, implementation="generic")
    got = empirical_ntk(model, x, y, dtype=torch.float64, layer_paths={"a": "generic"})
    assert rel(got, ref) <= TOL
    with pytest.raises(ValueError, match="layer_paths"):
        empirical_ntk(model, x, y, layer_paths={"a": "fast"})


def test_float32_structured_close_to_float64() -> None:
    model, x, y = _build("conv2d_bn_gn")
    ref = empirical_ntk(model, x, y, mode="trace", dtype=torch.float64, implementation="generic")
    got = empirical_ntk(model, x, y, mode="trace")
    assert got.dtype == torch.float32
    assert rel(got.double(), ref) <= 1e-5


class InPlaceResidual(nn.Module):
    """torchvision's BasicBlock pattern: ``out += identity`` on a BatchNorm output and an
    in-place ReLU on a conv output, both after the capture hooks saw those tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.c1(x))
        out = self.bn(self.c2(h))
        out += h
        return self.fc(self.relu(out).mean((2, 3)))


class ViewFlatten(nn.Module):
    """``.view(n, -1)`` after a conv (valid only on contiguous activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c(x))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["target", "trace"])
@pytest.mark.parametrize("name", ["inplace_residual", "view_flatten"])
def test_capture_layout_and_inplace_fallbacks(name: str, mode: str, dtype: torch.dtype) -> None:
    """The capture pass uses activations without copies; an in-place op on a captured
    tensor switches to copies (remembered in the plan) and the kernel is still exact;
    channels-last inputs give the same kernel."""
    from ntk_callback.engine.problem import build_problem
    from ntk_callback.engine.state import frozen_measurement

    torch.manual_seed(0)
    model, x = ((InPlaceResidual(), torch.randn(6, 3, 5, 4)) if name == "inplace_residual"
                else (ViewFlatten(), torch.randn(6, 3, 5, 4)))
    _batchnorm_stats(model, x)
    model.to(dtype)
    x = x.to(dtype)
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    ref = empirical_ntk(model.double(), x.double(), y, mode=mode, implementation="generic")
    model.to(dtype)
    with frozen_measurement(model, True):
        problem = build_problem(model, x, y, mode=mode, dtype=None)
        plan = structured.plan(problem, "auto")
        got = structured.compute(problem, plan, {"": list(problem.params)}, 1 << 30).kernels[""]
    assert plan.copy_outputs == (name == "inplace_residual")
    assert rel(got.double(), ref) <= (TOL if dtype == torch.float64 else 1e-5)
    public = empirical_ntk(model, x, y, mode=mode)
    assert rel(public.double(), ref) <= (TOL if dtype == torch.float64 else 1e-5)
    if name == "inplace_residual":
        cl = empirical_ntk(model, x.contiguous(memory_format=torch.channels_last), y, mode=mode)
        assert rel(cl.double(), ref) <= (TOL if dtype == torch.float64 else 1e-5)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["target", "trace"])
@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "resnet_tiny", "vit_tiny"])
def test_gram_route_terms_filled_chunk_by_chunk(monkeypatch, name: str, mode: str) -> None:
    """A budget small enough for one or two probes a capture chunk, every Linear on the
    Gram route: each chunk's inputs and cotangents are copied into the all-probe term in
    place (never concatenated); the kernel is the float64 reference's."""
    import zoo as Z
    from ntk_callback.engine.structured import driver
    from reference import ntk_loop, rel_err
    placed: list[tuple[int, int, int]] = []
    original = driver.place_chunk

    def spy(full, part, sl, n):  # type: ignore[no-untyped-def]
        placed.append((sl.start, sl.stop, n))
        return original(full, part, sl, n)

    monkeypatch.setattr(driver, "place_chunk", spy)
    case = Z.build(name)
    gram = {m: "gram" for m, mod in case.model.named_modules() if isinstance(mod, nn.Linear)}
    K = empirical_ntk(case.model, case.inputs, case.targets, mode=mode, dtype=torch.float64,
                      memory_budget=200_000, layer_paths=gram)
    assert any(stop - start < n for start, stop, n in placed), placed
    assert rel_err(K, ntk_loop(case.model, case.inputs, case.targets, mode)) <= 1e-10
