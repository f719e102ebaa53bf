"""Convolution weight rows (``ntk_callback.engine.structured.convmath``) and conv nets
with grouped / depthwise / strided / dilated / padded convs, 1d, 2d and 3d.

* The per-probe weight gradients of every cotangent row, by both routes (unfolded
  patches; one grouped ``convolution_backward`` with all rows in each group's output
  channels), against autograd one probe and one row at a time, in float64 and float32.
* Small nets (depthwise + squeeze-excite blocks, grouped 1d / 3d convs, every padding
  mode) through ``empirical_ntk`` against the float64 per-sample reference
  (tests/reference.py) in every mode, float64 and float32, with the conv weights on the
  structured path (``explain=True``), and with grouped convs forced onto the Gram route.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as R
from ntk_callback import empirical_ntk
from ntk_callback.engine.structured import convmath as CM
from ntk_callback.engine.structured import terms as T

# (dims, c_in, c_out, kernel, stride, padding, dilation, groups, padding_mode)
CONVS = [
    (1, 4, 6, 3, 2, 1, 1, 2, "zeros"),
    (1, 4, 4, 3, 1, "same", 2, 4, "reflect"),
    (1, 3, 4, 2, 1, 0, 1, 1, "circular"),
    (2, 6, 6, 3, 1, 1, 1, 6, "zeros"),                       # depthwise
    (2, 3, 6, 3, 2, 1, 1, 3, "replicate"),                   # depthwise, multiplier 2
    (2, 4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, "circular"),
    (2, 3, 5, 3, 1, 0, 1, 1, "zeros"),
    (2, 4, 6, 1, 2, 0, 1, 1, "zeros"),                       # pointwise, strided
    (2, 4, 6, 1, 1, 0, 1, 2, "zeros"),                       # pointwise, grouped
    (2, 4, 4, 5, 1, "same", 1, 4, "zeros"),
    (2, 4, 4, 3, 1, "valid", 2, 2, "reflect"),
    (3, 4, 4, 3, 1, 1, 1, 4, "zeros"),
    (3, 2, 4, (2, 3, 1), (1, 2, 1), (1, 1, 0), 1, 2, "reflect"),
    (3, 3, 4, 2, 2, 0, (1, 1, 2), 1, "replicate"),
]
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 6, 4)}
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _conv(spec: tuple, dtype: torch.dtype) -> nn.Module:
    dims, cin, cout, kernel, stride, padding, dil, groups, mode = spec
    torch.manual_seed(0)
    return CONV_TYPES[dims](cin, cout, kernel, stride, padding, dil, groups, bias=False,
                            padding_mode=mode).to(dtype)


def _inputs(spec: tuple, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn((n, spec[1]) + SPATIAL[spec[0]], generator=g, dtype=dtype)


def _autograd_rows(conv: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(n, k, P): one probe, one cotangent row at a time."""
    k, n = d.shape[:2]
    out = torch.empty((n, k, conv.weight.numel()), dtype=a.dtype)
    for i in range(n):
        for r in range(k):
            (g,) = torch.autograd.grad(conv(a[i:i + 1]), conv.weight, d[r, i:i + 1])
            out[i, r] = g.reshape(-1)
    return out


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(map(str, s)).replace(" ", ""))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("route", ["patches", "grouped", None])
def test_weight_rows_match_autograd(spec: tuple, k: int, route: str | None) -> None:
    n = 3
    conv = _conv(spec, torch.float64)
    a = _inputs(spec, n, torch.float64)
    z = conv(a)
    g = torch.Generator().manual_seed(2)
    d = torch.randn((k,) + tuple(z.shape), generator=g, dtype=torch.float64)
    want = _autograd_rows(conv, a, d)
    got = CM.weight_rows(conv, a, d, {}, shared_rows=k > 1, route=route)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the same rows one cotangent row at a time (the per-row loop), memo shared
    memo: dict[str, object] = {}
    loop = torch.cat([CM.weight_rows(conv, a, d[r:r + 1], memo, route=route)
                      for r in range(k)], dim=1)
    torch.testing.assert_close(loop, want, rtol=1e-12, atol=1e-12)
    # float32 (oneDNN's grouped kernel where available) against the float64 rows
    conv32 = _conv(spec, torch.float32)
    got32 = CM.weight_rows(conv32, a.float(), d.float(), {}, route=route)
    assert float((got32.double() - want).norm() / want.norm()) < 1e-5


