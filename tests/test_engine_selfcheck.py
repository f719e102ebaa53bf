"""The self-check (on by default) catches what a rule gets wrong, and the exactness
invariants of the planner: a structured rule takes a parameter only when every use of it
lies inside its own module's call.

A "planted" bug is a rule that deliberately drops a term or scales it: the kernel must
still agree with the independent float64 reference (the module is sent to the exact path)
and the explanation must say why. With ``self_check=False`` the same bug shows -- proof
that the check, not luck, is what keeps the kernel exact.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_callback as N
from ntk_callback.engine import structured
from ntk_callback.engine.structured import rules as R
from reference import ntk_loop, rel_err

TOL64 = 1e-10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))                      # (n, 2, 6)
        h = torch.tanh(self.conv(h).mean(1, keepdim=True) + h.mean(1, keepdim=True))
        return self.b(self.ln(h)).mean(1)


def _case(seed: int = 0):
    torch.manual_seed(seed)
    return Net(), torch.randn(6, 2, 4), torch.tensor([0, 1, 2, 2, 1, 0])


@pytest.fixture
def planted(monkeypatch):
    """Install a broken Linear rule; yields a setter choosing the bug."""
    original = R._RULES[nn.Linear]

    def install(kind: str) -> None:
        class Broken(R.LinearRule):
            def terms(self, module, attrs, call, d, memo):
                if kind == "drop_bias":  # the weight term only: the bias goes missing
                    a = call.args[0]
                    n, k = a.shape[0], d.shape[0]
                    return [structured.OuterTerm(attrs["weight"], a.reshape(n, -1, a.shape[-1]),
                                                 d.reshape(k, n, -1, d.shape[-1]))]
                terms = super().terms(module, attrs, call, d, memo)
                if kind == "scale":  # a formula off by 0.1 %
                    terms = [t.like(t.data, t.d * 1.001) for t in terms]
                return terms

        R._RULES[nn.Linear] = Broken()

    yield install
    R._RULES[nn.Linear] = original


@pytest.mark.parametrize("kind", ["drop_bias", "scale"])
@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_planted_rule_bug_is_caught(planted, kind: str, mode: str) -> None:
    model, x, y = _case()
    ref = ntk_loop(model, x, y, mode)
    planted(kind)
    wrong = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, self_check=False)
    assert rel_err(wrong, ref) > 1e-4  # the bug is real...
    got, why = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, explain=True)
    assert rel_err(got, ref) <= TOL64  # ...and the check keeps it out of the kernel
    for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
        assert why.paths[name].startswith("generic"), why
    assert "self-check" in why.reasons["a"] and "self-check" in why.reasons["b"]
    # the other layers stay structured
    assert why.paths["conv.weight"].startswith("structured")
    assert why.paths["ln.weight"].startswith("structured")
    # float32 too, and layerwise kernels
    got32 = N.empirical_ntk(model, x, y, mode=mode)
    assert rel_err(got32, ref) <= 2e-5
    layers = N.layerwise_ntk(model, x, y, mode=mode, dtype=torch.float64)
    assert rel_err(sum(layers.values()), ref) <= TOL64


def test_self_check_passes_on_correct_rules() -> None:
    """No false alarms: correct rules stay structured, and the recorded values agree."""
    model, x, y = _case()
    for mode in ("target", "trace", "sum", "full"):
        for dtype in (torch.float64, torch.float32):
            _, why = N.empirical_ntk(model, x, y, mode=mode, dtype=dtype, explain=True)
            assert all(p.startswith("structured") for p in why.paths.values()), why
            rtol = 1e-9 if dtype == torch.float64 else 1e-4
            for pairs in why.self_check.values():
                # one cotangent row: one weighting fused into the capture pass
                assert len(pairs) == (1 if mode in ("target", "sum") else 2)
                for ours, theirs in pairs:
                    assert abs(ours - theirs) <= rtol * max(ours, theirs) + 1e-300


def test_assembly_check_catches_a_wrong_kernel(monkeypatch) -> None:
    """The kernel-vs-rows form catches an error in the kernel's assembly (here: the
    kernel is rescaled by 1 % after the rows were contracted)."""
    from ntk_callback.engine.structured import driver

    model, x, y = _case()
    ref = ntk_loop(model, x, y, "trace")
    monkeypatch.setattr(driver, "mirror_lower", lambda k: k.mul_(1.01))
    got, why = N.empirical_ntk(model, x, y, mode="trace", dtype=torch.float64, explain=True)
    assert rel_err(got, ref) <= TOL64
    assert any("quadratic form" in r for r in why.reasons.values()), why.reasons


class FunctionalUse(nn.Module):
    """``fc`` is never called; its weight enters through ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.g(x)), self.fc.weight, self.fc.bias)


class CalledAndReused(nn.Module):
    """``fc`` is called and its weight is also used directly elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h @ self.fc.weight)


class KwargCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(input=x)))


class HookScaled(nn.Module):
    """A forward hook on ``fc`` rescales its output: the rule's cotangent would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.fc.register_forward_hook(lambda m, a, o: o * 2.0)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


