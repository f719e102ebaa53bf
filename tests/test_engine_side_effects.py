"""The engine leaves no trace on the model or the process: one test per guarantee
(the README's promise: the engine never leaves .grad, parameters, buffers, RNG state or
module flags changed)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import models as M
import reference as R
from ntk_callback import NTKError, empirical_ntk, layerwise_ntk

MODES = list(R.MODES)


class _Mixed(nn.Module):
    """BatchNorm + Dropout + nested containers, so train/eval flags can be mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.drop = nn.Dropout(0.4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.stem(x)))


def _mixed_case() -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _Mixed()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(2):
            model(torch.randn(6, 2, 4, 4, generator=g) * 2 + 1)
    x = torch.randn(5, 2, 4, 4, generator=g)
    y = torch.tensor([0, 2, 1, 1, 0])
    return model, x, y


def _flags(model: nn.Module) -> Dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _snapshot(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, object, int, torch.dtype, bool]]:
    snap = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        snap[name] = (t.detach().clone(), t, t._version, t.dtype, t.requires_grad)
    return snap


def _assert_untouched(model: nn.Module, snap: Dict[str, Tuple[torch.Tensor, object, int, torch.dtype, bool]]) -> None:
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert set(now) == set(snap)
    for name, (value, obj, version, dtype, rg) in snap.items():
        t = now[name]
        assert t is obj, f"{name} was replaced by another tensor"
        assert t.dtype == dtype, f"{name} dtype {t.dtype} != {dtype}"
        assert t.requires_grad == rg, f"{name} requires_grad changed"
        assert torch.equal(t.detach(), value), f"{name} values changed"
        assert t._version == version, f"{name} was modified in place (version {version} -> {t._version})"


@pytest.mark.parametrize("mode", MODES)
def test_train_eval_flags_restored_exactly(mode: str) -> None:
    model, x, y = _mixed_case()
    model.train()
    model.stem[1].eval()  # an eval BN inside a train container
    model.head.eval()
    model.head[2].train()  # a train Dropout inside an eval container
    before = _flags(model)
    assert len(set(before.values())) == 2, "the test needs mixed flags"
    empirical_ntk(model, x, y, mode=mode)
    assert _flags(model) == before
    layerwise_ntk(model, x, y, mode=mode)
    assert _flags(model) == before
    # eval_mode=False with a live Dropout is refused (the kernel would be random) --
    # the flags must be restored on that path too.
    with pytest.raises(NTKError):
        empirical_ntk(model, x, y, mode=mode, eval_mode=False)
    assert _flags(model) == before


def test_flags_restored_after_an_error() -> None:
    """A call that fails mid-way (non-finite output) must still restore the flags."""

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.lin(x)) * float("nan")

    model = Bad().train()
    model.drop.eval()
    before = _flags(model)
    with pytest.raises(ValueError):
        empirical_ntk(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    assert _flags(model) == before


@pytest.mark.parametrize("mode", MODES)
def test_parameters_and_buffers_bit_identical(mode: str) -> None:
    model, x, y = _mixed_case()
    model.train()  # BN in train mode would update running stats if the engine ran it so
    snap = _snapshot(model)
    assert any("num_batches_tracked" in k for k in snap)
    empirical_ntk(model, x, y, mode=mode)
    empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, chunk_size=2)
    layerwise_ntk(model, x, y, mode=mode)
    _assert_untouched(model, snap)


def test_grad_untouched() -> None:
    model, x, y = _mixed_case()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    with_grad = params[::2]
    for p in with_grad:
        p.grad = torch.randn(p.shape, generator=g)
    grads_before = {id(p): (p.grad, p.grad.clone()) for p in with_grad}
    for mode in MODES:
        empirical_ntk(model, x, y, mode=mode)
    empirical_ntk(model, x, y, dtype=torch.float64)
    layerwise_ntk(model, x, y)
    for p in params:
        if id(p) in grads_before:
            obj, value = grads_before[id(p)]
            assert p.grad is obj and torch.equal(p.grad, value)
        else:
            assert p.grad is None


