"""The rows route of linear layers block by block (engine/structured/rowblocks.py).

Against the float64 per-sample loop of tests/reference.py: every mode, float64 and
float32, self and cross kernels, one block and many blocks (a tiny block size), the
per-layer split; the route is really taken (a spy on ``contract``); and the self-check
still catches a wrong block of rows (rule side vs autograd) and a wrong contraction
(kernel vs its rows): those layers take the exact path and the kernel stays exact.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as R
import zoo as Z
from ntk_callback import empirical_ntk, layerwise_ntk
from ntk_callback.engine.structured import driver, rowblocks

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"
)

MODES = ("target", "trace", "sum", "full")


class TokenMLP(nn.Module):
    """Embedding -> Linear -> GELU -> Linear over 6 positions, mean pool, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 24)
        self.up = nn.Linear(24, 48)
        self.down = nn.Linear(48, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h.mean(dim=1))


def _token_case(n: int = 7, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = TokenMLP()
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 40, (n, 6), generator=gen)
    targets = torch.randint(0, 5, (n,), generator=gen)
    return model, tokens, targets


ROWS = {"up": "rows", "down": "rows", "head": "rows"}


@pytest.fixture
def spy(monkeypatch):
    """Names of the terms contracted block by block."""
    seen: list[str] = []
    original = driver.contract

    def wrapped(out, mode, t1, *args, **kwargs):
        seen.append(t1.key)
        return original(out, mode, t1, *args, **kwargs)

    monkeypatch.setattr(driver, "contract", wrapped)
    return seen


