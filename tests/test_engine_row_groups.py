"""Trace-mode kernels whose Gram-route cotangents of all output rows would not fit the
memory budget are computed a group of rows at a time (each group its own capture pass,
the kernels summed): the same kernel as the float64 per-sample reference, the self-check
still on guard, and every group covering the same modules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk_callback as N
from ntk_callback.engine import structured
from ntk_callback.engine.structured import rules as R
from reference import ntk_loop, rel_err


class TokenNet(nn.Module):
    """Embedding, two Linear layers over 6 tokens, mean over tokens: 12 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(self.emb(ids)))).mean(1)


def _case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return TokenNet().double(), torch.randint(0, 9, (7, 6), generator=g)


@pytest.fixture
def groups(monkeypatch):
    """Records the number of cotangent rows of every structured capture (compute call)."""
    seen: list[int] = []
    original = structured.compute

    def spy(problem, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(problem.cot1.shape[1])
        return original(problem, *args, **kwargs)

    monkeypatch.setattr(structured, "compute", spy)
    return seen


# the routes forced to Gram: their cotangents (7 probes x 6 tokens x 16 / 12 outputs x 12
# rows, float64) are ~150 KB against half of a 64 KiB budget
PATHS = {"a": "gram", "b": "gram"}


def test_row_groups_give_the_reference_kernel(groups) -> None:
    model, ids = _case()
    ref = ntk_loop(model, ids, None, "trace")
    K, why = N.empirical_ntk(model, ids, mode="trace", memory_budget=64 << 10,
                             layer_paths=PATHS, explain=True)
    assert rel_err(K, ref) <= 1e-10
    assert groups[0] == 12 and len(groups) > 2 and max(groups[1:]) < 12, groups
    assert sum(groups[1:]) == 12, groups  # the groups cover every row once
    assert why.paths["a.weight"].startswith("structured"), why
    assert why.paths["b.weight"].startswith("structured"), why
    parts = N.layerwise_ntk(model, ids, mode="trace", memory_budget=64 << 10,
                            layer_paths=PATHS)
    assert rel_err(sum(parts.values()), ref) <= 1e-10
    # a large budget: one capture of all 12 rows, the same kernel
    groups.clear()
    big = N.empirical_ntk(model, ids, mode="trace", layer_paths=PATHS)
    assert groups == [12] and rel_err(big, K) <= 1e-12


def test_row_groups_keep_the_self_check(monkeypatch, groups) -> None:
    model, ids = _case()
    ref = ntk_loop(model, ids, None, "trace")

    class Scaled(R.LinearRule):
        def terms(self, module, attrs, call, d, memo):  # type: ignore[no-untyped-def]
            return [t.like(t.data, t.d * 1.001) for t in super().terms(module, attrs, call, d, memo)]

    monkeypatch.setitem(R._RULES, nn.Linear, Scaled())
    K, why = N.empirical_ntk(model, ids, mode="trace", memory_budget=64 << 10,
                             layer_paths=PATHS, explain=True)
    assert rel_err(K, ref) <= 1e-10
    assert why.paths["a.weight"].startswith("generic"), why
    assert "self-check" in why.reasons["a"], why.reasons
    assert why.paths["emb.weight"].startswith("structured"), why


def test_full_mode_is_not_split(groups) -> None:
    # full mode pairs every row with every other: no groups of rows
    model, ids = _case()
    K = N.empirical_ntk(model, ids, mode="full", memory_budget=64 << 10, layer_paths=PATHS)
    assert rel_err(K, ntk_loop(model, ids, None, "full")) <= 1e-10
    assert set(groups) == {12}, groups
