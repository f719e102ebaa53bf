"""MobileNetV3-small and EfficientNet-B0 as plain ``nn.Module``s with torchvision's layer
structure (``torchvision.models.mobilenet_v3_small`` / ``efficientnet_b0``: same layers,
order, kernel sizes, strides, paddings, groups, channel widths, BatchNorm eps,
activations and squeeze-excite widths), written out because torchvision's wheels do not
load beside the pinned CPU torch. Random weights (torchvision's initialisation scheme:
kaiming-normal fan-out convs, ones/zeros BatchNorm, normal / uniform Linear), stochastic
depth off and dropout inactive (the benchmark measures in eval mode). The inputs are
3x32x32 and the heads have 10 classes (torchvision's ImageNet heads have 1000).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round channels to a multiple of ``divisor``,
    never below 90 % of ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_norm_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                  norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                  act: Callable[[], nn.Module] | None = None) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: bias-free conv with 'same' padding
    ``(k - 1) // 2``, BatchNorm, optional activation."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2,
                                         groups=groups, bias=False), norm(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """``torchvision.ops.SqueezeExcitation``: adaptive average pool, 1x1 conv, activation,
    1x1 conv, scale activation, times the input."""

    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module],
                 scale: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(s) * x


# --------------------------------------------------------------------------- MobileNetV3

def _mnv3_norm(c: int) -> nn.Module:
    return nn.BatchNorm2d(c, eps=0.001, momentum=0.01)


class MobileNetV3Block(nn.Module):
    """torchvision's MobileNetV3 ``InvertedResidual``: 1x1 expand (when the width
    changes), depthwise kxk, squeeze-excite (hardsigmoid), 1x1 project, residual when
    stride 1 and equal widths."""

    def __init__(self, cin: int, kernel: int, cexp: int, cout: int, se: bool, hs: bool,
                 stride: int) -> None:
        super().__init__()
        act: Callable[[], nn.Module] = nn.Hardswish if hs else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if cexp != cin:
            layers.append(conv_norm_act(cin, cexp, 1, norm=_mnv3_norm, act=act))
        layers.append(conv_norm_act(cexp, cexp, kernel, stride, groups=cexp, norm=_mnv3_norm,
                                    act=act))
        if se:
            layers.append(SqueezeExcitation(cexp, make_divisible(cexp // 4, 8), nn.ReLU,
                                            nn.Hardsigmoid))
        layers.append(conv_norm_act(cexp, cout, 1, norm=_mnv3_norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# (input, kernel, expanded, output, SE, hardswish, stride): torchvision's
# ``_mobilenet_v3_conf("mobilenet_v3_small")`` at width 1.0
MNV3_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3Small(nn.Module):
    """``torchvision.models.mobilenet_v3_small(num_classes=...)``: 1.53M parameters with
    10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_norm_act(3, 16, 3, 2, norm=_mnv3_norm, act=nn.Hardswish)]
        layers += [MobileNetV3Block(*cfg) for cfg in MNV3_SMALL]
        layers.append(conv_norm_act(96, 576, 1, norm=_mnv3_norm, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- EfficientNet

class MBConv(nn.Module):
    """torchvision's EfficientNet ``MBConv``: 1x1 expand (expand ratio > 1), depthwise kxk,
    squeeze-excite (SiLU, sigmoid, squeeze width ``input // 4``), 1x1 project, residual
    when stride 1 and equal widths (stochastic depth: identity in eval mode, left out)."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        cexp = make_divisible(cin * expand, 8)
        layers: list[nn.Module] = []
        if cexp != cin:
            layers.append(conv_norm_act(cin, cexp, 1, act=nn.SiLU))
        layers.append(conv_norm_act(cexp, cexp, kernel, stride, groups=cexp, act=nn.SiLU))
        layers.append(SqueezeExcitation(cexp, max(1, cin // 4), nn.SiLU, nn.Sigmoid))
        layers.append(conv_norm_act(cexp, cout, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# (expand ratio, kernel, stride, input, output, layers): torchvision's B0 stages
EFFNET_B0 = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class EfficientNetB0(nn.Module):
    """``torchvision.models.efficientnet_b0(num_classes=...)`` with torchvision's
    ``width_mult`` (channels ``make_divisible(c * width_mult, 8)``; 1.0 is B0, 4.02M
    parameters with 10 classes; depth 1.0)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        layers: list[nn.Module] = [conv_norm_act(3, w(32), 3, 2, act=nn.SiLU)]
        for expand, kernel, stride, cin, cout, count in EFFNET_B0:
            for i in range(count):
                layers.append(MBConv(expand, kernel, stride if i == 0 else 1,
                                     w(cin) if i == 0 else w(cout), w(cout)))
        last = 4 * w(320)
        layers.append(conv_norm_act(w(320), last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _init(model: nn.Module) -> None:
    """torchvision's initialisation of both families."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if isinstance(model, EfficientNetB0):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
