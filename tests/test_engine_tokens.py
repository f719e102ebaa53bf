"""The embedding kernel from shared tokens (engine/structured/tokens.py).

Unit level: ``add_token_kernel`` against the kernel of the term's dense per-probe rows
(one-hot scatter, an independent formula) for token patterns that stress the grouping:
repeated tokens in a probe, a token every probe uses, groups of every size (several
buckets), a tiny budget (groups chunked), k > 1 rows. End to end: embedding models
against the float64 per-sample loop of tests/reference.py, with the route really taken.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as R
from ntk_callback import empirical_ntk
from ntk_callback.engine.structured import driver
from ntk_callback.engine.structured.terms import TokenTerm
from ntk_callback.engine.structured.tokens import add_token_kernel


def _dense(term: TokenTerm) -> torch.Tensor:
    rows = term.rows()                       # (n, k, V o)
    flat = rows.reshape(rows.shape[0], -1)
    return flat @ flat.T


def _term(ids: torch.Tensor, k: int, o: int, vocab: int, seed: int) -> TokenTerm:
    n, s = ids.shape
    d = torch.randn(k, n, s, o, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    return TokenTerm("emb.weight", ids, d, nn.Embedding(vocab, o))


PATTERNS = {
    "random": lambda g: torch.randint(0, 50, (9, 7), generator=g),
    "repeats": lambda g: torch.randint(0, 3, (9, 7), generator=g),   # many per probe
    "shared": lambda g: torch.cat([torch.zeros(9, 2, dtype=torch.long),
                                   torch.randint(1, 400, (9, 5), generator=g)], 1),
    "positions": lambda g: torch.arange(7).repeat(9, 1),             # every probe, all
    "ragged": lambda g: torch.tensor([[i % (j + 1) for i in range(7)] for j in range(9)]),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("budget", [1, 1 << 30])
def test_matches_dense_rows(pattern, k, budget) -> None:
    ids = PATTERNS[pattern](torch.Generator().manual_seed(0))
    term = _term(ids, k, 5, 400, seed=1)
    got = torch.zeros(9, 9, dtype=torch.float64)
    add_token_kernel(got, term, budget)
    torch.testing.assert_close(got, _dense(term), rtol=1e-13, atol=1e-13)


def test_probe_major_cotangents() -> None:
    """Gram-route cotangents are stored (n, S, k, o) and seen as (k, n, S, o)."""
    ids = PATTERNS["shared"](torch.Generator().manual_seed(2))
    d = torch.randn(9, 7, 2, 4, dtype=torch.float64).permute(2, 0, 1, 3)
    term = TokenTerm("emb.weight", ids, d, nn.Embedding(400, 4))
    got = torch.zeros(9, 9, dtype=torch.float64)
    add_token_kernel(got, term, 1 << 20)
    torch.testing.assert_close(got, _dense(term), rtol=1e-13, atol=1e-13)


class Bag(nn.Module):
    def __init__(self, vocab: int = 300, pad: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16, padding_idx=pad)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@pytest.fixture
def spy(monkeypatch):
    seen: list[str] = []
    original = driver.add_token_kernel

    def wrapped(out, term, budget):
        seen.append(term.key)
        return original(out, term, budget)

    monkeypatch.setattr(driver, "add_token_kernel", wrapped)
    return seen


@pytest.mark.parametrize("mode", ["target", "trace", "sum"])
@pytest.mark.parametrize("pad", [None, 0])
def test_end_to_end(mode, pad, spy) -> None:
    torch.manual_seed(0)
    model = Bag(pad=pad)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (10, 12), generator=g)
    ids[:, -3:] = 0                                  # a padding tail in every probe
    t = torch.randint(0, 4, (10,), generator=g)
    got = empirical_ntk(model, ids, t, mode=mode, dtype=torch.float64,
                        layer_paths={"emb": "gram"})
    assert R.rel_err(got, R.ntk_loop(model, ids, t, mode=mode)) < 1e-12
    assert spy == ["emb.weight"]
    got32 = empirical_ntk(model, ids, t, mode=mode, layer_paths={"emb": "gram"})
    assert R.rel_err(got32, R.ntk_loop(model, ids, t, mode=mode)) < 2e-6


def test_full_mode_and_cross_kernels_keep_the_gram_route(spy) -> None:
    torch.manual_seed(1)
    model = Bag()
    ids = torch.randint(0, 300, (6, 5), generator=torch.Generator().manual_seed(4))
    ids2 = torch.randint(0, 300, (4, 5), generator=torch.Generator().manual_seed(5))
    full = empirical_ntk(model, ids, mode="full", dtype=torch.float64,
                         layer_paths={"emb": "gram"})
    assert R.rel_err(full, R.ntk_loop(model, ids, mode="full")) < 1e-12
    cross = empirical_ntk(model, ids, mode="trace", inputs2=ids2, dtype=torch.float64,
                          layer_paths={"emb": "gram"})
    assert R.rel_err(cross, R.ntk_loop(model, ids, mode="trace", inputs2=ids2)) < 1e-12
    assert spy == []


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("add", [False, True])
def test_rows_into_a_slot_matches_rows(pattern, add) -> None:
    """The rows route's in-place scatter (into a slot of a wider buffer) against the
    one-hot rows."""
    ids = PATTERNS[pattern](torch.Generator().manual_seed(6))
    term = _term(ids, 1, 3, 400, seed=7)
    buf = torch.randn(9, 5 + 400 * 3 + 2, dtype=torch.float64)
    before = buf.clone()
    slot = buf[:, 5:5 + 400 * 3]
    term.rows_into(slot, add)
    expected = term.rows()[:, 0] + (before[:, 5:5 + 400 * 3] if add else 0)
    torch.testing.assert_close(slot, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(buf[:, :5], before[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(buf[:, -2:], before[:, -2:], rtol=0, atol=0)
