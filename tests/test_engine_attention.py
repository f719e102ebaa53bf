"""``nn.MultiheadAttention`` through its structured rule (it reads its projection weights
directly, so the Linear rule never sees them): every layout and mask against the
independent float64 reference, with the rule actually used; a model that consumes the
attention weights is caught by the self-check and computed exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk_callback as N
from reference import ntk_loop, rel_err


class Attn(nn.Module):
    def __init__(self, batch_first: bool, mask: str, use_weights: bool = False) -> None:
        super().__init__()
        self.batch_first, self.mask, self.use_weights = batch_first, mask, use_weights
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))                       # (n, L, E)
        n, length = h.shape[:2]
        kw: dict = {}
        if self.mask == "padding":
            pad = x[:, :, 0] > 0.3  # a per-probe mask (from the probe itself)
            pad[:, 0] = False
            kw["key_padding_mask"] = pad
        elif self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
            kw["is_causal"] = True
        elif self.mask == "cross":  # a different key/value sequence
            kw = {}
        q = h if self.batch_first else h.transpose(0, 1)
        kv = q.flip(1 if self.batch_first else 0) * 0.5 if self.mask == "cross" else q
        o, w = self.att(q, kv, kv, need_weights=self.use_weights, **kw)
        o = o if self.batch_first else o.transpose(0, 1)
        out = self.fc(o.mean(1))
        if self.use_weights:
            out = out + w.sum((1, 2)).unsqueeze(1) * 0 + w[:, 0, :3]
        return out


@pytest.mark.parametrize("mode", ["target", "trace"])
@pytest.mark.parametrize("mask", ["none", "padding", "causal", "cross"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_rule_is_exact(batch_first: bool, mask: str, mode: str) -> None:
    torch.manual_seed(0)
    model = Attn(batch_first, mask)
    x, y = torch.randn(5, 4, 3), torch.tensor([0, 1, 2, 1, 0])
    ref = ntk_loop(model, x, y, mode)
    got, why = N.empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, explain=True)
    assert rel_err(got, ref) <= 1e-10
    assert why.paths["att.in_proj_weight"] == "structured: MultiheadAttentionRule", why
    assert why.paths["att.out_proj.weight"] == "structured: MultiheadAttentionRule", why
    assert rel_err(N.empirical_ntk(model, x, y, mode=mode), ref) <= 2e-5
    layers = N.layerwise_ntk(model, x, y, mode=mode, dtype=torch.float64)
    # MultiheadAttention owns a child (out_proj): its own parameters are keyed by name
    assert set(layers) == {"inp", "att.in_proj_weight", "att.in_proj_bias", "att.out_proj", "fc"}
    assert rel_err(sum(layers.values()), ref) <= 1e-10


def test_attention_weights_used_downstream_take_the_exact_path() -> None:
    torch.manual_seed(0)
    model = Attn(True, "none", use_weights=True)
    x, y = torch.randn(5, 4, 3), torch.tensor([0, 1, 2, 1, 0])
    ref = ntk_loop(model, x, y, "trace")
    got, why = N.empirical_ntk(model, x, y, mode="trace", dtype=torch.float64, explain=True)
    assert rel_err(got, ref) <= 1e-10
    assert why.paths["att.in_proj_weight"].startswith("generic")
    assert "does not follow" in why.reasons["att"]
    unchecked = N.empirical_ntk(model, x, y, mode="trace", dtype=torch.float64, self_check=False)
    assert rel_err(unchecked, ref) <= 1e-10
