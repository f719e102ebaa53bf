"""A zoo of small but *real* architectures for the NTK engine tests.

Where tests/models.py holds minimal layer-by-layer cases, this file holds miniature
versions of architectures people actually measure: a torchvision-style ResNet, a
MobileNetV3 block net, a ViT, a BERT-like encoder with a padding mask, raw
``nn.MultiheadAttention``, a GPT-2-like causal LM with tied embeddings, RNNs, weight
reparametrisations (legacy hook-based and ``torch.nn.utils.parametrizations``),
activation checkpointing, and the module tricks that break per-layer rules: weights used
functionally (``F.linear(x, self.fc.weight)``), a layer called twice, a module shared
under two names, ``nn.LayerNorm`` / ``nn.Linear`` subclasses with their own ``forward``,
and a layer called with a keyword argument.

Every builder takes a ``seed``, seeds everything it uses, and returns a fresh
:class:`models.Case` (float32 model, N = 4..6 probes, int64 labels). Models are a few
thousand parameters at most, so the float64 per-sample reference loop stays fast. Models
with BatchNorm get non-trivial running statistics from a few train-mode forwards under
``no_grad``; models with Dropout / BatchNorm are returned in *train* mode (the engine must
measure them in eval mode, as the reference does).

:data:`ZOO` maps a name to its builder.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models import Case


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    g = _gen(seed + 1000)
    t = torch.randint(0, num_classes, (n,), generator=g)
    t[0], t[1] = 0, num_classes - 1
    return t


def _warm_bn(model: nn.Module, make_batch: Callable[[], torch.Tensor], steps: int = 3) -> None:
    """Move BatchNorm running statistics away from (0, 1): train-mode forwards, no grad."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(make_batch())


def _perturb_affine(*mods: nn.Module, scale: float = 0.3) -> None:
    """Non-trivial affine parameters for norm layers (weight != 1, bias != 0)."""
    with torch.no_grad():
        for m in mods:
            if getattr(m, "weight", None) is not None:
                m.weight.add_(scale * torch.randn_like(m.weight))
            if getattr(m, "bias", None) is not None:
                m.bias.add_(scale * torch.randn_like(m.bias))