def test_weight_rows_channels_last_and_views() -> None:
    """Non-contiguous inputs and cotangents (channels-last maps, a sliced row stack)."""
    spec = (2, 6, 6, 3, 2, 1, 1, 6, "zeros")
    conv = _conv(spec, torch.float64)
    a = _inputs(spec, 4, torch.float64).contiguous(memory_format=torch.channels_last)
    z = conv(a)
    d = torch.randn((5,) + tuple(z.shape), dtype=torch.float64)[::2]
    want = _autograd_rows(conv, a, d)
    for route in ("patches", "grouped"):
        torch.testing.assert_close(CM.weight_rows(conv, a, d, {}, route=route), want,
                                   rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- nets

class SE(nn.Module):
    def __init__(self, c: int, s: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x))))) * x


class DepthwiseNet(nn.Module):
    """Stem, depthwise (reflect padding, stride 2) + SE, grouped pointwise, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, 2, 1, groups=6, padding_mode="reflect")
        self.se = SE(6, 2)
        self.pw = nn.Conv2d(6, 4, 1, groups=2)
        self.dw2 = nn.Conv2d(4, 8, 3, 1, "same", dilation=2, groups=4, bias=False,
                             padding_mode="circular")
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.hardswish(self.bn(self.stem(x)))
        h = self.pw(self.se(nn.functional.silu(self.dw(h))))
        return self.head(self.dw2(h).mean((2, 3)))


class Grouped1d3d(nn.Module):
    """Grouped Conv1d (replicate) and depthwise Conv3d (zeros) branches, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, 2, 1, groups=2, padding_mode="replicate")
        self.c3 = nn.Conv3d(2, 4, (2, 3, 3), 1, (0, 1, 1), groups=2)
        self.c3b = nn.Conv3d(4, 4, 1, groups=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        a = torch.tanh(self.c1(x.reshape(n, 2, -1))).mean(-1)           # (n, 4)
        b = self.c3b(torch.tanh(self.c3(x))).mean((2, 3, 4))            # (n, 4)
        return self.head(torch.cat([a, b], 1))


def _net(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    if name == "depthwise":
        model: nn.Module = DepthwiseNet()
        bn = model.bn
        bn.running_mean.copy_(0.3 * torch.randn(6, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(6, generator=g))
        x = torch.randn(5, 3, 8, 8, generator=g)
    else:
        model = Grouped1d3d()
        x = torch.randn(5, 2, 3, 4, 4, generator=g)
    return model.eval(), x, torch.randint(0, 3, (5,), generator=g)


def _conv_weights(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize("name", ["depthwise", "grouped_1d_3d"])
@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_conv_nets_match_reference(name: str, mode: str) -> None:
    model, x, y = _net(name)
    want = R.ntk_loop(model, x, y, mode)
    got, how = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, explain=True)
    for p in _conv_weights(model):
        assert how.paths[p].startswith("structured"), (p, how.paths[p], how.reasons)
    assert float((got - want).norm() / want.norm()) < 1e-10
    got32 = empirical_ntk(model, x, y, mode=mode)
    assert got32.dtype == torch.float32
    assert float((got32.double() - want).norm() / want.norm()) < 2e-5


@pytest.mark.parametrize("mode", ["target", "full"])
def test_grouped_convs_on_the_gram_route(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the grouped rows deemed too large, grouped convs are plain conv terms whose
    routes the cost model (here: layer_paths) picks; both routes match the reference."""
    monkeypatch.setattr(T, "GROUPED_ROWS_MAX_BYTES", 0)
    model, x, y = _net("depthwise")
    want = R.ntk_loop(model, x, y, mode)
    for route in ("gram", "rows"):
        paths = {"dw": route, "pw": route, "dw2": route}
        got = empirical_ntk(model, x, y, mode=mode, dtype=torch.float64, layer_paths=paths)
        assert float((got - want).norm() / want.norm()) < 1e-10, route


def test_grouped_terms_chosen_only_while_small() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=8)
    assert T.grouped_rows_fit(conv, 10, 4)
    assert not T.grouped_rows_fit(nn.Conv2d(8, 8, 3), 1, 4)
    big = nn.Conv2d(2048, 2048, 3, groups=2)   # 2048 * 1024 * 9 entries a row
    assert not T.grouped_rows_fit(big, 1, 4)
