"""Broadcast calls: a module called once on an input of batch size 1 shared by every probe
(Hugging Face's position ids of shape (1, S)) whose output the model adds to per-probe
tensors. With the self-check on, the capture pass expands the call to one copy a probe and
the rule takes it (BERT's position embeddings no longer force a whole exact pass); the
check verifies the per-probe treatment, so a model that uses the shared output any other
way falls back to the exact path. Without the check such calls stay on the exact path.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk_callback as N
from reference import ntk_loop, rel_err

TOL64 = 1e-10


class PosNet(nn.Module):
    """Token + position embeddings, the positions as (1, S) ids; ``use`` says how the
    shared (1, S, d) position output enters: added (broadcast, per probe), or through
    ops that mix the copies once they are expanded."""

    def __init__(self, use: str = "add") -> None:
        super().__init__()
        self.use = use
        self.tok, self.pos = nn.Embedding(11, 6), nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))           # (1, S, 6)
        if self.use == "first":
            pos = pos[0]                                                    # (S, 6)
        elif self.use == "mean":
            pos = pos.mean(0, keepdim=True)
        h = torch.tanh(self.tok(ids) + pos)
        return self.head(h).sum(1)


def _case(use: str):
    torch.manual_seed(0)
    model = PosNet(use).double()
    ids = torch.randint(0, 11, (7, 5), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 1, 0, 2, 1])
    return model, ids, y


@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_broadcast_embedding_is_structured_and_exact(mode: str) -> None:
    model, ids, y = _case("add")
    ref = ntk_loop(model, ids, y, mode=mode)
    K, why = N.empirical_ntk(model, ids, y, mode=mode, explain=True)
    assert why.paths["pos.weight"] == "structured: EmbeddingRule", why
    assert rel_err(K, ref) <= TOL64
    parts = N.layerwise_ntk(model, ids, y, mode=mode)
    assert rel_err(parts["pos"], ntk_loop(_only(model, "pos"), ids, y, mode=mode)) <= TOL64
    K32 = N.empirical_ntk(model.float(), ids, y, mode=mode)
    assert rel_err(K32, ref) <= 2e-5


@pytest.mark.parametrize("use", ["add", "first", "mean"])
def test_without_the_check_broadcast_copies_are_still_verified(use: str) -> None:
    """self_check=False skips the autograd comparison, not the broadcast rules' premise:
    each probe's cotangent must reach only its own copy (a backward a probe on the first
    three probes); a model that reads one copy for all probes, or their mean, is caught
    by it and takes the exact path."""
    model, ids, y = _case(use)
    K, why = N.empirical_ntk(model, ids, y, self_check=False, explain=True)
    if use == "add":
        assert why.paths["pos.weight"] == "structured: EmbeddingRule", why
    else:
        assert why.paths["pos.weight"].startswith("generic"), why
        assert "another probe's copy" in why.reasons.get("pos", ""), why.reasons
    assert rel_err(K, ntk_loop(model, ids, y, mode="target")) <= TOL64


@pytest.mark.parametrize("use", ["first", "mean"])
def test_a_shared_output_used_across_copies_is_caught(use: str) -> None:
    """pos[0] / pos.mean(0) of the expanded output would hand every probe's cotangent to
    one copy (or 1/n of each): the self-check sees it and the module takes the exact
    path, so the kernel stays exact."""
    model, ids, y = _case(use)
    K, why = N.empirical_ntk(model, ids, y, explain=True)
    assert why.paths["pos.weight"].startswith("generic"), why
    assert "self-check" in why.reasons.get("pos", ""), why.reasons
    assert rel_err(K, ntk_loop(model, ids, y, mode="target")) <= TOL64


def _only(model: nn.Module, prefix: str) -> nn.Module:
    """A copy of ``model`` whose only trainable parameters are those under ``prefix``."""
    import copy
    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith(prefix + "."))
    return m


class TokenNet(nn.Module):
    """A ViT-like stem: a cls token expanded over the probes and concatenated, position
    embeddings added by broadcast (both plain Parameters of a module without a rule);
    ``use="first"`` hands every probe the first probe's cls copy."""

    def __init__(self, use: str = "per_probe") -> None:
        super().__init__()
        self.use = use
        self.proj = nn.Linear(4, 6)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 4, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls.expand(x.shape[0], -1, -1)
        if self.use == "first":
            cls = cls[:1].expand(x.shape[0], -1, -1)
        h = torch.tanh(torch.cat([cls, self.proj(x)], 1) + self.pos)
        return self.head(h).sum(1)


def _token_case(use: str = "per_probe"):
    torch.manual_seed(0)
    model = TokenNet(use).double()
    x = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x, torch.tensor([0, 2, 1, 1, 0, 2, 1])


@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_broadcast_parameters_are_structured_and_exact(mode: str) -> None:
    model, x, y = _token_case()
    ref = ntk_loop(model, x, y, mode=mode)
    K, why = N.empirical_ntk(model, x, y, mode=mode, explain=True)
    assert why.paths["cls"] == why.paths["pos"] == "structured: BroadcastUseRule", why
    assert rel_err(K, ref) <= TOL64
    K32 = N.empirical_ntk(model.float(), x.float(), y, mode=mode)
    assert rel_err(K32, ref) <= 2e-5
    # without the check too (their copies verified per probe)
    K, why = N.empirical_ntk(model.double(), x, y, mode=mode, self_check=False, explain=True)
    assert why.paths["cls"] == "structured: BroadcastUseRule", why
    assert rel_err(K, ref) <= TOL64