def test_global_rng_state_unchanged() -> None:
    model, x, y = _mixed_case()
    model.train()
    state = torch.get_rng_state()
    for mode in MODES:
        empirical_ntk(model, x, y, mode=mode)
    layerwise_ntk(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)


def test_live_dropout_refused_and_rng_state_unchanged() -> None:
    """eval_mode=False with Dropout in train mode would make the kernel random: the engine
    refuses with an NTKError that points at eval_mode, and the caller's RNG stream is
    exactly where it was."""
    model, x, y = _mixed_case()
    model.stem[1].eval()
    model.drop.train()
    state = torch.get_rng_state()
    with pytest.raises(NTKError) as info:
        empirical_ntk(model, x, y, eval_mode=False)
    assert "eval_mode" in str(info.value) and "dropout" in str(info.value).lower()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_unchanged() -> None:
    model, x, y = _mixed_case()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    for mode in MODES:
        empirical_ntk(model, x, y, mode=mode)
    layerwise_ntk(model, x, y)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert torch.equal(torch.get_rng_state(), state)


def test_float64_leaves_model_dtype() -> None:
    model, x, y = _mixed_case()
    snap = _snapshot(model)
    K = empirical_ntk(model, x, y, dtype=torch.float64)
    assert K.dtype == torch.float64
    assert x.dtype == torch.float32, "inputs must not be converted in place"
    _assert_untouched(model, snap)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert empirical_ntk(model, x, y).dtype == torch.float32


def test_requires_grad_flags_unchanged() -> None:
    case = M.build("frozen")
    before = {n: p.requires_grad for n, p in case.model.named_parameters()}
    assert not all(before.values()) and any(before.values())
    for mode in MODES:
        empirical_ntk(case.model, case.inputs, case.targets, mode=mode)
    layerwise_ntk(case.model, case.inputs, case.targets)
    assert {n: p.requires_grad for n, p in case.model.named_parameters()} == before
    assert not case.inputs.requires_grad


def test_works_inside_no_grad() -> None:
    case = M.build("conv2d_bn")
    ref = empirical_ntk(case.model, case.inputs, case.targets, dtype=torch.float64)
    with torch.no_grad():
        K = empirical_ntk(case.model, case.inputs, case.targets, dtype=torch.float64)
        assert not torch.is_grad_enabled(), "the caller's grad mode must be restored"
    assert torch.equal(K, ref)
    assert torch.is_grad_enabled()


def test_inside_inference_mode() -> None:
    """Works inside torch.inference_mode() (Lightning runs validation hooks there), with
    inputs created in inference mode too, and leaves inference mode on for the caller."""
    case = M.build("conv2d_bn")
    ref = R.ntk_loop(case.model, case.inputs, case.targets, "target")
    with torch.inference_mode():
        x = case.inputs.clone()  # an inference tensor
        K = empirical_ntk(case.model, x, case.targets, dtype=torch.float64)
        parts = layerwise_ntk(case.model, x, case.targets, dtype=torch.float64)
        assert torch.is_inference_mode_enabled()
    assert R.rel_err(K, ref) <= 1e-12
    assert R.rel_err(sum(parts.values()), ref) <= 1e-12
    assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("name", ["dropout", "conv2d_bn"])
def test_eval_mode_measures_in_eval(name: str) -> None:
    """eval_mode=True (default) on a model left in train mode: dropout off, BatchNorm on
    its running statistics -- the kernel equals the eval-mode reference and differs from
    what the live train-mode model would give."""
    case = M.build(name)
    assert case.model.training
    ref = R.ntk_loop(case.model, case.inputs, case.targets, "full")
    K = empirical_ntk(case.model, case.inputs, case.targets, mode="full", dtype=torch.float64)
    assert R.rel_err(K, ref) <= 1e-12
    assert case.model.training
    # The test could fail: outputs in train mode differ from eval mode for this model.
    with torch.no_grad():
        torch.manual_seed(0)
        out_train = R.call_model(case.model, case.inputs)
        case.model.eval()
        out_eval = R.call_model(case.model, case.inputs)
        case.model.train()
    assert R.rel_err(out_train, out_eval) > 1e-2


