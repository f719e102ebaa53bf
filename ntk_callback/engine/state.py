"""Measuring a model without leaving a trace on it.

:func:`frozen_measurement` puts the model in eval mode (optionally), turns off TF32 on
CUDA (TF32 matmuls move kernels far past float32 tolerance), forks the global CPU and
CUDA RNG streams, enables autograd even under ``no_grad``/``inference_mode``, and on exit
restores every submodule's ``training`` flag, the RNG streams and the TF32 switches.
Parameters, buffers and ``.grad`` are never written by the engine: torch.func
differentiates copies of the parameter *values*, and BatchNorm in eval mode reads its
running statistics without updating them. What the model's own forward writes in place
(buffers such as counters or EMAs, embedding weights renormalised by ``max_norm``) is
put back on exit.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def cuda_devices(model: torch.nn.Module) -> list[int]:
    devs = {t.device.index for t in list(model.parameters()) + list(model.buffers())
            if t.device.type == "cuda"}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devs)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)


def _writes_weights(module: torch.nn.Module) -> bool:
    """Modules whose own forward writes their parameters (embedding renormalisation)."""
    return (isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and module.max_norm is not None)


@contextlib.contextmanager
def _restored_tensors(model: torch.nn.Module) -> Iterator[None]:
    """Put back every buffer, and the weights of modules that renormalise them in forward,
    that the measurement's forward passes wrote in place (a counter or an EMA updated in
    forward, ``nn.Embedding(max_norm=...)``), detected by autograd's version counter. Any
    other parameter written in place cannot be restored (the engine keeps no copy of the
    weights): a warning names it."""
    buffers = [(b, b.detach().clone(), b._version) for b in model.buffers()]
    kept: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if _writes_weights(m):
            weight = m.get_parameter("weight")
            kept[id(weight)] = weight.detach().clone()
    params = [(n, p, p._version) for n, p in model.named_parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value, version in buffers:
                if b._version != version:
                    b.copy_(value)
            for name, p, version in params:
                if p._version != version:
                    if id(p) in kept:
                        p.copy_(kept[id(p)])
                    else:
                        warnings.warn(
                            f"the model's forward wrote parameter {name!r} in place while the "
                            "NTK was measured; the change stays (the engine keeps no copy of "
                            "the weights). Move in-place weight updates out of forward.",
                            RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def frozen_measurement(model: torch.nn.Module, eval_mode: bool = True) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    devices = cuda_devices(model) if torch.cuda.is_available() else []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(_restored_tensors(model))
            stack.enter_context(_no_tf32())
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            if eval_mode:
                model.eval()
            yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[bool]:
    """Run the model in ``dtype`` for the duration: every floating parameter is replaced
    in its module by a new ``Parameter`` holding a cast copy (tied parameters by one
    shared copy), every floating buffer by a cast copy; on exit the original objects are
    put back, untouched. Yields whether anything had to be cast.

    The original parameters are never written, not even their ``.data``: assigning a
    tensor of another dtype to ``.data`` makes autograd drop the parameter's gradient
    accumulator, and with it every hook registered there -- DistributedDataParallel's
    gradient all-reduce among them, so ranks would silently train apart after one
    float64 measurement. Casting the model itself rather than calling it functionally
    with cast tensors keeps everything that reads parameters from the modules outside
    one forward call exact: activation checkpointing recomputes in the backward, RNNs
    hold flat weight lists (rebuilt here), hook-based reparametrisations recompute
    weights in pre-hooks.
    """
    swapped: dict[int, torch.nn.Parameter] = {}
    params: list[tuple[dict[str, torch.nn.Parameter | None], str, torch.nn.Parameter]] = []
    buffers: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                params.append((module._parameters, name, p))
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                buffers.append((module._buffers, name, b))
    try:
        for store, name, p in params:
            if id(p) not in swapped:
                swapped[id(p)] = torch.nn.Parameter(p.detach().to(dtype),
                                                    requires_grad=p.requires_grad)
            store[name] = swapped[id(p)]
        for bstore, name, b in buffers:
            bstore[name] = b.to(dtype)
        _refresh_rnns(model)
        yield bool(params or buffers)
    finally:
        for store, name, p in params:
            store[name] = p
        for bstore, name, b in buffers:
            bstore[name] = b
        if params or buffers:
            _refresh_rnns(model)


def _refresh_rnns(model: torch.nn.Module) -> None:
    """RNN modules keep a list of their weights for the fused kernels; rebuild it."""
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            module._init_flat_weights()
