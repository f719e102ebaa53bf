"""The engine on real architectures (tests/zoo.py) against the float64 per-sample
autograd loop of tests/reference.py.

Every zoo model x mode (target, trace) x dtype (float64 via ``dtype=torch.float64``:
<= 1e-10 relative Frobenius error; float32 default: <= 2e-5 against the float64 copy);
sum and full in float64; the per-layer split; the generic implementation; no side
effects on parameters, buffers and ``.grad`` (bitwise); the two references against each
other where ``vmap`` can run the model; and tiny randomly initialised Hugging Face
``transformers`` models (GPT-2 with a tied head, BERT, DistilBERT, ViT, Llama with
grouped-query attention), built from config objects (no downloads).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import nn

import reference as R
import zoo as Z
from models import Case
from ntk_callback import empirical_ntk, layerwise_ntk

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"
)

NAMES = list(Z.ZOO)
TOL64 = 1e-10
TOL32 = 2e-5
DTYPES = {"float64": torch.float64, "float32": None}  # None: the model's dtype (float32)
# torch.func.vmap cannot run these models (RNN in-place state, saved-tensor hooks of
# activation checkpointing): only reference (a), the per-sample loop, applies.
NO_VMAP_TAGS = {"rnn", "checkpoint"}


@functools.lru_cache(maxsize=None)
def _jacobian(name: str) -> torch.Tensor:
    """Reference (a) Jacobian (N, O, P) of a freshly built zoo case, once per session."""
    case = Z.build(name)
    return R.jacobian_loop(case.model, case.inputs)[0]


def _reference(name: str, mode: str) -> torch.Tensor:
    J = _jacobian(name)
    return R.kernel_from_jacobian(J, J, mode, Z.build(name).targets)


def _shape(case: Case, mode: str) -> Tuple[int, ...]:
    n, o = case.num_samples, case.num_outputs
    return (n, n, o, o) if mode == "full" else (n, n)


# ----------------------------------------------------------------- side effects
def _seed_grads(model: nn.Module) -> None:
    """Give every other trainable parameter a non-trivial .grad (the rest keep None)."""
    g = torch.Generator().manual_seed(123)
    for k, p in enumerate(p for p in model.parameters() if p.requires_grad):
        if k % 2 == 0:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _snapshot(model: nn.Module) -> Dict[str, Any]:
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, snap: Dict[str, Any], what: str) -> None:
    params = dict(model.named_parameters())
    assert set(params) == set(snap["params"]), f"{what}: parameter set changed"
    for n, (obj, val, rg) in snap["params"].items():
        p = params[n]
        assert p is obj, f"{what}: parameter {n} was replaced"
        assert p.dtype == val.dtype and p.requires_grad == rg, f"{what}: parameter {n} dtype / requires_grad"
        assert torch.equal(p.detach(), val), f"{what}: parameter {n} changed"
        g0 = snap["grads"][n]
        if g0 is None:
            assert p.grad is None, f"{what}: {n}.grad was None and is now set"
        else:
            assert p.grad is not None and p.grad.dtype == g0.dtype and torch.equal(p.grad, g0), f"{what}: {n}.grad changed"
    buffers = dict(model.named_buffers())
    assert set(buffers) == set(snap["buffers"]), f"{what}: buffer set changed"
    for n, b0 in snap["buffers"].items():
        b = buffers[n]
        assert b.dtype == b0.dtype and torch.equal(b, b0), f"{what}: buffer {n} changed"
    assert {n: m.training for n, m in model.named_modules()} == snap["training"], f"{what}: train/eval flags changed"


# ------------------------------------------------------------ engine vs reference
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["target", "trace"])
@pytest.mark.parametrize("name", NAMES)
def test_zoo_matches_reference(name: str, mode: str, dtype: str) -> None:
    case = Z.build(name)
    K = empirical_ntk(case.model, case.inputs, case.targets, mode=mode, dtype=DTYPES[dtype])
    assert K.dtype == (DTYPES[dtype] or torch.float32)
    assert tuple(K.shape) == _shape(case, mode)
    err = R.rel_err(K, _reference(name, mode))
    tol = TOL64 if dtype == "float64" else TOL32
    assert err <= tol, f"{name}/{mode}/{dtype}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_sum_and_full_float64(name: str) -> None:
    case = Z.build(name)
    for mode in ("sum", "full"):
        K = empirical_ntk(case.model, case.inputs, mode=mode, dtype=torch.float64)
        assert tuple(K.shape) == _shape(case, mode), mode
        err = R.rel_err(K, _reference(name, mode))
        assert err <= TOL64, f"{name}/{mode}: relative error {err:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_layerwise_float64(name: str) -> None:
    case = Z.build(name)
    ref_parts = R.layerwise_loop(case.model, case.inputs, case.targets, "target")  # before the engine runs
    parts = layerwise_ntk(case.model, case.inputs, case.targets, mode="target", dtype=torch.float64)
    assert set(parts) == set(ref_parts), f"keys {sorted(parts)} != {sorted(ref_parts)}"
    total = _reference(name, "target")
    assert R.rel_err(sum(parts.values()), total) <= TOL64, "the parts do not sum to the total"
    for key, ref in ref_parts.items():
        assert parts[key].shape == ref.shape, key
        err = R.rel_err(parts[key], ref)
        assert err <= TOL64, f"{name}: layer {key!r} relative error {err:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_generic_implementation_float64(name: str) -> None:
    case = Z.build(name)
    for mode in ("target", "trace"):
        K = empirical_ntk(case.model, case.inputs, case.targets, mode=mode, dtype=torch.float64,
                          implementation="generic")
        err = R.rel_err(K, _reference(name, mode))
        assert err <= TOL64, f"{name}/{mode}: generic relative error {err:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_no_side_effects(name: str) -> None:
    """Parameters (same objects, bitwise), .grad (set or None), buffers (BN running
    statistics) and train/eval flags are as they were, after a float64 call (the model is
    cast and cast back) and a float32 call."""
    case = Z.build(name)
    _seed_grads(case.model)
    snap = _snapshot(case.model)
    empirical_ntk(case.model, case.inputs, case.targets, mode="target", dtype=torch.float64)
    _assert_unchanged(case.model, snap, f"{name} after float64 target")
    empirical_ntk(case.model, case.inputs, mode="trace")
    _assert_unchanged(case.model, snap, f"{name} after float32 trace")
    layerwise_ntk(case.model, case.inputs, case.targets, mode="target", dtype=torch.float64)
    _assert_unchanged(case.model, snap, f"{name} after float64 layerwise")


@pytest.mark.parametrize("name", NAMES)
def test_zoo_structured_rules_exact_without_self_check(name: str) -> None:
    """The self-check is a safety net (two random probe weightings), not the mechanism:
    every structured rule the planner picks must be exact on its own."""
    case = Z.build(name)
    for mode in ("target", "trace", "full"):
        K = empirical_ntk(case.model, case.inputs, case.targets, mode=mode, dtype=torch.float64, self_check=False)
        err = R.rel_err(K, _reference(name, mode))
        assert err <= TOL64, f"{name}/{mode}: relative error {err:.3e} with self_check=False"


# ----------------------------------------------------------- the reference itself
@pytest.mark.parametrize("name", [n for n in NAMES if not (Z.build(n).tags & NO_VMAP_TAGS)])
def test_zoo_references_agree(name: str) -> None:
    """Reference (a) (per-sample loop) and reference (b) (vmap(jacrev)) agree, and the
    kernel is not degenerate, so an engine failure above is the engine's."""
    case = Z.build(name)
    full_b = R.full_kernel_func(case.model, case.inputs)
    assert R.rel_err(_reference(name, "full"), full_b) <= 1e-12
    assert float(torch.linalg.vector_norm(full_b)) > 1e-3


