r"""Per-probe convolution weight gradients for all cotangent rows at once.

For a convolution ``z = conv(a; W)`` with ``g`` groups, input ``a_i`` (C_in, *sp) and the
cotangents ``D_ir`` (C_out, *sp') of probe i and cotangent row r, the weight gradient is

    ``dW_ir[(gi, o), c, kappa] = sum_l D_ir[(gi, o), l] * patch_i[l, (gi, c), kappa]``

(``o < C_out / g``, ``c < C_in / g``, ``kappa`` a kernel offset, ``l`` an output
position, ``patch_i[l]`` the padded input window that output position l reads). Three
ways to compute the (n, k, P) rows, ``P = C_out * C_in / g * prod(kernel)``, in weight
layout order:

* **patches** (:func:`patch_rows`): unfold the input once into (n, L, C_in * kk) and
  contract the positions in one batched matmul a probe (and group): cheap when the
  patch is small -- pointwise convs (no unfold at all: the patches are the strided
  input), a 3-channel stem, depthwise convs (``C_in / g = 1``: the unfolded input is
  ``kk`` times the input, contracted over L in a batch of ``n g`` small products).
* **grouped backward** (:func:`grouped_backward_rows`): one ``convolution_backward``
  whose groups are (probe, conv group) pairs: input (1, n C_in, *sp) with ``n g``
  groups, and all k rows stacked into the output channels of each group, so the
  cotangent has channels in (probe, group, row, o) order and the weight gradient comes
  out as (n g k C_out/g, C_in/g, *kernel), one call for every row.
* :func:`weight_rows` picks one: patches for pointwise and small-patch convs, the
  grouped backward otherwise (and for depthwise convs in float32 / bfloat16, where
  oneDNN's grouped kernel beats the batched matmul: measured on CPU for MobileNet-sized
  depthwise layers, 0.5 ms against 7 ms; in float64, where torch's grouped kernel loops
  over groups, the patches are 3-12x faster).

Padding modes other than zeros are applied to the input first (:func:`pad_like`), as the
module's own forward does; zero padding (explicit) goes to the backward as its padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

Memo = dict[str, object]

#: the padding modes of torch's convolutions, as ``F.pad`` names them
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}

# Up to this many entries per patch of a group (C_in/groups * kernel volume, e.g. a
# 3-channel stem 3x3 conv), per-probe conv weight gradients of several cotangent rows
# come from unfolded patches (unfolded once) and one batched matmul; beyond it the
# unfolded input gets too large and a grouped convolution backward is faster (measured
# on CPU, per row: 3.5x faster for a 3->16 3x3 stem, 2x slower for 16->16 3x3; with one
# row the unfold itself costs as much as the grouped backward). Pointwise convs need no
# unfold at all.
UNFOLD_MAX_PATCH = 64


def kernel_volume(module: _ConvNd) -> int:
    v = 1
    for extent in module.kernel_size:
        v *= extent
    return v


def pointwise(module: _ConvNd) -> bool:
    return (all(s == 1 for s in module.kernel_size) and not isinstance(module.padding, str)
            and not any(module.padding))


def pad_like(module: _ConvNd, a: torch.Tensor) -> torch.Tensor:
    """A conv input padded the way the module's own forward pads it (all modes)."""
    pad = module._reversed_padding_repeated_twice
    return F.pad(a, pad, mode=PAD_MODES[module.padding_mode]) if any(pad) else a


def conv_patches(module: _ConvNd, a: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches (n, L, C_in * prod(kernel)), padding as the module does,
    for any number of spatial dims; the last axis in the weight's (C_in, *kernel) order."""
    a = pad_like(module, a)
    n, c = a.shape[:2]
    dims = a.dim() - 2
    for i in range(dims):
        k, dil, st = module.kernel_size[i], module.dilation[i], module.stride[i]
        # windows of the dilated extent, then every dil-th entry of each window
        a = a.unfold(2 + i, (k - 1) * dil + 1, st)
        if dil > 1:
            a = a[..., ::dil]
    # (n, C, *L, *kernel) -> (n, *L, C, *kernel)
    order = [0] + list(range(2, 2 + dims)) + [1] + list(range(2 + dims, 2 + 2 * dims))
    return a.permute(order).reshape(n, -1, c * kernel_volume(module))


def strided_input(module: _ConvNd, a: torch.Tensor) -> torch.Tensor:
    """The patches of a pointwise conv: the strided input as (n, L, C_in)."""
    sub = a[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in module.stride)]
    return sub.reshape(a.shape[0], a.shape[1], -1).transpose(1, 2)