@pytest.fixture
def tiny_blocks(monkeypatch):
    """One output feature a block: many blocks a layer."""
    monkeypatch.setattr(driver, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(rowblocks, "MIN_FEATURES", 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_token_mlp_every_mode_float64(mode, blocks, spy, request) -> None:
    if blocks == "many":
        request.getfixturevalue("tiny_blocks")
    model, tokens, targets = _token_case()
    got = empirical_ntk(model, tokens, targets, mode=mode, dtype=torch.float64,
                        layer_paths=ROWS)
    ref = R.ntk_loop(model, tokens, targets, mode=mode)
    assert R.rel_err(got, ref) < 1e-12
    assert {"up.weight", "down.weight", "head.weight"} <= set(spy)


@pytest.mark.parametrize("mode", ["target", "trace"])
def test_token_mlp_float32(mode, spy, tiny_blocks) -> None:
    model, tokens, targets = _token_case(n=9, seed=3)
    got = empirical_ntk(model, tokens, targets, mode=mode, layer_paths=ROWS)
    assert got.dtype == torch.float32
    assert R.rel_err(got, R.ntk_loop(model, tokens, targets, mode=mode)) < 2e-6
    assert spy


@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_cross_kernel(mode, spy, tiny_blocks) -> None:
    model, tokens, targets = _token_case(n=6, seed=5)
    _, tokens2, targets2 = _token_case(n=4, seed=6)
    got = empirical_ntk(model, tokens, targets, mode=mode, inputs2=tokens2,
                        targets2=targets2, dtype=torch.float64, layer_paths=ROWS)
    ref = R.ntk_loop(model, tokens, targets, mode=mode, inputs2=tokens2, targets2=targets2)
    assert got.shape == ref.shape
    assert R.rel_err(got, ref) < 1e-12
    assert spy


def test_layerwise_sums_and_matches(spy) -> None:
    model, tokens, targets = _token_case(n=8, seed=2)
    layers = layerwise_ntk(model, tokens, targets, dtype=torch.float64, layer_paths=ROWS)
    ref = R.layerwise_loop(model, tokens, targets)
    for key, value in ref.items():
        assert R.rel_err(layers[key], value) < 1e-12, key
    total = empirical_ntk(model, tokens, targets, dtype=torch.float64)
    assert R.rel_err(sum(layers.values()), total) < 1e-12
    assert spy


@pytest.mark.parametrize("name", ["vit_tiny", "gpt_tiny"])
@pytest.mark.parametrize("mode", ["target", "trace"])
def test_zoo_transformers_many_blocks(name, mode, spy, tiny_blocks) -> None:
    case = Z.build(name)
    got = empirical_ntk(case.model, case.inputs, case.targets, mode=mode,
                        dtype=torch.float64)
    J = R.jacobian_loop(case.model, case.inputs)[0]
    assert R.rel_err(got, R.kernel_from_jacobian(J, J, mode, case.targets)) < 1e-10
    assert spy  # their MLP / attention projections take the blocked route


def test_default_route_is_taken_for_wide_layers(spy) -> None:
    """Without forcing: over many positions (S^2 (c + o) > c o: rows beat Grams) of layers
    wider than their positions (factors smaller than rows), the cost model's rows route
    is held as factors and contracted block by block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.Tanh(), nn.Linear(96, 32), nn.Flatten(),
                          nn.Linear(16 * 32, 4))
    x = torch.randn(24, 16, 32)
    t = torch.randint(0, 4, (24,))
    got = empirical_ntk(model, x, t, dtype=torch.float64)
    assert R.rel_err(got, R.ntk_loop(model, x, t)) < 1e-12
    assert {"0.weight", "2.weight"} <= set(spy)


def test_planted_wrong_rows_are_caught(monkeypatch, tiny_blocks) -> None:
    """A block builder that drops the first output features' weight rows: the kernel and
    the rule side are both built from those rows, so only autograd's side can see it."""
    original = rowblocks._build

    def wrong(term, features, rows):
        built = original(term, features, rows)
        if features.start == 0:
            built.zero_()
        return built

    monkeypatch.setattr(rowblocks, "_build", wrong)
    model, tokens, targets = _token_case(seed=4)
    got, why = empirical_ntk(model, tokens, targets, dtype=torch.float64, layer_paths=ROWS,
                             explain=True)
    assert R.rel_err(got, R.ntk_loop(model, tokens, targets)) < 1e-12
    assert any("self-check" in r for r in why.reasons.values())
    assert why.paths["up.weight"].startswith("generic")


def test_planted_wrong_contraction_is_caught(monkeypatch) -> None:
    """A contraction that scales every block's product: caught by the kernel-vs-rows
    quadratic form."""
    original = rowblocks.add_gram

    def scaled(out, mode, a, b):
        part = torch.zeros_like(out)
        original(part, mode, a, b)
        out.add_(part, alpha=1.01)

    monkeypatch.setattr(rowblocks, "add_gram", scaled)
    model, tokens, targets = _token_case(seed=7)
    for mode in ("target", "trace"):
        got, why = empirical_ntk(model, tokens, targets, mode=mode, dtype=torch.float64,
                                 layer_paths=ROWS, explain=True)
        assert R.rel_err(got, R.ntk_loop(model, tokens, targets, mode=mode)) < 1e-12
        assert any("quadratic form" in r for r in why.reasons.values()), why.reasons


def test_self_check_off_still_exact(tiny_blocks, spy) -> None:
    model, tokens, targets = _token_case(seed=8)
    got = empirical_ntk(model, tokens, targets, mode="trace", dtype=torch.float64,
                        layer_paths=ROWS, self_check=False)
    assert R.rel_err(got, R.ntk_loop(model, tokens, targets, mode="trace")) < 1e-12
    assert spy


def test_deferrable_rule() -> None:
    """Factors are kept only where they are smaller than the rows."""
    from ntk_callback.engine.structured.terms import OuterTerm

    wide = OuterTerm("w", torch.zeros(4, 8, 64), torch.zeros(1, 4, 8, 64))
    long = OuterTerm("w", torch.zeros(4, 512, 8), torch.zeros(1, 4, 512, 8))
    assert rowblocks.deferrable(wide, 1)
    assert not rowblocks.deferrable(long, 1)
    assert rowblocks.factor_bytes(wide, 1, 10, 4) == 10 * 8 * (64 + 64) * 4


@pytest.mark.parametrize("mode", ["target", "trace"])
def test_several_capture_chunks_hold_the_factors(mode, spy, monkeypatch) -> None:
    """A budget that splits the capture into chunks: the factors are held for all probes
    and contracted after the capture (not inside the backward)."""
    eager: list[bool] = []
    original = driver._contract_held

    def held(held_terms, *args, **kwargs):
        eager.append(bool(held_terms[0]))
        return original(held_terms, *args, **kwargs)

    monkeypatch.setattr(driver, "_contract_held", held)
    model, tokens, targets = _token_case(n=9, seed=9)
    got = empirical_ntk(model, tokens, targets, mode=mode, dtype=torch.float64,
                        layer_paths=ROWS, memory_budget=100_000)
    assert R.rel_err(got, R.ntk_loop(model, tokens, targets, mode=mode)) < 1e-12
    assert spy and eager and all(eager)  # (trace: a group of output rows a call)