class ChannelsFirstLN(nn.LayerNorm):
    """ConvNeXt's LayerNorm: permutes around F.layer_norm (overrides forward)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 2, 1)


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.ln = ChannelsFirstLN(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.ln(self.conv(x))).mean(-1))


INVARIANTS = {
    "functional": (FunctionalUse, (6, 4), {"fc": "never called"}),
    "reused": (CalledAndReused, (6, 4), {"fc.weight": "used outside"}),
    "kwarg": (KwargCall, (6, 4), {"fc": "form the rule covers"}),
    "hook": (HookScaled, (6, 4), {"fc": "forward hooks"}),
    "channels_first_ln": (LNNet, (6, 2, 7), {"ln": "no structured rule"}),
}


@pytest.mark.parametrize("name", list(INVARIANTS))
@pytest.mark.parametrize("mode", ["target", "trace"])
def test_planner_refuses_uses_it_does_not_cover(name: str, mode: str) -> None:
    cls, shape, expected = INVARIANTS[name]
    torch.manual_seed(0)
    model, x, y = cls(), torch.randn(*shape), torch.tensor([0, 1, 2, 2, 1, 0])
    ref = ntk_loop(model, x, y, mode)
    got, why = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, explain=True)
    assert rel_err(got, ref) <= TOL64
    for key, text in expected.items():
        assert text in why.reasons[key], why.reasons
    # the refusal is the planner's, not the self-check's: with the check off it is exact too
    unchecked = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, self_check=False)
    assert rel_err(unchecked, ref) <= TOL64


def test_register_rule_for_a_custom_layer() -> None:
    """A user rule for a custom layer is used, and a wrong user rule is caught."""

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 3) * 0.5)

        def forward(self, x):
            return x @ self.kernel

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = Dense()

        def forward(self, x):
            return torch.tanh(self.d(x))

    torch.manual_seed(0)
    model, x, y = Model(), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    ref = ntk_loop(model, x, y, "trace")

    @N.engine.register_rule(Dense)
    class DenseRule(N.engine.Rule):
        params = ("kernel",)
        scale = 1.0

        def terms(self, module, attrs, call, d, memo):
            a = call.args[0]
            n, k = a.shape[0], d.shape[0]
            # z = a K: the outer term of K^T
            return [structured.OuterTerm(attrs["kernel"], a.reshape(n, 1, -1),
                                         self.scale * d.reshape(k, n, 1, -1))]

    try:
        got, why = N.empirical_ntk(model, x, y, mode="trace", dtype=torch.float64, explain=True)
        assert why.paths["d.kernel"] == "structured: DenseRule"
        assert rel_err(got, ref) <= TOL64
        DenseRule.scale = 1.5
        got, why = N.empirical_ntk(model, x, y, mode="trace", dtype=torch.float64, explain=True)
        assert why.paths["d.kernel"].startswith("generic")
        assert rel_err(got, ref) <= TOL64
    finally:
        R._RULES.pop(Dense, None)


def test_register_rule_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        N.engine.register_rule(int)


@pytest.mark.parametrize("mode", ["target", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_check_leaves_the_kernel_bit_for_bit(mode: str, dtype: torch.dtype) -> None:
    """In one-row modes the check scales each probe's cotangent by a power of two and
    divides the kernel by w_i w_j afterwards: exact, so the kernel (and every per-layer
    part) equals the unchecked one bit for bit, cross kernels included."""
    model, x, y = _case()
    for kw in ({}, {"inputs2": x[:3] * 0.5, "targets2": y[:3]}):
        checked = N.layerwise_ntk(model, x, y, mode=mode, dtype=dtype, **kw)
        plain = N.layerwise_ntk(model, x, y, mode=mode, dtype=dtype, self_check=False, **kw)
        assert checked.keys() == plain.keys()
        for key in checked:
            assert torch.equal(checked[key], plain[key]), key


class BatchMixer(nn.Module):
    """Outputs that depend on the other probes of the batch (a batch mean): the
    per-probe kernel's premise fails, which the fused check could not see by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h + 0.5 * h.mean(0, keepdim=True))


@pytest.mark.parametrize("mode", ["target", "trace"])
def test_batch_dependent_outputs_take_the_exact_path(mode: str) -> None:
    torch.manual_seed(0)
    model = BatchMixer().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    K, why = N.empirical_ntk(model, x, y, mode=mode, explain=True)
    assert all(p.startswith("generic") for p in why.paths.values()), why
    generic = N.empirical_ntk(model, x, y, mode=mode, implementation="generic")
    assert rel_err(K, generic) <= TOL64


class UpcastNorm(nn.Module):
    """An RMS norm computed in float32 whatever the input's dtype (as Hugging Face's T5
    and Llama norms do), between two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = (h * torch.rsqrt(var + 1e-6)).to(h.dtype) * self.scale
        return self.b(h).mean(1)


@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_float64_measurement_of_a_float32_upcasting_model(planted, mode: str) -> None:
    """The check's tolerance follows the precision the forward actually computes in: a
    float64 measurement of a model with a float32 norm inside carries float32 round-off,
    so the correct Linear rules must pass (before, trace mode sent them all to the exact
    path), and a planted 0.1 % rule error must still be caught."""
    model, x, y = _case()
    model = UpcastNorm()
    ref = ntk_loop(model, x, y, mode)
    K, why = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, explain=True)
    assert why.paths["a.weight"].startswith("structured"), why
    assert why.paths["b.weight"].startswith("structured"), why
    assert rel_err(K, ref) <= 1e-6
    planted("scale")
    K, why = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, explain=True)
    assert why.paths["a.weight"].startswith("generic"), why
    assert rel_err(K, ref) <= 1e-6
