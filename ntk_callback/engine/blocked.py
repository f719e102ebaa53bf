"""Kernels of any number of probes: data loaders, blocks, memory-mapped output, ranks.

:func:`empirical_ntk` / :func:`layerwise_ntk` hand their work here when the probes come
from a ``DataLoader`` (or any other iterable of batches), when ``out=`` asks for a file,
when ``block_size=`` is given, or when a communicator splits the work across ranks.

How: the probes are cut into blocks of ``block_size`` probes (:class:`ProbeSource`). A
re-readable loader (a ``DataLoader``, a list of batches) is read once for its size and
a fingerprint of each batch, then again for each block that is needed, so that only the
blocks in use are in memory (inputs and targets, never activations); a one-shot iterator
is collected once. Block ``(i, j)`` of the kernel is one call of the
ordinary engine: the self-kernel of block i on the diagonal (exactly symmetric, as every
self-kernel of the engine), the cross kernel ``inputs=block_i, inputs2=block_j`` above
it, mirrored below (full mode: ``K[j, i, b, a] = K[i, j, a, b]``). Each call keeps the
engine's own memory budget; the result lives in memory or, with ``out="k.npy"``, in a
memory-mapped ``.npy`` file written block by block, so only one block of the kernel is in
memory at a time. Each call gets half the memory budget (:func:`call_budget`): the other
half is left for its transient buffers, so that the peak stays near the budget plus the
kernel itself.

Cost: with B blocks of b probes, the B(B+1)/2 calls run the model's forward and backward
passes over about ``B * N`` probes in all (a block's layer inputs and cotangents are
recomputed for every pair it is part of: the structured path keeps them only inside one
call), plus the N^2 kernel entries' products, which any method pays. Larger blocks mean
fewer passes; the default takes the largest block whose kernel block is a small part of
the budget (at most 1024 probes).

Self-check: the first diagonal block runs with the self-check (when asked); the other
blocks run without it and must take exactly the same path for every parameter (their
``explain`` record is compared with the first block's); a block that does not is
recomputed with the self-check on.

Ranks (``comm=``): every rank passes the same probes (checked), and every block pair is
one collective engine call (:class:`.distributed.ProbeSplit`): each rank runs the model
forward and backward over its share of the pair's probes only, capturing their per-probe
factors (the structured rules' layer inputs and cotangents, or gradient rows), the ranks
all-gather them, each rank contracts its share of the kernel's rows, and an all-reduce
(a sum with zeros elsewhere) puts the block on every rank. Splitting the calls instead
(pairs dealt to ranks) would leave some rank a pass over every probe: two proper subsets
of the blocks cannot hold every pair. The blocks are therefore as large as for one
process. Parameters on the exact path (no structured rule) are computed whole on every
rank. With ``out=`` rank 0 writes the file, the others map it after it is written (the
ranks must share its file system, e.g. one machine). Any error on a rank stops every rank
(:mod:`.distributed`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import batch as B
from .device import default_budget
from .distributed import Communicator, ProbeSplit, check_same_data, guarded, resolve
from .errors import NTKError
from .modes import KernelMode, ModeLike
from .problem import blocks

# A call keeps per-probe factors (gradient rows, Gram-route layer inputs) for both of its
# blocks, outside the engine's budget: at 2048 probes a block the tutorial CNN's peak at
# N = 10,000 was 94 MiB over budget + kernel, at 1024 401 MiB under (1.8x the CPU time).
DEFAULT_BLOCK_MAX = 1024

# kernel(x, t, x2, t2, self_check, layer_paths, split) -> ({key: block}, explanation);
# split: a ProbeSplit (the call is collective) or None
BlockFn = Callable[[Any, Any, Any, Any, bool, Any, Any], tuple[dict[str, torch.Tensor], Any]]


def is_data_stream(obj: Any) -> bool:
    """A ``DataLoader`` or another iterable of batches (generator, iterator, custom
    iterable), as opposed to one batch (tensor, tuple/list or dict of tensors, array)."""
    if isinstance(obj, torch.utils.data.DataLoader):
        return True
    if obj is None or isinstance(obj, (torch.Tensor, tuple, list, Mapping, str, bytes,
                                       np.ndarray)):
        return False
    return isinstance(obj, Iterable)


def call_budget(memory_budget: int | None, device: torch.device | None = None,
                held: int = 0) -> int | None:
    """The memory budget of each block's engine call: half of what the caller's budget
    (default: the default budget of ``device``, :mod:`.device`) leaves after ``held``
    bytes (the block's probes, :func:`held_bytes`), so that the call's transient buffers
    (autograd's, outside the engine's accounting) fit in the other half; bad values pass
    through to the engine's own error."""
    if memory_budget is None:
        return max(1, (default_budget(device) - held) // 2)
    if isinstance(memory_budget, int) and not isinstance(memory_budget, bool) \
            and memory_budget > 1:
        return max(1, (memory_budget - held) // 2)
    return memory_budget


def held_bytes(*batches: Any) -> int:
    """Bytes of the tensors of ``batches`` (None for none)."""
    return sum(leaf.numel() * leaf.element_size() for batch in batches if batch is not None
               for leaf in B.leaves(batch) if isinstance(leaf, torch.Tensor))


def wanted(inputs: Any, inputs2: Any, block_size: int | None, out: Any, comm: Any) -> bool:
    """Whether a kernel call goes through this module rather than one engine call."""
    return (is_data_stream(inputs) or is_data_stream(inputs2) or block_size is not None
            or out is not None or comm is not None)


def default_batch_to_probe(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a tensor is inputs without targets, a pair is
    ``(inputs, targets)``; anything else needs ``batch_to_probe=``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise NTKError(f"a batch from the data loader is a {type(batch).__name__}"
                   + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                   + "; batches must be tensors or (inputs, targets) pairs, or pass "
                   "`batch_to_probe=` mapping a batch to (inputs, targets), e.g. "
                   "`batch_to_probe=lambda b: (b['image'], b['label'])`.")


def _cat(parts: list[Any], name: str) -> Any:
    flat0, spec = tree_flatten(parts[0])
    columns: list[list[torch.Tensor]] = [[] for _ in flat0]
    for part in parts:
        flat, s = tree_flatten(part)
        if s != spec:
            raise NTKError(f"the batches of `{name}` do not all have the same structure "
                           "(keys / tuple layout); every batch must look alike.")
        for col, leaf in zip(columns, flat):
            col.append(leaf)
    return tree_unflatten([torch.cat(c) if len(c) > 1 else c[0] for c in columns], spec)


def collect(data: Any, targets: Any, batch_to_probe: Callable[[Any], Any] | None,
            name: str) -> tuple[Any, torch.Tensor | None, int]:
    """The probes of ``data`` as one batch: ``(inputs, targets or None, N)``.

    A stream is iterated once, each batch mapped by ``batch_to_probe`` (default:
    :func:`default_batch_to_probe`); a single batch is taken as it is, with ``targets``."""
    if not is_data_stream(data):
        if batch_to_probe is not None:
            data, targets = batch_to_probe(data)
        n = B.batch_size(data, name)
        return data, B.as_tensor_targets(targets, torch.device("cpu")), n
    if targets is not None:
        raise NTKError(f"`{name}` is a data loader, so its batches carry the targets; do not "
                       "also pass targets separately (map batches with `batch_to_probe=`).")
    xs, ts = [], []
    for x, t in _probe_pairs(data, batch_to_probe, name):
        xs.append(x)
        ts.append(t)
    if not xs:
        raise NTKError(f"the data loader `{name}` gave no batch; it must yield at least one.")
    if any(t is None for t in ts) and not all(t is None for t in ts):
        raise NTKError(f"some batches of `{name}` have targets and some do not; give every "
                       "batch targets (or none).")
    inputs = _cat(xs, name)
    present = [t for t in ts if t is not None]  # all or none (checked above)
    tgt = torch.cat([t.reshape(t.shape[0], *t.shape[1:]) for t in present]) if present else None
    return inputs, tgt, B.batch_size(inputs, name)


def _probe_pairs(data: Any, batch_to_probe: Callable[[Any], Any] | None, name: str
                 ) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """``(inputs, targets or None)`` of every batch of a stream, checked."""
    to_probe = batch_to_probe or default_batch_to_probe
    for batch in data:
        probe = to_probe(batch)
        if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
            raise NTKError(f"batch_to_probe returned a {type(probe).__name__}; it must return "
                           "a pair (inputs, targets), with targets None when there are none.")
        x, t = probe
        B.batch_size(x, name)
        yield x, (None if t is None else B.as_tensor_targets(t, "cpu"))


def _weighted_sums(inputs: Any, targets: torch.Tensor | None, start: int) -> float:
    """``sum_i (start + i + 1) (s_i + |s|_i / 2)`` over the probes i of a batch, per leaf
    (s_i the probe's sum, |s|_i its absolute sum): :func:`checksum` times N, by parts."""
    total = 0.0
    for leaf in B.leaves(inputs) + ([targets] if targets is not None else []):
        values = leaf.detach().double().reshape(leaf.shape[0], -1)
        weight = torch.arange(start + 1, start + values.shape[0] + 1, dtype=torch.float64,
                              device=values.device)
        total += float(weight @ values.sum(1)) + 0.5 * float(weight @ values.abs().sum(1))
    return total


def streamable(data: Any) -> bool:
    """A stream that can be read again (a ``DataLoader``, a list of batches, any iterable
    that is not its own iterator): its probes need not be held all at once."""
    if not is_data_stream(data) or isinstance(data, Iterator):
        return False
    return True


class ProbeSource:
    """The probes of one side of a blocked kernel, handed out a block at a time.

    A re-readable stream (:func:`streamable`) is read once for its count, the presence of
    targets, a fingerprint of every batch and the first probe, and read again for every
    block that is needed (up to the block's last batch), so that only the blocks in use
    (two, for a block pair) are in memory, never the whole set; a batch that differs
    from the first reading (a shuffling loader) is an error. Anything else is collected
    once (:func:`collect`). The two most recent blocks are kept, so a row of block pairs
    ``(i, i), (i, i + 1), ...`` reads block i once."""

    def __init__(self, data: Any, targets: Any, batch_to_probe: Callable[[Any], Any] | None,
                 name: str) -> None:
        self.name = name
        self.batch_to_probe = batch_to_probe
        self.data: Any = None
        self.x: Any = None
        self.t: torch.Tensor | None = None
        self.cache: list[tuple[tuple[int, int], tuple[Any, torch.Tensor | None]]] = []
        if not streamable(data):
            self.x, self.t, self.n = collect(data, targets, batch_to_probe, name)
            self.has_targets = self.t is not None
            self.first = (B.take(self.x, slice(0, 1)), None if self.t is None else self.t[:1])
            self.sum = checksum(self.x, self.t)
            return
        if targets is not None:
            raise NTKError(f"`{name}` is a data loader, so its batches carry the targets; do "
                           "not also pass targets separately (map batches with "
                           "`batch_to_probe=`).")
        self.data = data
        self.sizes: list[int] = []
        self.prints: list[float] = []
        present: list[bool] = []
        weighted = 0.0
        first: tuple[Any, torch.Tensor | None] | None = None
        for x, t in _probe_pairs(data, batch_to_probe, name):
            m = B.batch_size(x, name)
            if first is None:  # copies: the batch itself is not kept
                first = (tree_map(lambda a: a[:1].clone(), x), None if t is None else t[:1].clone())
            part = _weighted_sums(x, t, sum(self.sizes))
            self.prints.append(part)
            weighted += part
            self.sizes.append(m)
            present.append(t is not None)
        if first is None:
            raise NTKError(f"the data loader `{name}` gave no batch; it must yield at least "
                           "one.")
        if any(present) and not all(present):
            raise NTKError(f"some batches of `{name}` have targets and some do not; give "
                           "every batch targets (or none).")
        self.n = sum(self.sizes)
        self.has_targets = present[0]
        self.first = first
        self.sum = weighted / self.n

    def take(self, sl: slice) -> tuple[Any, torch.Tensor | None]:
        """Inputs and targets of the probes ``sl``."""
        if self.data is None:
            return B.take(self.x, sl), (None if self.t is None else self.t[sl])
        key = (sl.start, sl.stop)
        for k, value in self.cache:
            if k == key:
                return value
        value = self._read(sl)
        self.cache = self.cache[-1:] + [(key, value)]
        return value

    def _read(self, sl: slice) -> tuple[Any, torch.Tensor | None]:
        xs, ts, start = [], [], 0
        for index, (x, t) in enumerate(_probe_pairs(self.data, self.batch_to_probe,
                                                    self.name)):
            m = B.batch_size(x, self.name)
            if index >= len(self.sizes) or m != self.sizes[index] or \
                    not math.isclose(_weighted_sums(x, t, start), self.prints[index],
                                     rel_tol=1e-9, abs_tol=1e-9):
                raise NTKError(f"`{self.name}` gave other batches when read again (batch "
                               f"{index}): the blocked kernel reads the loader once a block "
                               "and needs the same batches in the same order every time -- "
                               "use shuffle=False (and no random transforms), or pass the "
                               "probes as one batch.")
            lo, hi = max(sl.start, start), min(sl.stop, start + m)
            if lo < hi:
                xs.append(B.take(x, slice(lo - start, hi - start)))
                ts.append(None if t is None else t[lo - start:hi - start])
            start += m
            if start >= sl.stop:
                break
        x = _cat(xs, self.name)
        present = [t for t in ts if t is not None]
        return x, (torch.cat(present) if present else None)


def checksum(inputs: Any, targets: torch.Tensor | None) -> float:
    """A float64 fingerprint of the probes that depends on their order: per leaf, the
    probe sums (and absolute sums) weighted by the probe's position."""
    total = 0.0
    for leaf in B.leaves(inputs) + ([targets] if targets is not None else []):
        values = leaf.detach().double().reshape(leaf.shape[0], -1)
        weight = torch.arange(1, values.shape[0] + 1, dtype=torch.float64,
                              device=values.device) / values.shape[0]
        total += float(weight @ values.sum(1)) + 0.5 * float(weight @ values.abs().sum(1))
    return total


def _block_size(block_size: int | None, n: int, budget: int, itemsize: int,
                outputs: int) -> int:
    if block_size is not None:
        if not isinstance(block_size, int) or block_size < 1:
            raise NTKError(f"block_size={block_size!r} must be a positive int (probes per "
                           "block) or None for automatic.")
        return block_size
    # a kernel block (and its mirrored copy) is a small part of the budget
    fit = int(math.sqrt(budget / (8 * itemsize * outputs * outputs)))
    return max(1, min(n, DEFAULT_BLOCK_MAX, fit))


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError as exc:
        raise NTKError(f"out= cannot store a {dtype} kernel in a .npy file; use "
                       "dtype=torch.float32 or torch.float64.") from exc


def _mirror(block: torch.Tensor) -> torch.Tensor:
    return block.permute(1, 0, 3, 2) if block.dim() == 4 else block.T


def blocked_kernel(block_fn: BlockFn, inputs: Any, targets: Any, inputs2: Any, targets2: Any,
                   *, mode: ModeLike, dtype: torch.dtype, device: torch.device,
                   num_outputs: Callable[[Any], int],
                   budget: int, batch_to_probe: Callable[[Any], Any] | None = None,
                   block_size: int | None = None, out: str | None = None,
                   progress: bool = False, comm: Communicator | None = None,
                   self_check: bool = True, layer_paths: dict[str, str] | None = None,
                   layerwise: bool = False) -> tuple[Any, Any]:
    """The kernel (``layerwise``: the dict of per-layer kernels) of all probes, block by
    block through ``block_fn`` (one engine call a block). Returns ``(result, explanation
    of the first block)``; ``result`` is a tensor, or with ``out=`` the ``np.memmap`` of
    the written ``.npy`` file."""
    comm = resolve(comm)
    kind = KernelMode.parse(mode)
    all_pairs = kind.all_pairs
    if out is not None and layerwise:
        raise NTKError("out= writes one kernel; layerwise_ntk returns one kernel a layer. Use "
                       "empirical_ntk(..., out=...) or keep layerwise_ntk in memory.")
    def prepare() -> tuple[ProbeSource, ProbeSource, int]:
        src1 = ProbeSource(inputs, targets, batch_to_probe, "inputs")
        src2 = ProbeSource(inputs2, targets2, batch_to_probe, "inputs2") if cross else src1
        one, t1 = src1.first
        if kind.needs_targets and not (src1.has_targets and src2.has_targets) \
                and num_outputs(one) > 1:
            raise NTKError("mode='target' needs the class label of every probe, but the "
                           "data has no targets: give batches as (inputs, targets) pairs, "
                           "map other batches with `batch_to_probe=lambda b: (inputs, "
                           "labels)`, or use mode='trace' / 'sum' / 'full'.")
        # rows a probe (of an all-pairs kernel (N1, N2, k, k)): the mode says
        o = (kind.cotangent_rows(t1, 1, num_outputs(one), "targets", dtype).shape[1]
             if all_pairs else 1)
        return src1, src2, o

    cross = inputs2 is not None
    src1, src2, o = guarded(comm, prepare)
    n1, n2 = src1.n, src2.n
    check_same_data(comm, n1 + (n2 if cross else 0),
                    src1.sum + (src2.sum if cross else 0.0), "probes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = _block_size(block_size, max(n1, n2), budget, itemsize, o)
    rows, cols = blocks(n1, size), blocks(n2, size)
    if cross:
        pairs = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    else:
        pairs = [(i, j) for i in range(len(rows)) for j in range(i, len(rows))]
    split = ProbeSplit(comm) if comm.world_size > 1 else None
    shape = (n1, n2) + ((o, o) if all_pairs else ())

    writer = None
    if out is not None:
        np_dtype = _numpy_dtype(dtype)

        def create() -> Any:
            return np.lib.format.open_memmap(str(out), mode="w+", dtype=np_dtype, shape=shape)

        if comm.rank == 0:
            writer = guarded(comm, create)
        else:
            guarded(comm, lambda: None)
        if comm.rank != 0:
            writer = guarded(comm, lambda: np.load(str(out), mmap_mode="r+"))
        else:
            guarded(comm, lambda: None)

    result: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"first": None, "paths": None}

    def call(i: int, j: int) -> dict[str, torch.Tensor]:
        si, sj = rows[i], cols[j]
        xi, ti = src1.take(si)
        if not cross and i == j:
            xj, tj = None, None
        else:
            xj, tj = src2.take(sj)
        first = state["paths"] is None
        kernels, expl = block_fn(xi, ti, xj, tj, bool(self_check) and first, layer_paths,
                                 split)
        if first:
            state["first"], state["paths"] = expl, dict(expl.paths)
        elif self_check and dict(expl.paths) != state["paths"]:
            # this block would take another path than the checked one: check it too
            kernels, expl = block_fn(xi, ti, xj, tj, True, layer_paths, split)
        return kernels

    def place(key: str, i: int, j: int, block: torch.Tensor) -> None:
        si, sj = rows[i], cols[j]
        if writer is not None:
            if comm.rank != 0:  # every rank has the block; rank 0 writes it
                return
            arr = block.detach().cpu().numpy()
            writer[si, sj] = arr
            if not cross and i != j:
                writer[sj, si] = arr.transpose(1, 0, 3, 2) if arr.ndim == 4 else arr.T
            return
        if key not in result:
            result[key] = torch.zeros(shape, dtype=dtype, device=device)
        result[key][si, sj] = block
        if not cross and i != j:
            result[key][sj, si] = _mirror(block)

    def work() -> None:
        bar = _progress(len(pairs), progress and comm.rank == 0)
        try:
            for i, j in pairs:
                for key, block in call(i, j).items():
                    place(key, i, j, block)
                bar.update(1)
        finally:
            bar.close()
        if writer is not None:
            writer.flush()

    guarded(comm, work)  # with out=: rank 0 has flushed the file when this returns
    if writer is not None:
        return writer, state["first"]
    if not layerwise:
        return result.get("", torch.zeros(shape, dtype=dtype, device=device)), state["first"]
    return result, state["first"]


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with Lightning and the dev extra
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n: int = 1) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(total=total, desc="NTK blocks", unit="block")


__all__ = ["is_data_stream", "default_batch_to_probe", "collect", "blocked_kernel"]
