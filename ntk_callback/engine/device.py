"""What the engine assumes about the device it runs on: :class:`DeviceProfile`.

Two things depend on the device:

1. **The default memory budget.** On the CPU it is 1 GiB (host memory is shared with
   everything else and the engine's chunking keeps the kernel's cost flop-bound at that
   size). On a CUDA device it is a fraction of the memory free when the call starts,
   ``min(CUDA_BUDGET_CAP, CUDA_BUDGET_FRACTION * free)`` (at least ``MIN_BUDGET``): a call
   peaks at up to 2x its budget plus the model's own activations, so a quarter of the free
   memory leaves room for both. Measured on an H200 (ResNet-18, CIFAR stem, 256 probes,
   target mode): 6.5 s at a 1 GiB budget, where the large convolutions took the Gram route
   on unfolded patches (75 % of device time in matrix products of im2col patches, ~25,000
   kernel launches), against 0.11 s at 16 GiB. An explicit ``memory_budget`` is always
   used as given.

2. **The cost model of the structured routes** (:func:`.structured.planner.choose`). On
   the CPU the routes are compared by flops, as before. On CUDA flops are cheap and the
   Gram route's traffic through memory (its (n S) x (n S) blocks) and its kernel
   launches are not: they are counted in flop-equivalents (``flops_per_byte``, the
   machine balance; ``flops_per_launch``, a launch's latency times the flop rate). The
   budget is kept for the layers that need it most: the backward offers the deep layers
   (few positions, many parameters: a cheap Gram route) first, the high-resolution
   convolutions (a Gram route of (n S)^2 entries, seconds) last, so rows that would take
   a large share of the budget left must save enough per byte. With these constants off
   (the CPU profile) the model is the flop count, so CPU choices are unchanged.

The CUDA constants are orders of magnitude for current data-centre GPUs in float32 with
TF32 off (the engine turns TF32 off): ~50 TFLOP/s, ~3 TB/s, ~5 us a launch; the choices
they drive are between routes that differ by 10-100x, not by the constants' error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1 << 30
CPU_BUDGET = GiB                 # the CPU default (and the default where no device is known)
CUDA_BUDGET_FRACTION = 0.25      # of the device's free memory
CUDA_BUDGET_CAP = 16 * GiB       # beyond this the kernel is no longer memory-bound
MIN_BUDGET = 256 << 20           # a nearly full device still gets a workable budget

# CUDA cost constants (float32, TF32 off): flop rate / memory bandwidth, launch latency.
CUDA_FLOPS_PER_S = 50e12
CUDA_BYTES_PER_S = 3e12
CUDA_LAUNCH_S = 5e-6
# Rows taking over 1/8 of the budget left must save 4 flop-equivalents a byte and a probe.
CUDA_RESERVE_SHARE = 0.125
CUDA_RESERVE_DENSITY = 4.0


@dataclass(frozen=True)
class DeviceProfile:
    """The device a kernel is computed on, as the planner sees it.

    ``kind``: ``"cpu"`` or ``"cuda"``; ``free_memory`` / ``total_memory``: bytes on a CUDA
    device (``torch.cuda.mem_get_info``), None on the CPU; ``flops_per_byte``: flops that
    cost as much time as moving one byte through memory (0 on the CPU: flops only);
    ``flops_per_launch``: flops that cost as much as one kernel launch (0 on the CPU);
    ``reserve_share`` / ``reserve_density``: rows that would take more than this share of
    the budget left take the rows route only when they save at least this many
    flop-equivalents a byte of rows and a probe (4: at 256 probes a GiB of rows must save
    ~20 ms at 50 TFLOP/s; per probe because the Gram route's cost grows as N^2 and the
    rows' size as N, so the same layer decides the same way at any N);
    the backward offers the deep layers first, and without a reserve their rows would
    use up the budget that the high-resolution convolutions met last need (off on the
    CPU: share 1, density 0).
    """

    kind: str = "cpu"
    free_memory: int | None = None
    total_memory: int | None = None
    flops_per_byte: float = 0.0
    flops_per_launch: float = 0.0
    reserve_share: float = 1.0
    reserve_density: float = 0.0
    name: str = "cpu"

    def default_budget(self) -> int:
        """The memory budget of a call that passes ``memory_budget=None`` (bytes)."""
        if self.kind != "cuda" or self.free_memory is None:
            return CPU_BUDGET
        return default_cuda_budget(self.free_memory)


CPU = DeviceProfile()


def default_cuda_budget(free_memory: int) -> int:
    """``min(CUDA_BUDGET_CAP, CUDA_BUDGET_FRACTION * free_memory)``, at least
    ``MIN_BUDGET`` (bytes)."""
    return max(MIN_BUDGET, min(CUDA_BUDGET_CAP, int(CUDA_BUDGET_FRACTION * free_memory)))


def cuda_profile(free_memory: int, total_memory: int | None = None,
                 name: str = "cuda") -> DeviceProfile:
    """The profile of a CUDA device with ``free_memory`` bytes free (constructible without
    a GPU, for tests and planning)."""
    return DeviceProfile(kind="cuda", free_memory=int(free_memory),
                         total_memory=None if total_memory is None else int(total_memory),
                         flops_per_byte=CUDA_FLOPS_PER_S / CUDA_BYTES_PER_S,
                         flops_per_launch=CUDA_FLOPS_PER_S * CUDA_LAUNCH_S,
                         reserve_share=CUDA_RESERVE_SHARE, reserve_density=CUDA_RESERVE_DENSITY,
                         name=name)


def profile_for(device: torch.device | str | None) -> DeviceProfile:
    """The profile of ``device`` now: on CUDA its free memory from
    ``torch.cuda.mem_get_info``; the CPU profile for any other device (MPS, XLA, ...:
    their costs are not modelled, and the CPU's flop model is the conservative one)."""
    if device is None:
        return CPU
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return cuda_profile(free, total, name=torch.cuda.get_device_name(index))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first trainable parameter (else its first parameter or
    buffer; the CPU for a model without tensors)."""
    tensors: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    tensors = tensors or [*model.parameters(), *model.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def default_budget(device: torch.device | str | None) -> int:
    """The default memory budget for a kernel computed on ``device`` (bytes)."""
    return profile_for(device).default_budget()


__all__ = ["CPU", "CPU_BUDGET", "CUDA_BUDGET_CAP", "CUDA_BUDGET_FRACTION", "DeviceProfile",
           "MIN_BUDGET", "cuda_profile", "default_budget", "default_cuda_budget",
           "model_device", "profile_for"]
