"""Measuring a model without leaving a trace on it.

:func:`frozen_measurement` puts the model in eval mode (optionally), turns off TF32 on
CUDA (TF32 matmuls move kernels far past float32 tolerance), forks the global CPU and
CUDA RNG streams, enables autograd even under ``no_grad``/``inference_mode``, and on exit
restores every submodule's ``training`` flag, the RNG streams and the TF32 switches.
Parameters, buffers and ``.grad`` are never written by the engine: torch.func
differentiates copies of the parameter *values*, and BatchNorm in eval mode reads its
running statistics without updating them.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def frozen_measurement(model: torch.nn.Module, eval_mode: bool = True) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    devices = cuda_devices(model) if torch.cuda.is_available() else []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
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
    """Run the model in ``dtype`` for the duration: every floating parameter's ``.data``
    and every floating buffer is replaced by a cast copy, then the original tensors are
    put back (the same storage, so bit for bit what was there; ``.grad`` is not touched).
    Yields whether anything had to be cast.

    Casting the model itself rather than calling it functionally with cast tensors keeps
    everything that reads parameters outside one forward call exact: activation
    checkpointing recomputes in the backward, RNNs hold flat weight lists, hook-based
    reparametrisations recompute weights in pre-hooks.
    """
    params: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in seen and p.is_floating_point() and p.dtype != dtype:
                seen.add(id(p))
                params.append((p, p.data))
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                buffers.append((module._buffers, name, b))
    try:
        for p, data in params:
            p.data = data.to(dtype)
        for store, name, b in buffers:
            store[name] = b.to(dtype)
        _refresh_rnns(model)
        yield bool(params or buffers)
    finally:
        for p, data in params:
            p.data = data
        for store, name, b in buffers:
            store[name] = b
        if params or buffers:
            _refresh_rnns(model)


def _refresh_rnns(model: torch.nn.Module) -> None:
    """RNN modules keep a list of their weights for the fused kernels; rebuild it."""
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            module._init_flat_weights()
