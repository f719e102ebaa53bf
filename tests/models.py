"""A zoo of tiny, deterministic test models for the NTK engine tests.

Every builder takes a ``seed`` and returns a :class:`Case` holding a freshly built
float32 model, a probe batch of N = 5..8 samples (a tensor, a tuple or a dict) and
targets (int64 class labels, or float regression targets for single-output models).
Models are kept to a few hundred / a few thousand parameters so the reference tests,
which materialise the full (N, O, P) Jacobian in float64, stay fast.

Models with BatchNorm or Dropout are returned in *train* mode on purpose: the engine
measures in eval mode by default, so a kernel that accidentally used batch statistics
or live dropout masks would disagree with the eval-mode references.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class Case:
    """One test model with its probe batch.

    ``inputs`` is whatever the model's batch is (tensor / tuple / dict), ``targets`` has
    shape (N,) (int64 labels in [0, num_outputs) or float regression values), and
    ``num_outputs`` is O (the model returns (N, O), or (N,) when ``O == 1`` and
    ``flat_output``).
    """

    name: str
    model: nn.Module
    inputs: Any
    targets: torch.Tensor
    num_outputs: int
    flat_output: bool = False
    tags: set = field(default_factory=set)

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    # Deterministic labels that cover several classes (never all equal).
    g = _gen(seed + 1000)
    t = torch.randint(0, num_classes, (n,), generator=g)
    t[0], t[1] = 0, num_classes - 1
    return t


# ----------------------------------------------------------------------- MLPs
def _mlp(act: nn.Module, name: str, seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), act, nn.Linear(12, 10), type(act)(), nn.Linear(10, 3))
    x = torch.randn(6, 4, generator=_gen(seed))
    return Case(name, model, x, _labels(6, 3, seed), 3)


def mlp_relu(seed: int = 0) -> Case:
    return _mlp(nn.ReLU(), "mlp_relu", seed)


def mlp_tanh(seed: int = 0) -> Case:
    return _mlp(nn.Tanh(), "mlp_tanh", seed)


def mlp_gelu(seed: int = 0) -> Case:
    return _mlp(nn.GELU(), "mlp_gelu", seed)


# ----------------------------------------------------------------------- convs
def conv1d_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 4, kernel_size=3),
        nn.ReLU(),
        nn.Conv1d(4, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4, 4),
    )
    x = torch.randn(6, 2, 10, generator=_gen(seed))
    return Case("conv1d", model, x, _labels(6, 4, seed), 4)


def conv2d_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3),
        nn.Tanh(),
        nn.Conv2d(3, 4, kernel_size=3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    x = torch.randn(5, 2, 5, 5, generator=_gen(seed))
    return Case("conv2d", model, x, _labels(5, 3, seed), 3)


def conv2d_bn_net(seed: int = 0) -> Case:
    """Conv2d + BatchNorm2d with non-trivial running statistics, left in train mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, kernel_size=3, stride=2),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    g = _gen(seed + 7)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move running stats away from (0, 1)
            model(2.0 * torch.randn(8, 2, 6, 6, generator=g) + 0.5)
    x = torch.randn(6, 2, 6, 6, generator=_gen(seed))
    return Case("conv2d_bn", model, x, _labels(6, 3, seed), 3, tags={"train_mode_matters"})


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block1 = _ResBlock(8)
        self.block2 = _ResBlock(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.block2(self.block1(self.inp(x)))))


def residual_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(6, 4, generator=_gen(seed))
    return Case("residual", _ResNet(), x, _labels(6, 3, seed), 3)


def dropout_net(seed: int = 0) -> Case:
    """MLP with Dropout, left in train mode (the engine must measure it in eval)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3))
    x = torch.randn(6, 4, generator=_gen(seed))
    return Case("dropout", model, x, _labels(6, 3, seed), 3, tags={"train_mode_matters"})


class _EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens).mean(dim=1))


def embedding_net(seed: int = 0) -> Case:
    """nn.Embedding on int64 token ids (N, L) -> mean pool -> Linear; tokens repeat."""
    torch.manual_seed(seed)
    tokens = torch.randint(0, 12, (6, 5), generator=_gen(seed))
    tokens[0, :2] = 3  # a repeated token inside one sample
    tokens[1, 0] = 3  # and shared across samples
    return Case("embedding", _EmbedNet(), tokens, _labels(6, 3, seed), 3)


def layernorm_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.add_(0.3 * torch.randn(8))
        model[1].bias.add_(0.3 * torch.randn(8))
    x = torch.randn(6, 4, generator=_gen(seed))
    return Case("layernorm", model, x, _labels(6, 3, seed), 3)


def groupnorm_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(4))
        model[1].bias.add_(0.3 * torch.randn(4))
    x = torch.randn(5, 2, 4, 4, generator=_gen(seed))
    return Case("groupnorm", model, x, _labels(5, 3, seed), 3)


class _ScaledNet(nn.Module):
    """A free scalar nn.Parameter used directly in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(torch.tanh(self.lin(x)))


