"""Structured per-layer rules: kernels from layer inputs and output cotangents.

For a layer ``z = layer(a; w)`` inside the network, the per-probe gradient of a
cotangent row with respect to ``w`` depends only on the layer input and the cotangent
at its output (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel"). One
batched forward captures every input; one backward a cotangent row gives every
cotangent; each layer's rule turns them into kernel terms.

Modules, one job each:

* :mod:`.terms`     -- term kinds (outer, token, conv, sum, scale, bn): rows, sizes, the
  probe-weighted gradient for the self-check;
* :mod:`.rules`     -- the rule table (``register_rule``) and the built-in rules for
  Linear, Conv1d/2d, BatchNorm (eval), LayerNorm, GroupNorm and Embedding;
* :mod:`.planner`   -- which parameters a rule provably covers (census of the trial
  forward), the route cost model;
* :mod:`.capture`   -- the hooked forward and the per-row backward passes;
* :mod:`.driver`    -- capture chunks, routes, rows buffers, Gram products, the kernel;
* :mod:`.rowblocks` -- linear layers' per-probe rows a cache-sized block at a time;
* :mod:`.tokens`    -- an embedding's self-kernel from the tokens probes share;
* :mod:`.convmath`  -- convolution rows and Grams (unfold, grouped, transposed);
* :mod:`.checkdata` -- the self-check's data: check vectors, autograd's side, the rules'
  side, the fused check's premises;
* :mod:`.selfcheck` -- the verdict: every structured kernel verified against autograd;
* :mod:`.factormode` -- the kernel's per-probe factors instead of the kernel;
* :mod:`.ranks`     -- the probes of one call split across ranks (DDP).

Everything a rule does not provably cover takes the exact generic path.
"""
from .capture import Fallback
from .driver import Result, RowGroups, compute
from .planner import ROUTES, Plan, plan
from .rules import Call, Rule, register_rule, rule_for
from .selfcheck import Verdict, verify
from .terms import (
    UNFOLD_MAX_PATCH,
    BatchNormTerm,
    ConvTerm,
    OuterTerm,
    ScaleTerm,
    SumTerm,
    Term,
    TokenTerm,
    pointwise,
)

__all__ = ["Fallback", "Result", "RowGroups", "compute", "ROUTES", "Plan", "plan", "Call", "Rule",
           "register_rule", "rule_for", "Verdict", "verify", "Term", "OuterTerm",
           "TokenTerm", "ConvTerm", "SumTerm", "ScaleTerm", "BatchNormTerm",
           "UNFOLD_MAX_PATCH", "pointwise"]
