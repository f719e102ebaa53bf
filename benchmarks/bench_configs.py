"""The benchmark's models and probe batches (README "Speed and memory").

* ``mlp_small``: MLP 2-64-64-3 (ReLU), inputs (N, 2);
* ``mlp_wide``:  MLP 784-1024-1024-10 (ReLU), inputs (N, 784);
* ``cnn``:       the PyTorch NTK tutorial's CNN (conv 3->32, 32->32, 32->32, all 3x3
  without padding, ReLU between, flatten, Linear(32*26*26 = 21632, 10)), inputs
  (N, 3, 32, 32);
* ``resnet``:    a small ResNet with BatchNorm (3x3 conv stem 16 ch + BN + ReLU, a
  BasicBlock 16->16, a BasicBlock 16->32 with stride 2 and a 1x1 conv + BN shortcut,
  global average pooling, Linear(32, 10)), inputs (N, 3, 32, 32), measured in eval mode
  with non-trivial running statistics;
* ``resnet18``: ResNet-18 with the CIFAR stem (``resnet18.py``: torchvision's layers as
  plain modules, 11.2M parameters), inputs (N, 3, 32, 32), BatchNorm in eval mode with
  non-trivial statistics; in the GPU plan (``bench_device.py``), not the CPU one;
* ``mobilenet``: MobileNetV3-small and ``efficientnet``: EfficientNet-B0 at width 0.75
  (``mobile_models.py``: torchvision's layer structure written as plain modules --
  depthwise convs, Hardswish / SiLU, squeeze-excite, inverted residuals -- random
  weights, BatchNorm in eval mode with non-trivial statistics), inputs (N, 3, 32, 32),
  10 classes;
* ``bert``: a BERT-like encoder classifier (vocab 1024, 4 post-LN layers, d 128, 4 heads,
  FFN 512, tanh pooler, 10 classes; 0.95M parameters), probes a dict
  ``{"input_ids": (N, 32) int64, "attention_mask": (N, 32) int64}`` with padding (each
  probe keeps 16-32 tokens);
* ``vit``: a ViT classifier (3x32x64 images, 8x8 patches -> 32 patches + cls token,
  5 pre-LN layers, d 128, 4 heads, FFN 512, 10 classes; 1.02M parameters), probes
  (N, 3, 32, 64) float;
* ``gpt2``: a GPT-2-like causal LM (vocab 64, 32 positions, 5 pre-LN layers, d 128,
  4 heads, FFN 512, output head tied to the token embedding; 1.0M parameters) whose
  output is the last position's logits (O = vocab = 64), probes (N, 32) int64 token ids.

The three transformers are Hugging Face models built from tiny configs (no download;
``attn_implementation="eager"``, dropout 0) wrapped so that they return an (N, O) logits
tensor, when ``transformers`` is installed (and the environment variable
``NTK_BENCH_PLAIN_TRANSFORMERS`` is not set); otherwise equivalent plain ``nn.Module``
versions (same layers and parameter counts, hand-written attention; GPT-2's ``Conv1D``
becomes ``nn.Linear``). The titles say which. LayerNorm affines get trained-looking
random values (like BatchNorm's statistics), so a wrong LayerNorm rule cannot hide
behind weight 1 / bias 0.

Every model and probe batch is a deterministic function of the config name and N, so
every worker process sees the same weights and probes (the driver also saves them to
one file that the workers load).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import baselines as B
from resnet18 import ResNet18
from mobile_models import EfficientNetB0, MobileNetV3Small

#: EfficientNet-B0's width multiplier in the benchmark (torchvision's ``width_mult``):
#: at full width (4.02M parameters) vmap(jacrev)'s Jacobian alone, N = 32 x 10 outputs x
#: P float32, is 5.3 GiB, over the quick plan's 4 GiB cap
EFFNET_WIDTH = 0.75


class TutorialCNN(nn.Module):
    """The CNN of the PyTorch "Neural Tangent Kernels" tutorial (torch.func)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x)
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv-BN-ReLU-conv-BN plus shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------- transformers

SEQ = 32                       # tokens per probe (ViT: patches)
D, HEADS, FFN = 128, 4, 512
BERT_VOCAB, BERT_LAYERS, CLASSES = 1024, 4, 10
VIT_IMAGE, VIT_PATCH, VIT_LAYERS = (32, 64), 8, 5
GPT_VOCAB, GPT_LAYERS = 64, 5


def use_hf() -> bool:
    """Hugging Face models when ``transformers`` is installed, unless
    ``NTK_BENCH_PLAIN_TRANSFORMERS`` is set (non-empty)."""
    return (importlib.util.find_spec("transformers") is not None
            and not os.environ.get("NTK_BENCH_PLAIN_TRANSFORMERS"))