def free_param_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(6, 4, generator=_gen(seed))
    return Case("free_param", _ScaledNet(), x, _labels(6, 3, seed), 3)


def frozen_net(seed: int = 0) -> Case:
    """First layer fully frozen, and the last layer's bias frozen too."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    x = torch.randn(6, 4, generator=_gen(seed))
    return Case("frozen", model, x, _labels(6, 3, seed), 3)


class _Squeeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(-1)


def regression_flat(seed: int = 0) -> Case:
    """Single-output regression returning (N,) with float targets."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 1), _Squeeze())
    x = torch.randn(7, 3, generator=_gen(seed))
    y = torch.randn(7, generator=_gen(seed + 1))
    return Case("regression_flat", model, x, y, 1, flat_output=True, tags={"regression"})


def regression_col(seed: int = 0) -> Case:
    """Single-output regression returning (N, 1) with float targets."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 1))
    x = torch.randn(7, 3, generator=_gen(seed))
    y = torch.randn(7, generator=_gen(seed + 1))
    return Case("regression_col", model, x, y, 1, tags={"regression"})


class _TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Linear(3, 6)
        self.enc_b = nn.Linear(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.enc_a(xa)) * torch.sigmoid(self.enc_b(xb)))


def tuple_batch_net(seed: int = 0) -> Case:
    """forward(xa, xb); the batch is the tuple (xa, xb)."""
    torch.manual_seed(seed)
    g = _gen(seed)
    inputs = (torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g))
    return Case("tuple_batch", _TwoInputNet(), inputs, _labels(6, 3, seed), 3, tags={"tuple"})


class _DictBatchNet(nn.Module):
    """forward(batch) with batch = {"x": (N, L, D) float, "mask": (N, L) bool}."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(self.proj(batch["x"]))  # (N, L, 6)
        m = batch["mask"].to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def _dict_batch(seed: int) -> Dict[str, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(6, 4, 3, generator=g)
    mask = torch.rand(6, 4, generator=g) > 0.3
    mask[:, 0] = True
    return {"x": x, "mask": mask}


def dict_batch_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    return Case("dict_batch", _DictBatchNet(), _dict_batch(seed), _labels(6, 3, seed), 3, tags={"dict"})


class _KwargsNet(_DictBatchNet):
    """forward(x, mask): a dict batch whose keys are exactly forward's parameters."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward({"x": x, "mask": mask})


def dict_kwargs_net(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    return Case("dict_kwargs", _KwargsNet(), _dict_batch(seed), _labels(6, 3, seed), 3, tags={"dict"})


class _ConvTokenLinear(nn.Module):
    """Conv2d, then a Linear applied over the channel dim of (N, H, W, C): extra dims."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, kernel_size=2)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).permute(0, 2, 3, 1)  # (N, H, W, 4)
        h = F.gelu(self.mix(h))  # Linear on a 4-D tensor
        return self.head(h.mean(dim=(1, 2)))


def conv_linear_spatial(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.randn(5, 2, 4, 4, generator=_gen(seed))
    return Case("conv_linear_spatial", _ConvTokenLinear(), x, _labels(5, 3, seed), 3)


BUILDERS: Dict[str, Callable[..., Case]] = {
    "mlp_relu": mlp_relu,
    "mlp_tanh": mlp_tanh,
    "mlp_gelu": mlp_gelu,
    "conv1d": conv1d_net,
    "conv2d": conv2d_net,
    "conv2d_bn": conv2d_bn_net,
    "residual": residual_net,
    "dropout": dropout_net,
    "embedding": embedding_net,
    "layernorm": layernorm_net,
    "groupnorm": groupnorm_net,
    "free_param": free_param_net,
    "frozen": frozen_net,
    "regression_flat": regression_flat,
    "regression_col": regression_col,
    "tuple_batch": tuple_batch_net,
    "dict_batch": dict_batch_net,
    "dict_kwargs": dict_kwargs_net,
    "conv_linear_spatial": conv_linear_spatial,
}


def build(name: str, seed: int = 0) -> Case:
    """Build the named case (see :data:`BUILDERS`)."""
    return BUILDERS[name](seed)


def wide_mlp(seed: int = 0) -> nn.Module:
    """The 784-1024-1024-10 ReLU MLP of the memory test (1.86 M parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
