"""The benchmark's models and probe batches (DESIGN.md section 5).

* ``mlp_small``: MLP 2-64-64-3 (ReLU), inputs (N, 2);
* ``mlp_wide``:  MLP 784-1024-1024-10 (ReLU), inputs (N, 784);
* ``cnn``:       the PyTorch NTK tutorial's CNN (conv 3->32, 32->32, 32->32, all 3x3
  without padding, ReLU between, flatten, Linear(32*26*26 = 21632, 10)), inputs
  (N, 3, 32, 32);
* ``resnet``:    a small ResNet with BatchNorm (3x3 conv stem 16 ch + BN + ReLU, a
  BasicBlock 16->16, a BasicBlock 16->32 with stride 2 and a 1x1 conv + BN shortcut,
  global average pooling, Linear(32, 10)), inputs (N, 3, 32, 32), measured in eval mode
  with non-trivial running statistics.

Every model and probe batch is a deterministic function of the config name and N, so
every worker process sees the same weights and probes (the driver also saves them to
one file that the workers load).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_outputs: int


CONFIGS: dict[str, Config] = {
    "mlp_small": Config("mlp_small", "MLP 2-64-64-3", lambda: _mlp(2, 64, 64, 3), (2,), 3),
    "mlp_wide": Config("mlp_wide", "MLP 784-1024-1024-10", lambda: _mlp(784, 1024, 1024, 10),
                       (784,), 10),
    "cnn": Config("cnn", "tutorial CNN (3x conv3x3 32ch + Linear)", TutorialCNN,
                  (3, 32, 32), 10),
    "resnet": Config("resnet", "small ResNet-BN (stem 16 + 2 BasicBlocks)", SmallResNet,
                     (3, 32, 32), 10),
}


def make_problem(name: str, n: int, seed: int = 0
                 ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in eval mode, probes (N, *input_shape), int64 targets (N,)) for a config."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    model = cfg.build()
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise_batchnorm(model, gen)
    model.eval()
    x = torch.randn((n,) + cfg.input_shape, generator=gen)
    t = torch.randint(0, cfg.num_outputs, (n,), generator=gen)
    return model, x, t


def build_model(name: str) -> nn.Module:
    """The architecture only (weights are loaded from the driver's file)."""
    return CONFIGS[name].build()


def describe(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Sizes the memory estimates need: P (trainable parameters), O (outputs), and the
    number of activation values one probe produces in a forward pass (all module
    outputs)."""
    acts = 0

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        nonlocal acts
        if isinstance(out, torch.Tensor):
            acts += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            o = model(x[:1]).shape[-1]
    finally:
        for h in handles:
            h.remove()
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    return {"P": int(p), "O": int(o), "acts": int(acts)}


__all__ = ["CONFIGS", "Config", "SmallResNet", "TutorialCNN", "build_model", "describe",
           "make_problem"]