def test_zoo_cases_are_deterministic_and_small() -> None:
    for name, builder in Z.ZOO.items():
        a, b = builder(0), builder(0)
        assert a.name == name and a.tags, name
        assert 4 <= a.num_samples <= 6, name
        assert a.targets.dtype == torch.long and int(a.targets.max()) < a.num_outputs, name
        assert sum(p.numel() for p in a.model.parameters()) <= 3000, name
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        xa, xb = [], []
        R.map_tensors(xa.append, a.inputs)
        R.map_tensors(xb.append, b.inputs)
        assert len(xa) == len(xb) and all(torch.equal(u, v) for u, v in zip(xa, xb)), name


# ------------------------------------------------------------ Hugging Face models
class _LastLogits(nn.Module):
    """A causal LM as an (N, vocab) model: the logits of the last position."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits[:, -1]


class _TokenCall(nn.Module):
    """forward(input_ids, attention_mask) -> the HF ModelOutput (the engine's output_fn
    takes ``.logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


class _TokenLogits(nn.Module):
    """For the reference (which has no output_fn): ``inner(...).logits``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids, attention_mask).logits


class _PixelLogits(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values).logits


def _logits(out: Any) -> torch.Tensor:
    return out.logits


def _hf_ids(n: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def _hf_case(name: str) -> Tuple[nn.Module, Any, torch.Tensor, Optional[Callable[[Any], torch.Tensor]], nn.Module, int]:
    """(model, inputs, targets, output_fn, model for the reference, O), freshly built."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "gpt2_tied":
        cfg = T.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=16,
                           tie_word_embeddings=True, **common)
        cfg._attn_implementation = "eager"
        lm = T.GPT2LMHeadModel(cfg)
        assert lm.lm_head.weight is lm.transformer.wte.weight, "the head must be tied"
        model = _LastLogits(lm)
        return model, _hf_ids(4, 6, 32), Z._labels(4, 32, 0), None, model, 32
    if name == "llama_gqa":
        cfg = T.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, **common)
        cfg._attn_implementation = "eager"
        model = _LastLogits(T.LlamaForCausalLM(cfg))
        return model, _hf_ids(4, 6, 32), Z._labels(4, 32, 0), None, model, 32
    if name in ("bert", "distilbert"):
        if name == "bert":
            cfg = T.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=16, num_labels=3, pad_token_id=0)
            cfg._attn_implementation = "eager"
            hf = T.BertForSequenceClassification(cfg)
        else:
            cfg = T.DistilBertConfig(vocab_size=32, dim=8, n_layers=1, n_heads=2, hidden_dim=16,
                                     max_position_embeddings=16, num_labels=3, pad_token_id=0)
            cfg._attn_implementation = "eager"
            hf = T.DistilBertForSequenceClassification(cfg)
        model = _TokenCall(hf)
        batch = Z._token_batch(5, 6, 32, 0)
        return model, batch, Z._labels(5, 3, 0), _logits, _TokenLogits(model), 3
    if name == "vit":
        cfg = T.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=16, num_labels=3)
        cfg._attn_implementation = "eager"
        hf = T.ViTForImageClassification(cfg)
        x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        return hf, x, Z._labels(5, 3, 0), _logits, _PixelLogits(hf), 3
    raise KeyError(name)