class HFBert(nn.Module):
    """``BertForSequenceClassification`` returning its (N, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(vocab_size=BERT_VOCAB, hidden_size=D, num_hidden_layers=BERT_LAYERS,
                         num_attention_heads=HEADS, intermediate_size=FFN,
                         max_position_embeddings=SEQ, type_vocab_size=1, num_labels=CLASSES,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         classifier_dropout=0.0, attn_implementation="eager")
        self.m = BertForSequenceClassification(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


class HFViT(nn.Module):
    """``ViTForImageClassification`` returning its (N, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification
        cfg = ViTConfig(image_size=VIT_IMAGE, patch_size=VIT_PATCH, num_channels=3,
                        hidden_size=D, num_hidden_layers=VIT_LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, num_labels=CLASSES, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
        self.m = ViTForImageClassification(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=pixel_values).logits


class HFGPT2(nn.Module):
    """``GPT2LMHeadModel`` (``lm_head`` tied to ``wte``) returning the last position's
    (N, vocab) logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=GPT_VOCAB, n_positions=SEQ, n_embd=D, n_layer=GPT_LAYERS,
                         n_head=HEADS, n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0,
                         tie_word_embeddings=True, attn_implementation="eager")
        self.m = GPT2LMHeadModel(cfg)
        assert self.m.lm_head.weight is self.m.transformer.wte.weight
        # Only the last position's logits (transformers >= 4.45); else slice all of them.
        self._keep = "logits_to_keep" in inspect.signature(self.m.forward).parameters

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._keep:
            return self.m(input_ids=input_ids, logits_to_keep=1).logits[:, -1]
        return self.m(input_ids=input_ids).logits[:, -1]


class Attention(nn.Module):
    """Multi-head self-attention, written out: q, k, v, softmax(q k^T / sqrt(d_h) + mask)
    v, output projection. ``fused`` uses one (d, 3d) projection (GPT-2's ``c_attn``)."""

    def __init__(self, d: int, heads: int, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).split(d, -1) if self.fused else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.reshape(n, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if bias is not None:
            scores = scores + bias
        ctx = scores.softmax(-1) @ v
        return self.out(ctx.transpose(1, 2).reshape(n, s, d))


class Block(nn.Module):
    """Transformer layer: post-LN (BERT) or pre-LN (ViT, GPT-2), GELU feed-forward."""

    def __init__(self, d: int, heads: int, ffn: int, pre_ln: bool, fused: bool = False,
                 tanh_gelu: bool = False) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = Attention(d, heads, fused)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.approx = "tanh" if tanh_gelu else "none"

    def ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approx))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x), bias)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, bias))
        return self.ln2(x + self.ff(x))