# ====================================================================== vision: ResNet
class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, verbatim in structure."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    """ResNet-18 layout (stem, layer1, layer2 with a 1x1 conv + BN downsample shortcut,
    adaptive average pool, fc), at widths 4 / 8."""

    def __init__(self, num_classes: int = 4, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        down = nn.Sequential(nn.Conv2d(width, 2 * width, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2, downsample=down))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_tiny(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _perturb_affine(m, scale=0.2)
    g = _gen(seed + 7)
    _warm_bn(model, lambda: 1.5 * torch.randn(8, 3, 6, 6, generator=g) + 0.3)
    x = torch.randn(5, 3, 6, 6, generator=_gen(seed))
    return Case("resnet_tiny", model, x, _labels(5, 4, seed), 4,
                tags={"conv", "batchnorm", "inplace", "residual", "train_mode_matters"})


# ================================================================= vision: MobileNetV3
class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's Hardsigmoid scale."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(s) * x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cexp: int, cout: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(cexp, cexp, 3, padding=1, groups=cexp, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish()
        )
        self.se = SqueezeExcitation(cexp, max(cexp // 4, 2))
        self.project = nn.Sequential(nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_res = cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.use_res else out


class TinyMobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(4, 8, 4), InvertedResidual(4, 8, 6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6, 8), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def mobilenetv3_tiny(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyMobileNetV3()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _perturb_affine(m, scale=0.2)
    g = _gen(seed + 7)
    _warm_bn(model, lambda: 2.0 * torch.randn(8, 3, 8, 8, generator=g) + 0.5)
    x = 2.0 * torch.randn(5, 3, 8, 8, generator=_gen(seed))
    return Case("mobilenetv3_tiny", model, x, _labels(5, 3, seed), 3,
                tags={"conv", "depthwise", "batchnorm", "squeeze_excite", "dropout", "train_mode_matters"})


# ========================================================================= vision: ViT
class TinyViT(nn.Module):
    def __init__(self, image: int = 8, patch: int = 4, d_model: int = 8, nhead: int = 2,
                 num_layers: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d_model, kernel_size=patch, stride=patch)
        n_patches = (image // patch) ** 2
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d_model))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=16, dropout=0.1,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, P, D)
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1) + self.pos_embed
        h = self.norm(self.encoder(h))
        return self.head(h[:, 0])


def vit_tiny(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyViT()
    model.train()  # dropout 0.1 live: the engine must measure in eval mode
    x = torch.randn(5, 3, 8, 8, generator=_gen(seed))
    return Case("vit_tiny", model, x, _labels(5, 3, seed), 3,
                tags={"attention", "transformer", "free_param", "dropout", "train_mode_matters"})


# ================================================================ text: BERT-like encoder
class TinyBert(nn.Module):
    """Token + learned position embeddings, post-LN nn.TransformerEncoderLayer with a
    key padding mask, masked mean pool, classifier. Batch: {"input_ids", "attention_mask"}
    (HF convention: attention_mask 1 = real token, 0 = padding)."""

    def __init__(self, vocab: int = 30, seq: int = 6, d_model: int = 8, nhead: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model, padding_idx=0)
        self.pos = nn.Embedding(seq, d_model)
        self.emb_norm = nn.LayerNorm(d_model)
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.emb_norm(self.tok(input_ids) + self.pos(positions))
        h = self.layer(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.classifier((h * m).sum(1) / m.sum(1))


def _token_batch(n: int, seq: int, vocab: int, seed: int) -> Dict[str, torch.Tensor]:
    g = _gen(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.tensor([seq, seq - 2, seq - 1, 3, seq, seq - 3][:n])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padded positions carry the pad id 0
    ids[0, 1] = ids[0, 3]  # a repeated token
    return {"input_ids": ids, "attention_mask": mask}


def bert_tiny(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyBert()
    _perturb_affine(model.emb_norm, model.layer.norm1, model.layer.norm2, scale=0.2)
    model.train()
    return Case("bert_tiny", model, _token_batch(6, 6, 30, seed), _labels(6, 3, seed), 3,
                tags={"attention", "transformer", "tokens", "dict", "padding_mask", "dropout", "train_mode_matters"})


# ====================================================================== raw attention
class MHASeqFirst(nn.Module):
    """nn.MultiheadAttention(batch_first=False): the module transposes (N, S, E) to (S, N, E)."""

    def __init__(self, d: int = 8, heads: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=False)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x)).transpose(0, 1)  # (S, N, E)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((a + h).mean(0))


class MHABatchFirst(nn.Module):
    """nn.MultiheadAttention(batch_first=True), need_weights left at its default (True),
    cross-attention from a learned query token, the attention weights used in the output."""

    def __init__(self, d: int = 8, heads: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.query = nn.Parameter(torch.randn(1, 1, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (N, S, E)
        q = self.query.expand(h.shape[0], -1, -1)
        a, w = self.attn(q, h, h)  # w: (N, 1, S), averaged over heads
        return self.head(a[:, 0]) + w[:, 0, :3]


def mha_seq_first(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 5, 4, generator=_gen(seed))
    return Case("mha_seq_first", MHASeqFirst(), x, _labels(5, 3, seed), 3, tags={"attention", "mha"})


def mha_batch_first(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 5, 4, generator=_gen(seed))
    return Case("mha_batch_first", MHABatchFirst(), x, _labels(5, 3, seed), 3, tags={"attention", "mha", "free_param"})


# ========================================================================== GPT-2-like
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("causal", torch.tril(torch.ones(seq, seq, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.reshape(n, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = att.masked_fill(~self.causal[:s, :s], float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(n, s, d)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, seq)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """GPT-2 layout: wte + wpe, pre-LN blocks, ln_f, logits of the last position through
    the *tied* token embedding, ``F.linear(h, self.wte.weight)``."""

    def __init__(self, vocab: int = 24, seq: int = 6, d: int = 8, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList([GPTBlock(d, heads, seq) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            h = block(h)
        h = self.ln_f(h)
        return F.linear(h[:, -1], self.wte.weight)  # (N, vocab), tied head


def gpt_tiny(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyGPT()
    with torch.no_grad():
        model.wte.weight.mul_(0.5)
    _perturb_affine(model.ln_f, *(b.ln_1 for b in model.h), scale=0.2)
    ids = torch.randint(0, 24, (4, 6), generator=_gen(seed))
    ids[0, 0] = ids[0, 5]  # the predicted position's input token also appears earlier
    return Case("gpt_tiny", model, ids, _labels(4, 24, seed), 24,
                tags={"attention", "causal", "tokens", "tied", "functional_weight"})


# ==================================================================== functional weights
class FunctionalOnly(nn.Module):
    """``self.fc`` is an nn.Linear that is never called: only its weight / bias are used,
    through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(F.linear(h, self.fc.weight, self.fc.bias))
        return self.head(h)