def patch_rows(module: _ConvNd, d: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Rows (n, k, P) from patches (n, L, C_in/g-major per group: (n, L, g * c_g * kk)) and
    cotangents d (k, n, C_out, *sp'): one batched matmul over (probe, group)."""
    k, n, c_out = d.shape[:3]
    g = module.groups
    length = patches.shape[1]
    o_g = c_out // g
    if g == 1:
        dd = d.reshape(k, n, c_out, length).transpose(0, 1).reshape(n, k * c_out, length)
        return torch.bmm(dd, patches).reshape(n, k, -1)
    # (k, n, g, o_g, L) -> (n, g, k o_g, L); patches (n, L, g, q) -> (n, g, L, q)
    dd = d.reshape(k, n, g, o_g, length).permute(1, 2, 0, 3, 4).reshape(n * g, k * o_g, length)
    pg = patches.reshape(n, length, g, -1).permute(0, 2, 1, 3).reshape(n * g, length, -1)
    out = torch.bmm(dd, pg).reshape(n, g, k, o_g, -1)   # (n, g, k, o_g, q)
    return out.transpose(1, 2).reshape(n, k, -1)


def grouped_backward_rows(module: _ConvNd, x: torch.Tensor, d: torch.Tensor,
                          zero_padding: list[int]) -> torch.Tensor:
    """Rows (n, k, P) by one grouped ``convolution_backward``: ``x`` is the (padded when
    not zero-padded) input as (1, n C_in, *sp), contiguous; d (k, n, C_out, *sp')."""
    k, n, c_out = d.shape[:3]
    g = module.groups
    o_g = c_out // g
    c_in = x.shape[1] // n
    sp = tuple(d.shape[3:])
    dims = len(sp)
    if k == 1:
        go = d.reshape((1, n * c_out) + sp)
    else:  # channels (probe, group, row, o): each (probe, group) group owns its k rows
        go = d.reshape((k, n, g, o_g) + sp).permute((1, 2, 0, 3) + tuple(range(4, 4 + dims)))
        go = go.reshape((1, n * g * k * o_g) + sp)
    # (a copy for channels-last / permuted maps: the grouped kernel is 3x slower on them)
    go = go.contiguous()
    # only the shape of the weight matters for the weight gradient
    w = x.new_empty((n * k * c_out, c_in // g) + tuple(module.kernel_size))
    gw = torch.ops.aten.convolution_backward(
        go, x, w, None, list(module.stride), zero_padding, list(module.dilation), False,
        [0] * dims, n * g, [False, True, False])[1]
    rows: torch.Tensor = gw.reshape(n, 1, -1) if k == 1 else \
        gw.reshape(n, g, k, -1).transpose(1, 2).reshape(n, k, -1)
    return rows


def _cached(memo: Memo, name: str, make: object) -> torch.Tensor:
    value = memo.get(name)
    if value is None:
        value = memo[name] = make()  # type: ignore[operator]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"memo[{name!r}] holds a {type(value).__name__}, not a tensor")
    return value


def use_patches(module: _ConvNd, dtype: torch.dtype, shared_rows: bool) -> bool:
    """Whether :func:`weight_rows` takes the patches route (see the module docstring)."""
    if module.groups == 1:
        q = module.in_channels * kernel_volume(module)
        return pointwise(module) or (shared_rows and q <= UNFOLD_MAX_PATCH)
    q = module.in_channels // module.groups * kernel_volume(module)
    if dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    return q <= 4 * UNFOLD_MAX_PATCH


def weight_rows(module: _ConvNd, a: torch.Tensor, d: torch.Tensor, memo: Memo,
                shared_rows: bool = False, route: str | None = None) -> torch.Tensor:
    """Per-probe weight gradients (n, k, P) of a conv with input ``a`` (n, C_in, *sp) and
    cotangents ``d`` (k, n, C_out, *sp'), in the weight's memory order. ``memo`` keeps the
    unfolded or regrouped input for the other cotangent rows of the call;
    ``shared_rows``: more rows will reuse it (an unfold pays off). ``route``
    (``"patches"`` / ``"grouped"``) overrides :func:`use_patches` (tests)."""
    patches_route = use_patches(module, a.dtype, shared_rows) if route is None \
        else route == "patches"
    if patches_route:
        if pointwise(module):
            patches = _cached(memo, "patches", lambda: strided_input(module, a))
        else:
            patches = _cached(memo, "patches", lambda: conv_patches(module, a))
        return patch_rows(module, d, patches)
    n = a.shape[0]
    dims = a.dim() - 2
    own = module.padding
    zero_padded = PAD_MODES[module.padding_mode] == "constant" and not isinstance(own, str)
    padding = list(own) if zero_padded and not isinstance(own, str) else [0] * dims

    def grouped_input() -> torch.Tensor:
        p = a if zero_padded else pad_like(module, a)
        return p.reshape((1, n * p.shape[1]) + tuple(p.shape[2:])).contiguous()

    x = _cached(memo, "x", grouped_input)
    return grouped_backward_rows(module, x, d, padding)