def test_eval_mode_false_uses_current_mode() -> None:
    """eval_mode=False on a model without stochastic or batch-coupled layers equals the
    reference (no mode dependence), and a model in eval mode stays in eval mode."""
    case = M.build("layernorm")
    ref = R.ntk_loop(case.model, case.inputs, case.targets, "trace")
    case.model.train()
    K = empirical_ntk(case.model, case.inputs, mode="trace", dtype=torch.float64, eval_mode=False)
    assert R.rel_err(K, ref) <= 1e-12
    assert all(m.training for m in case.model.modules())


def test_float64_measurement_keeps_gradient_accumulator_hooks() -> None:
    """DistributedDataParallel all-reduces gradients from hooks on each parameter's
    gradient accumulator. A float64 measurement must not replace those accumulators (an
    assignment of a float64 tensor to ``.data`` would, and DDP ranks then train apart):
    hooks registered before the call still fire in the next backward, and the
    parameters are the same objects with the same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.LSTM(5, 4, batch_first=True))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.body(x)
            return self.out(h[:, -1])

    net = Head()
    x = torch.randn(4, 6, 3)
    y = torch.tensor([0, 1, 1, 0])
    fired: list[str] = []
    params = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    nodes = []   # held, as DDP's reducer holds them (autograd keeps only a weak ref)
    for name, p in params.items():
        nodes.append(torch.autograd.graph.get_gradient_edge(p).node)
        nodes[-1].register_hook(lambda *args, name=name: fired.append(name))
    K = empirical_ntk(net, x, y, dtype=torch.float64)
    assert K.dtype == torch.float64
    assert dict(net.named_parameters()) == params                   # same objects
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32
               for n, p in params.items())
    net(x).sum().backward()
    assert sorted(fired) == sorted(params)


class _WritesInForward(nn.Module):
    """A forward that writes buffers in place even in eval mode (a call counter, an EMA of
    activations) beside a max_norm embedding, which renormalises its own weight rows."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, max_norm=0.5)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(self.emb(ids).mean(1)))
        self.calls += 1
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.b(h)


@pytest.mark.parametrize("implementation", ["auto", "generic"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_writes_in_forward_are_put_back(implementation: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _WritesInForward().eval()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)  # rows above max_norm: the forward renormalises them
    ids = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    empirical_ntk(model, ids, y, dtype=dtype, implementation=implementation)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_counter_model_kernel_matches_reference() -> None:
    """vmap cannot run the in-place counter; the per-probe loop takes over (no error)."""
    torch.manual_seed(0)
    model = _WritesInForward().eval()
    ids = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 1, 0])
    ref = R.ntk_loop(model, ids, y, "target")
    for implementation in ("auto", "generic"):
        k = empirical_ntk(model, ids, y, dtype=torch.float64, implementation=implementation)
        assert R.rel_err(k, ref) <= 1e-10


class _ClampsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.gain.clamp_(0.0, 1.0)
        return self.a(x) * self.gain


def test_parameter_written_in_forward_is_named_in_a_warning() -> None:
    model = _ClampsWeight()
    with pytest.warns(RuntimeWarning, match="gain"):
        empirical_ntk(model, torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))


class _NoisyInEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(nn.functional.dropout(x, 0.3, training=True))


def test_randomness_in_eval_mode_names_the_fix() -> None:
    with pytest.raises(NTKError, match="even in eval mode"):
        empirical_ntk(_NoisyInEval(), torch.randn(4, 4), torch.tensor([0, 1, 2, 0]),
                      implementation="generic")