HF_NAMES = ["gpt2_tied", "bert", "distilbert", "vit", "llama_gqa"]


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_transformers_match_reference(name: str) -> None:
    model, x, t, output_fn, ref_model, o = _hf_case(name)
    assert model.training, "HF models built from a config are in train mode (dropout live)"
    J = R.jacobian_loop(ref_model, x)[0]
    _seed_grads(model)
    snap = _snapshot(model)
    for mode in ("target", "trace", "full"):
        ref = R.kernel_from_jacobian(J, J, mode, t)
        for dtype in (torch.float64, None):
            if mode == "full" and dtype is None:
                continue
            K = empirical_ntk(model, x, t, mode=mode, dtype=dtype, output_fn=output_fn)
            assert K.dtype == (dtype or torch.float32)
            n = R.num_samples(x)
            assert tuple(K.shape) == ((n, n, o, o) if mode == "full" else (n, n))
            err = R.rel_err(K, ref)
            tol = TOL64 if dtype is torch.float64 else TOL32
            assert err <= tol, f"{name}/{mode}/{dtype}: relative error {err:.3e} > {tol:.0e}"
            _assert_unchanged(model, snap, f"{name}/{mode}/{dtype}")
    # Per-layer split. Keys are those of the engine's model; the reference model may wrap
    # it (prefix "inner."). GPT-2's lm_head shares its weight with wte: the tied tensor
    # belongs to one key only (its first owner in named_modules() order, which is where
    # named_parameters() lists it); tests/reference.layer_groups would list it under both.
    parts = layerwise_ntk(model, x, t, mode="target", dtype=torch.float64, output_fn=output_fn)
    J, names, slices = R.jacobian_loop(ref_model, x)
    where = dict(zip(names, slices))
    prefix = "" if ref_model is model else "inner."
    groups = {k[len(prefix):]: v for k, v in _layer_groups_first_owner(ref_model).items()}
    assert set(parts) == set(groups), f"keys {sorted(set(parts) ^ set(groups))} differ"
    assert R.rel_err(sum(parts.values()), R.kernel_from_jacobian(J, J, "target", t)) <= TOL64
    for key, pnames in groups.items():
        cols = torch.cat([torch.arange(where[p].start, where[p].stop) for p in pnames])
        ref = R.kernel_from_jacobian(J[:, :, cols], J[:, :, cols], "target", t)
        err = R.rel_err(parts[key], ref)
        assert err <= TOL64, f"{name}: layer {key!r} relative error {err:.3e}"
    _assert_unchanged(model, snap, f"{name}/layerwise")


def _layer_groups_first_owner(model: nn.Module) -> Dict[str, list]:
    """tests/reference.layer_groups, with a parameter registered on several modules
    (tied weights) given to its first owner only, under its named_parameters() name."""
    seen = set()
    groups: Dict[str, list] = {}
    for mname, mod in model.named_modules():
        direct = []
        for pn, p in mod.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                direct.append(f"{mname}.{pn}" if mname else pn)
        if not direct:
            continue
        if any(True for _ in mod.children()):
            for fn in direct:
                groups[fn] = [fn]
        else:
            groups[mname] = direct
    return groups


def test_hf_conv1d_takes_the_structured_path() -> None:
    """Hugging Face's ``Conv1D`` (GPT-2's transposed-weight Linear) has a rule, registered
    the first time one is met (the engine never imports transformers itself): every
    Conv1D weight and bias is structured and the kernel matches the reference (the
    embedding/head weight tied between them too: their rows are summed)."""
    T = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model, x, t, _, ref_model, _ = _hf_case("gpt2_tied")
    model = model.double()
    K, why = empirical_ntk(model, x, t, dtype=torch.float64, explain=True)
    conv = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, Conv1D)
            for p in ("weight", "bias")}
    assert len(conv) == 16                                    # 2 layers x 4 Conv1D
    assert all(why.paths[p] == "structured: TransposedLinearRule" for p in conv), why.paths
    assert why.paths["lm.transformer.wte.weight"].startswith("structured")
    J = R.jacobian_loop(ref_model, x)[0]
    assert R.rel_err(K, R.kernel_from_jacobian(J, J, "target", t)) <= TOL64
    assert T is not None
