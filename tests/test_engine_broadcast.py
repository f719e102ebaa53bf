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


def test_without_the_check_broadcast_calls_take_the_exact_path() -> None:
    model, ids, y = _case("add")
    K, why = N.empirical_ntk(model, ids, y, self_check=False, explain=True)
    assert why.paths["pos.weight"].startswith("generic"), why
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