class CalledAndReused(nn.Module):
    """``self.proj`` is called as a module AND its weight is reused functionally
    (transposed, as a decoder) elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))  # (N, 6)
        h = torch.tanh(self.mid(h))
        back = F.linear(h, self.proj.weight.t())  # (N, 4), weight reused
        return self.head(torch.tanh(back) + x)


def functional_only(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("functional_only", FunctionalOnly(), x, _labels(5, 3, seed), 3, tags={"functional_weight"})


def called_and_reused(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("called_and_reused", CalledAndReused(), x, _labels(5, 3, seed), 3,
                tags={"functional_weight", "tied"})


# =========================================================================== RNNs
class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.rnn(x)  # (layers, N, H)
        return self.head(h_n[-1])


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.rnn(x)
        return self.head(h_n[-1])


def gru_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 6, 3, generator=_gen(seed))
    return Case("gru", GRUClassifier(), x, _labels(5, 3, seed), 3, tags={"rnn"})


def lstm_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 6, 3, generator=_gen(seed))
    return Case("lstm", LSTMClassifier(), x, _labels(5, 3, seed), 3, tags={"rnn"})


# ================================================================ reparametrisations
def weight_norm_legacy(seed: int = 0) -> Case:
    """torch.nn.utils.weight_norm (deprecated, forward-pre-hook based): parameters
    ``weight_g`` / ``weight_v``; ``weight`` is a plain attribute recomputed every call."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l1 = nn.utils.weight_norm(nn.Linear(4, 8))
        l2 = nn.utils.weight_norm(nn.Linear(8, 3), dim=None)
    model = nn.Sequential(l1, nn.Tanh(), l2)
    with torch.no_grad():
        l1.weight_g.mul_(1.0 + 0.5 * torch.rand_like(l1.weight_g))
        l2.weight_g.mul_(1.3)
        # Recompute ``weight`` under no_grad: the one computed at registration is a
        # non-leaf tensor, which copy.deepcopy (the reference) refuses.
        model(torch.zeros(1, 4))
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("weight_norm_legacy", model, x, _labels(5, 3, seed), 3, tags={"reparam", "hook"})


class _WNNet(nn.Module):
    def __init__(self, l1: nn.Module, conv: nn.Module, l2: nn.Module) -> None:
        super().__init__()
        self.l1, self.conv, self.l2 = l1, conv, l2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))  # (N, 8)
        h = torch.tanh(self.conv(h.unsqueeze(1))).mean(1)  # (N, 8)
        return self.l2(h)


def weight_norm_parametrized(seed: int = 0) -> Case:
    """torch.nn.utils.parametrizations.weight_norm: ``parametrizations.weight.original0/1``."""
    torch.manual_seed(seed)
    from torch.nn.utils.parametrizations import weight_norm

    l1 = weight_norm(nn.Linear(4, 8))
    conv = weight_norm(nn.Conv1d(1, 2, 3, padding=1))
    l2 = nn.Linear(8, 3)
    with torch.no_grad():
        g = l1.parametrizations.weight.original0
        g.mul_(1.0 + 0.5 * torch.rand_like(g))
        conv.parametrizations.weight.original0.mul_(0.7)

    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("weight_norm_parametrized", _WNNet(l1, conv, l2), x, _labels(5, 3, seed), 3, tags={"reparam", "parametrization"})


# ======================================================================= checkpointing
class CheckpointedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + checkpoint(self.block, h, use_reentrant=False)
        return self.head(torch.tanh(h))


def checkpoint_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = CheckpointedNet()
    _perturb_affine(model.block[2])
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("checkpoint", model, x, _labels(5, 3, seed), 3, tags={"checkpoint"})


