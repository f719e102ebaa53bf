"""Tied parameters: one weight registered in an ``nn.Embedding`` and an ``nn.Linear`` head
(GPT-2's ``lm_head`` tied to ``wte``). Its per-probe gradient is the sum of the gradients
of its uses, so the structured path sums the per-probe rows of every use (the kernel
then holds the cross terms between the embedding and the head). The planner takes such
a parameter only when every use of it is inside a call of a module whose rule covers it;
the self-check verifies the modules sharing it as one unit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import ntk_loop, rel_err
from torch import nn

import ntk_callback as N
from ntk_callback.engine import structured
from ntk_callback.engine.structured import rules as R

TOL64 = 1e-10


class TiedLM(nn.Module):
    """Token embedding, one tanh layer, a head whose weight IS the embedding's; the last
    position's logits. ``extra``: the weight is also read directly (F.linear) outside
    both modules."""

    def __init__(self, head_bias: bool = False, extra: bool = False) -> None:
        super().__init__()
        self.extra = extra
        self.wte = nn.Embedding(9, 5)
        self.mid = nn.Linear(5, 5)
        self.head = nn.Linear(5, 9, bias=head_bias)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.wte(ids)))
        out = self.head(h[:, -1])
        if self.extra:
            out = out + 0.5 * F.linear(h[:, 0], self.wte.weight)
        return out


def _case(**kw):
    torch.manual_seed(0)
    model = TiedLM(**kw).double()
    ids = torch.randint(0, 9, (6, 4), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 8, 3, 3, 5, 1])
    return model, ids, y


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_tied_weight_is_structured_and_exact(head_bias: bool, mode: str) -> None:
    model, ids, y = _case(head_bias=head_bias)
    ref = ntk_loop(model, ids, y, mode=mode)
    for check in (True, False):
        K, why = N.empirical_ntk(model, ids, y, mode=mode, self_check=check, explain=True)
        assert why.paths["wte.weight"].startswith("structured"), why
        assert all(v.startswith("structured") for v in why.paths.values()), why
        assert rel_err(K, ref) <= TOL64
    parts = N.layerwise_ntk(model, ids, y, mode=mode)
    assert rel_err(sum(parts.values()), ref) <= TOL64
    K32 = N.empirical_ntk(model.float(), ids, y, mode=mode)
    assert rel_err(K32, ref) <= 2e-5


def test_a_use_outside_the_rules_sends_the_tied_weight_to_the_exact_path() -> None:
    model, ids, y = _case(extra=True)
    K, why = N.empirical_ntk(model, ids, y, explain=True)
    assert why.paths["wte.weight"].startswith("generic"), why
    assert why.paths["mid.weight"].startswith("structured"), why
    assert rel_err(K, ntk_loop(model, ids, y, mode="target")) <= TOL64


def test_one_use_sent_to_the_exact_path_takes_the_others_along() -> None:
    """layer_paths puts the head on the exact path: the tied weight leaves the embedding's
    rule too (a parameter is never split between the routes)."""
    model, ids, y = _case()
    K, why = N.empirical_ntk(model, ids, y, layer_paths={"head": "generic"}, explain=True)
    assert why.paths["wte.weight"].startswith("generic"), why
    assert rel_err(K, ntk_loop(model, ids, y, mode="target")) <= TOL64


@pytest.fixture
def drop_head_use(monkeypatch):
    """A Linear rule that forgets its (tied) weight's term: only the embedding's rows
    remain in the sum."""
    original = R._RULES[nn.Linear]

    class Broken(R.LinearRule):
        def terms(self, module, attrs, call, d, memo):
            terms = super().terms(module, attrs, call, d, memo)
            tied = memo.get("tied") or set()
            return [t for t in terms if t.key not in tied]

    R._RULES[nn.Linear] = Broken()
    yield
    R._RULES[nn.Linear] = original


@pytest.mark.parametrize("mode", ["target", "trace"])
def test_a_dropped_use_of_a_tied_weight_is_caught(drop_head_use, mode: str) -> None:
    model, ids, y = _case()
    ref = ntk_loop(model, ids, y, mode=mode)
    wrong = N.empirical_ntk(model, ids, y, mode=mode, self_check=False)
    assert rel_err(wrong, ref) > 1e-4  # the planted bug is real...
    K, why = N.empirical_ntk(model, ids, y, mode=mode, explain=True)
    assert rel_err(K, ref) <= TOL64   # ...and the check keeps it out
    assert why.paths["wte.weight"].startswith("generic"), why
    assert "self-check" in why.reasons.get("head", "") + why.reasons.get("wte", ""), why.reasons
    assert why.paths["mid.weight"].startswith("structured"), why


def test_plan_records_the_tied_weight() -> None:
    model, ids, y = _case()
    from ntk_callback.engine.problem import build_problem
    problem = build_problem(model, ids, y, mode="target", dtype=None)
    plan = structured.plan(problem, "auto")
    assert plan.tied == {"wte.weight"}
    assert plan.units()["head"] == plan.units()["wte"]
