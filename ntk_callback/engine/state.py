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
from typing import Iterator

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