# ============================================================ subclasses overriding forward
class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt / timm style channels-first LayerNorm: same parameters as nn.LayerNorm,
    its own forward (normalises over C of (N, C, H, W))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, kernel_size=2, stride=2)
        self.norm0 = LayerNorm2d(6)
        self.dwconv = nn.Conv2d(6, 6, kernel_size=3, padding=1, groups=6)
        self.norm1 = LayerNorm2d(6)
        self.pw = nn.Conv2d(6, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm0(self.stem(x))
        h = h + self.dwconv(h)
        h = F.gelu(self.pw(self.norm1(h)))
        return self.head(h.mean((2, 3)))


def convnext_ln(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyConvNeXt()
    _perturb_affine(model.norm0, model.norm1, scale=0.4)
    x = torch.randn(5, 2, 6, 6, generator=_gen(seed))
    return Case("convnext_ln", model, x, _labels(5, 3, seed), 3, tags={"subclass", "layernorm", "conv"})


class ResidualLinear(nn.Linear):
    """nn.Linear subclass whose forward adds a scaled copy of its input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + 0.5 * input


class GainLinear(nn.Linear):
    """nn.Linear subclass whose forward scales the weight (a rule that assumes the stock
    Linear forward gets the weight's gradient wrong by the factor)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, 1.7 * self.weight, self.bias - 0.3)


class SubclassKwargNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.res = ResidualLinear(6, 6)
        self.gain = GainLinear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(input=x))  # a layer called with a keyword argument
        h = torch.tanh(self.res(h))
        h = torch.tanh(self.gain(input=h))
        return self.head(h)


def linear_subclass_kwarg(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("linear_subclass_kwarg", SubclassKwargNet(), x, _labels(5, 3, seed), 3, tags={"subclass", "kwarg"})


# ======================================================================= reuse / sharing
class RepeatedCall(nn.Module):
    """The same nn.Linear applied twice in one forward (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.rec = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.rec(h))
        h = torch.tanh(self.rec(h))
        return self.head(h)


class SharedModule(nn.Module):
    """One nn.Linear registered under two names (``enc`` and ``dec``); named_modules()
    and named_parameters() list it once, as ``enc``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.enc = nn.Linear(6, 6)
        self.dec = self.enc
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(torch.tanh(self.inp(x))))
        h = torch.sin(self.dec(h))
        return self.head(h)


def repeated_call(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("repeated_call", RepeatedCall(), x, _labels(5, 3, seed), 3, tags={"reuse"})


def shared_module(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 4, generator=_gen(seed))
    return Case("shared_module", SharedModule(), x, _labels(5, 3, seed), 3, tags={"reuse", "tied"})


ZOO: Dict[str, Callable[..., Case]] = {
    "resnet_tiny": resnet_tiny,
    "mobilenetv3_tiny": mobilenetv3_tiny,
    "vit_tiny": vit_tiny,
    "bert_tiny": bert_tiny,
    "mha_seq_first": mha_seq_first,
    "mha_batch_first": mha_batch_first,
    "gpt_tiny": gpt_tiny,
    "functional_only": functional_only,
    "called_and_reused": called_and_reused,
    "gru": gru_net,
    "lstm": lstm_net,
    "weight_norm_legacy": weight_norm_legacy,
    "weight_norm_parametrized": weight_norm_parametrized,
    "checkpoint": checkpoint_net,
    "convnext_ln": convnext_ln,
    "linear_subclass_kwarg": linear_subclass_kwarg,
    "repeated_call": repeated_call,
    "shared_module": shared_module,
}


def build(name: str, seed: int = 0) -> Case:
    """Build the named zoo case (see :data:`ZOO`)."""
    return ZOO[name](seed)


# ============================================================ vision: EfficientNet MBConv
class MBConv(nn.Module):
    """torchvision's EfficientNet MBConv: 1x1 expand (ratio > 1) + BN + SiLU, depthwise
    kxk + BN + SiLU, squeeze-excite (SiLU, sigmoid scale, width input // 4), 1x1 project
    + BN, residual at stride 1 and equal widths."""

    def __init__(self, cin: int, expand: int, kernel: int, stride: int, cout: int) -> None:
        super().__init__()
        cexp = cin * expand
        layers: list = []
        if expand != 1:
            layers += [nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), nn.SiLU()]
        layers += [nn.Conv2d(cexp, cexp, kernel, stride, (kernel - 1) // 2, groups=cexp, bias=False),
                   nn.BatchNorm2d(cexp), nn.SiLU()]
        self.block = nn.Sequential(*layers)
        self.se_pool = nn.AdaptiveAvgPool2d(1)
        self.se_fc1 = nn.Conv2d(cexp, max(1, cin // 4), 1)
        self.se_fc2 = nn.Conv2d(max(1, cin // 4), cexp, 1)
        self.project = nn.Sequential(nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        h = torch.sigmoid(self.se_fc2(nn.functional.silu(self.se_fc1(self.se_pool(h))))) * h
        out = self.project(h)
        return out + x if self.use_res else out


class TinyEfficientNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(4, 1, 3, 1, 4), MBConv(4, 4, 5, 2, 6), MBConv(6, 2, 3, 1, 6))
        self.head = nn.Sequential(nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


def efficientnet_tiny(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = TinyEfficientNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _perturb_affine(m, scale=0.2)
    g = _gen(seed + 11)
    _warm_bn(model, lambda: 2.0 * torch.randn(8, 3, 8, 8, generator=g) + 0.5)
    x = 2.0 * torch.randn(5, 3, 8, 8, generator=_gen(seed))
    return Case("efficientnet_tiny", model, x, _labels(5, 3, seed), 3,
                tags={"conv", "depthwise", "batchnorm", "squeeze_excite", "dropout", "residual",
                      "train_mode_matters"})


ZOO["efficientnet_tiny"] = efficientnet_tiny