class PlainBert(nn.Module):
    """The BERT-like encoder without transformers: token + position + type embeddings,
    LayerNorm, post-LN layers with a key-padding mask, tanh pooler on position 0,
    classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(BERT_VOCAB, D), nn.Embedding(SEQ, D)
        self.typ = nn.Embedding(1, D)
        self.ln = nn.LayerNorm(D)
        self.layers = nn.ModuleList(Block(D, HEADS, FFN, pre_ln=False)
                                    for _ in range(BERT_LAYERS))
        self.pooler, self.classifier = nn.Linear(D, D), nn.Linear(D, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)
        x = self.ln(self.tok(input_ids) + self.pos(pos) + self.typ.weight[0])
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class PlainViT(nn.Module):
    """The ViT without transformers: 8x8 patch convolution, cls token, learned position
    embeddings, pre-LN layers, final LayerNorm, classifier on the cls token."""

    def __init__(self) -> None:
        super().__init__()
        patches = (VIT_IMAGE[0] // VIT_PATCH) * (VIT_IMAGE[1] // VIT_PATCH)
        self.patch = nn.Conv2d(3, D, VIT_PATCH, VIT_PATCH)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches + 1, D))
        self.layers = nn.ModuleList(Block(D, HEADS, FFN, pre_ln=True) for _ in range(VIT_LAYERS))
        self.ln = nn.LayerNorm(D)
        self.classifier = nn.Linear(D, CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)          # (N, 32, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.ln(x)[:, 0])


class PlainGPT2(nn.Module):
    """The GPT-2-like LM without transformers: token + position embeddings, pre-LN causal
    layers (fused qkv, tanh GELU), final LayerNorm, and a bias-free ``lm_head`` whose
    weight IS the token embedding's (tied); returns the last position's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(GPT_VOCAB, D), nn.Embedding(SEQ, D)
        self.layers = nn.ModuleList(Block(D, HEADS, FFN, pre_ln=True, fused=True,
                                          tanh_gelu=True) for _ in range(GPT_LAYERS))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, GPT_VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(s, device=input_ids.device))
        bias = self.causal[:s, :s].to(x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return self.lm_head(self.ln_f(x[:, -1]))


def build_bert(hf: bool | None = None) -> nn.Module:
    return HFBert() if (use_hf() if hf is None else hf) else PlainBert()


def build_vit(hf: bool | None = None) -> nn.Module:
    return HFViT() if (use_hf() if hf is None else hf) else PlainViT()


def build_gpt2(hf: bool | None = None) -> nn.Module:
    return HFGPT2() if (use_hf() if hf is None else hf) else PlainGPT2()


def bert_probes(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids 1..vocab-1 with trailing padding (id 0, mask 0): lengths 16..32, the
    first probe full length."""
    ids = torch.randint(1, BERT_VOCAB, (n, SEQ), generator=gen)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
    lengths[0] = SEQ
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def vit_probes(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn((n, 3) + VIT_IMAGE, generator=gen)


def gpt2_probes(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, GPT_VOCAB, (n, SEQ), generator=gen)


def _mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Eval-mode BatchNorm with default statistics (mean 0, var 1, weight 1, bias 0) is
    nearly the identity; give it the statistics and affine a trained network has."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=gen))


def _randomise_layernorm(model: nn.Module, gen: torch.Generator) -> None:
    """LayerNorm's default affine (weight 1, bias 0) is special; give it a trained-looking
    one."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            c = m.weight.numel()
            m.weight.data.copy_(0.5 + torch.rand(c, generator=gen).reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.data.copy_(0.2 * torch.randn(c, generator=gen).reshape(m.bias.shape))


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]          # of one probe (the token ids' for BERT)
    num_outputs: int
    probes: Callable[[int, torch.Generator], Any] | None = None   # default: randn
    transformer: bool = False


def _impl() -> str:
    return "HF" if use_hf() else "plain nn.Module"


CONFIGS: dict[str, Config] = {
    "mlp_small": Config("mlp_small", "MLP 2-64-64-3", lambda: _mlp(2, 64, 64, 3), (2,), 3),
    "mlp_wide": Config("mlp_wide", "MLP 784-1024-1024-10", lambda: _mlp(784, 1024, 1024, 10),
                       (784,), 10),
    "cnn": Config("cnn", "tutorial CNN (3x conv3x3 32ch + Linear)", TutorialCNN,
                  (3, 32, 32), 10),
    "resnet": Config("resnet", "small ResNet-BN (stem 16 + 2 BasicBlocks)", SmallResNet,
                     (3, 32, 32), 10),
    "resnet18": Config("resnet18", "ResNet-18 (CIFAR stem, torchvision layers, BN eval)",
                       ResNet18, (3, 32, 32), 10),
    "mobilenet": Config("mobilenet", "MobileNetV3-small (torchvision layers, 10 classes, BN eval)",
                        MobileNetV3Small, (3, 32, 32), 10),
    "efficientnet": Config("efficientnet", f"EfficientNet-B0 (torchvision layers, width "
                                           f"{EFFNET_WIDTH}, 10 classes, BN eval)",
                           lambda: EfficientNetB0(width_mult=EFFNET_WIDTH), (3, 32, 32), 10),
    "bert": Config("bert", f"BERT-like encoder ({_impl()}, 4x d128, 32 tokens, padded)",
                   build_bert, (SEQ,), CLASSES, bert_probes, True),
    "vit": Config("vit", f"ViT ({_impl()}, 5x d128, 32 patches + cls)",
                  build_vit, (3,) + VIT_IMAGE, CLASSES, vit_probes, True),
    "gpt2": Config("gpt2", f"GPT-2-like LM, tied head ({_impl()}, 5x d128, 32 tokens, "
                           f"O=vocab {GPT_VOCAB})",
                   build_gpt2, (SEQ,), GPT_VOCAB, gpt2_probes, True),
}
TRANSFORMERS = tuple(c for c, cfg in CONFIGS.items() if cfg.transformer)


def make_problem(name: str, n: int, seed: int = 0, hf: bool | None = None
                 ) -> tuple[nn.Module, Any, torch.Tensor]:
    """(model in eval mode, probes, int64 targets (N,)) for a config. The probes are an
    (N, *input_shape) tensor, or for ``bert`` a dict of (N, 32) tensors. ``hf`` picks the
    Hugging Face (True) or plain (False) transformer (default :func:`use_hf`)."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    model = cfg.build() if hf is None or not cfg.transformer else cfg.build(hf)
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise_batchnorm(model, gen)
    if cfg.transformer:
        _randomise_layernorm(model, gen)
    model.eval()
    x = cfg.probes(n, gen) if cfg.probes else torch.randn((n,) + cfg.input_shape, generator=gen)
    t = torch.randint(0, cfg.num_outputs, (n,), generator=gen)
    return model, x, t


def build_model(name: str) -> nn.Module:
    """The architecture only (weights are loaded from the driver's file)."""
    return CONFIGS[name].build()


def describe(model: nn.Module, x: Any) -> dict[str, int]:
    """Sizes the memory estimates need: P (trainable parameters), O (outputs), and the
    number of activation values one probe produces in a forward pass (all module
    outputs, tensors inside tuple / dict outputs included)."""
    acts = 0

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        nonlocal acts
        values = out.values() if isinstance(out, dict) else \
            out if isinstance(out, (tuple, list)) else (out,)
        acts += sum(v.numel() for v in values if isinstance(v, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            o = B.call(model, B.batch_slice(x, 0)).shape[-1]
    finally:
        for h in handles:
            h.remove()
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    return {"P": int(p), "O": int(o), "acts": int(acts)}


__all__ = ["CONFIGS", "Config", "PlainBert", "PlainGPT2", "PlainViT", "SmallResNet",
           "TRANSFORMERS", "TutorialCNN", "build_model", "describe", "make_problem", "use_hf"]