def test_a_broadcast_parameter_shared_across_probes_is_caught() -> None:
    model, x, y = _token_case("first")
    K, why = N.empirical_ntk(model, x, y, explain=True)
    assert why.paths["cls"].startswith("generic"), why
    assert "self-check" in why.reasons.get("cls", ""), why.reasons
    assert rel_err(K, ntk_loop(model, x, y, mode="target")) <= TOL64


def test_a_dropped_broadcast_sum_is_caught(monkeypatch) -> None:
    """A planted bug in the new rule: each broadcast parameter's rows lose their first
    entry (a dropped term); the check sends them to the exact path."""
    from ntk_callback.engine.structured import rules as R
    original = R.BroadcastUseRule.terms

    def broken(self, module, attrs, call, d, memo):
        terms = original(self, module, attrs, call, d, memo)
        return [t.like(t.data, t.d * (torch.arange(t.d.shape[2]) > 0).to(t.d).reshape(1, 1, -1, 1))
                for t in terms]

    monkeypatch.setattr(R.BroadcastUseRule, "terms", broken)
    model, x, y = _token_case()
    for mode in ("target", "trace"):
        K, why = N.empirical_ntk(model, x, y, mode=mode, explain=True)
        assert why.paths["pos"].startswith("generic") and why.paths["cls"].startswith("generic")
        assert "self-check" in why.reasons.get("pos", ""), why.reasons
        assert rel_err(K, ntk_loop(model, x, y, mode=mode)) <= TOL64


class PlainPosNet(nn.Module):
    """Position embeddings on ids without a batch dimension, ``pos(arange(S))`` of shape
    (S, d), added to every probe's tokens (plain BERT / GPT-2); ``use="flip"`` flips the
    output along dim 0 first, which for the per-probe copies would hand probe i's
    cotangent to probe n-1-i's copy."""

    def __init__(self, use: str = "add") -> None:
        super().__init__()
        self.use = use
        self.tok, self.pos = nn.Embedding(11, 6), nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.arange(ids.shape[1]))                          # (S, 6)
        if self.use == "flip":
            pos = pos.flip(0)
        h = torch.tanh(self.tok(ids) + pos)
        return self.head(h).sum(1)


def _plain_case(use: str = "add", n: int = 7):
    torch.manual_seed(0)
    model = PlainPosNet(use).double()
    ids = torch.randint(0, 11, (n, 5), generator=torch.Generator().manual_seed(1))
    return model, ids, torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["target", "trace", "full"])
@pytest.mark.parametrize("n", [7, 5])
def test_unbatched_position_embedding_is_structured_and_exact(mode: str, n: int) -> None:
    """n = 5 = S: the chunk has exactly S probes, and the call stays a broadcast call (its
    form is the trial forward's, where the (S,) ids had no batch dimension)."""
    model, ids, y = _plain_case(n=n)
    ref = ntk_loop(model, ids, y, mode=mode)
    K, why = N.empirical_ntk(model, ids, y, mode=mode, explain=True)
    assert why.paths["pos.weight"] == "structured: UnbatchedEmbeddingRule", why
    assert rel_err(K, ref) <= TOL64
    parts = N.layerwise_ntk(model, ids, y, mode=mode)
    assert rel_err(parts["pos"], ntk_loop(_only(model, "pos"), ids, y, mode=mode)) <= TOL64
    K, why = N.empirical_ntk(model, ids, y, mode=mode, self_check=False, explain=True)
    assert why.paths["pos.weight"] == "structured: UnbatchedEmbeddingRule", why
    assert rel_err(K, ref) <= TOL64


def test_unbatched_output_used_across_copies_is_caught() -> None:
    model, ids, y = _plain_case("flip")
    K, why = N.empirical_ntk(model, ids, y, explain=True)
    assert why.paths["pos.weight"].startswith("generic"), why
    assert "self-check" in why.reasons.get("pos", ""), why.reasons
    assert rel_err(K, ntk_loop(model, ids, y, mode="target")) <= TOL64


def test_a_dropped_unbatched_embedding_term_is_caught(monkeypatch) -> None:
    """A planted bug in the unbatched form: the first position's cotangent is dropped;
    the check sends the embedding to the exact path."""
    from ntk_callback.engine.structured import rules as R
    original = R.UnbatchedEmbeddingRule.terms

    def broken(self, module, attrs, call, d, memo):
        keep = (torch.arange(d.shape[2]) > 0).to(d).reshape(1, 1, -1, 1)
        return original(self, module, attrs, call, d * keep, memo)

    monkeypatch.setattr(R.UnbatchedEmbeddingRule, "terms", broken)
    model, ids, y = _plain_case()
    for mode in ("target", "trace"):
        K, why = N.empirical_ntk(model, ids, y, mode=mode, explain=True)
        assert why.paths["pos.weight"].startswith("generic"), why
        assert "self-check" in why.reasons.get("pos", ""), why.reasons
        assert rel_err(K, ntk_loop(model, ids, y, mode=mode)) <= TOL64


class _PositionsOfLengthN(nn.Module):
    """Position ids arange(S) without a batch dimension: with S equal to the number of
    probes (and to the trial batch) the (S,) input looks batched by its size alone."""

    def __init__(self, s: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 6)
        self.pos = nn.Embedding(s, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(x).mean(1))


@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("self_check", [True, False])
def test_unbatched_input_of_the_batch_size_is_not_taken_as_batched(s: int,
                                                                   self_check: bool) -> None:
    torch.manual_seed(0)
    model = _PositionsOfLengthN(s)
    ids = torch.randint(0, 10, (s, s), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (s,), generator=torch.Generator().manual_seed(2))
    ref = ntk_loop(model, ids, y, "target")
    k, why = N.empirical_ntk(model, ids, y, dtype=torch.float64, explain=True,
                           self_check=self_check)
    assert rel_err(k, ref) <= 1e-10
    assert "coincidence" in why.reasons.get("pos", "")
