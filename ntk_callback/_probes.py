"""Probe batches for the callback: mapping batches, drawing them without side effects.

A probe set is ``(inputs, targets)``: ``inputs`` a tensor, or a tuple/list/dict of tensors
sharing the first (batch) dimension N, as ``model(inputs)`` (or ``model(*inputs)`` /
``model(**inputs)``) accepts; ``targets`` an (N,) tensor or ``None``.

Drawing never moves the global RNGs (torch, CUDA, numpy, ``random``) and never iterates
the training DataLoader: a map-style dataset is indexed directly with indices from the
callback's own seeded ``torch.Generator``; an iterable dataset is read through a fresh,
single-process loader. Dataset transforms that draw random numbers therefore run inside a
saved-and-restored RNG state.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

Probes = tuple[Any, Optional[Tensor]]

_INPUT_KEYS = ("x", "input", "inputs", "features")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")


class ProbeError(ValueError):
    """A batch or probe set the callback cannot use; the message names the fix."""


def default_batch_to_probe(batch: Any) -> Probes:
    """Map a training batch to ``(inputs, targets)``.

    Handles ``x`` (inputs only), ``(x,)``, ``(x, y)`` and ``(x, y, *extra)`` tuples/lists,
    dicts with an input key in ``x / input / inputs / features`` and an optional
    target key in ``y / target / targets / label / labels``, and dicts of tensors with a
    target key but no input key (Hugging Face style, e.g. ``input_ids``,
    ``attention_mask``, ``labels``): the target key's tensor is the targets and the other
    entries are the inputs, passed to ``forward`` as keyword arguments when its signature
    names exactly those keys.
    Anything else needs ``NTKReportCallback(batch_to_probe=...)``.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        inputs = batch[0]
        targets = batch[1] if len(batch) >= 2 else None
        return inputs, targets if isinstance(targets, Tensor) else None
    if isinstance(batch, Mapping):
        in_key = next((k for k in _INPUT_KEYS if k in batch), None)
        tgt_key = next((k for k in _TARGET_KEYS if k in batch), None)
        if in_key is not None:
            return batch[in_key], (batch[tgt_key] if tgt_key is not None else None)
        rest = {k: v for k, v in batch.items() if k != tgt_key}
        if tgt_key is not None and rest and all(isinstance(v, Tensor) for v in rest.values()):
            # Hugging Face style: every other key is a keyword input of forward
            target = batch[tgt_key]
            return rest, target if isinstance(target, Tensor) else None
    raise ProbeError(
        "NTKReportCallback cannot tell inputs from targets in a batch of type "
        f"{type(batch).__name__}"
        + (f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else "")
        + ". Fix: pass batch_to_probe=lambda batch: (inputs, targets) to NTKReportCallback "
          "(targets may be None)."
    )


def apply_to_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a tensor / tuple / list / dict structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(apply_to_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [apply_to_tensors(o, fn) for o in obj]
    if isinstance(obj, Mapping):
        return {k: apply_to_tensors(v, fn) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> list[Tensor]:
    found: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        found.append(t)
        return t

    apply_to_tensors(obj, keep)
    return found


def num_samples(inputs: Any) -> int:
    """N, the shared first dimension of the input tensors; ProbeError when absent or
    inconsistent."""
    tensors = _tensors(inputs)
    if not tensors:
        raise ProbeError(
            f"probe inputs of type {type(inputs).__name__} contain no tensor. Fix: inputs must be "
            "a tensor or a "
            "tuple/list/dict of tensors whose first dimension is the probe index."
        )
    sizes = {int(t.shape[0]) if t.ndim > 0 else -1 for t in tensors}
    if len(sizes) != 1 or -1 in sizes:
        raise ProbeError(
            "probe input tensors disagree on the batch dimension (first-dimension sizes "
            f"{sorted(sizes)}). "
            "Fix: every input tensor needs the probe index as its first dimension."
        )
    return sizes.pop()


def validate_probes(inputs: Any, targets: Any) -> int:
    """Check a probe set; returns N. ``targets`` must be None or a tensor with ``shape[0] == N``."""
    n = num_samples(inputs)
    if n == 0:
        raise ProbeError("the probe set is empty. Fix: give at least one probe (num_probes >= 1).")
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise ProbeError(
                f"probe targets must be a torch.Tensor or None, got {type(targets).__name__}. "
                "Fix: probes=(inputs, torch.as_tensor(targets))."
            )
        if targets.ndim == 0 or targets.shape[0] != n:
            raise ProbeError(
                f"probe targets have shape {tuple(targets.shape)} but the inputs hold {n} probes. "
                "Fix: targets need shape (N,) (class labels or regression targets) with N = number "
                "of probes."
            )
    return n


def index_inputs(inputs: Any, idx: Tensor) -> Any:
    return apply_to_tensors(inputs, lambda t: t[idx])


def concat_inputs(parts: Sequence[Any]) -> Any:
    """Concatenate a list of same-structured inputs along dim 0."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts), dim=0)
    if isinstance(first, (tuple, list)):
        joined = [concat_inputs([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(joined) if isinstance(first, tuple) else joined
    if isinstance(first, Mapping):
        return {k: concat_inputs([p[k] for p in parts]) for k in first}
    raise ProbeError(f"cannot concatenate probe inputs of type {type(first).__name__}")


def to_cpu(obj: Any) -> Any:
    """Detached CPU copies (clones, so later in-place edits of the source cannot leak in)."""
    return apply_to_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore torch (CPU and initialised CUDA), numpy and ``random`` global RNG states on exit."""
    torch_state = torch.get_rng_state()
    cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda_on else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _is_integer_labels(targets: Tensor | None) -> bool:
    return (
        targets is not None
        and targets.ndim == 1
        and (not targets.is_floating_point())
        and (not targets.is_complex())
        and targets.dtype != torch.bool
    )


def select_indices(targets: Tensor | None, k: int, generator: torch.Generator,
                   pool_size: int) -> Tensor:
    """Pick ``min(k, pool_size)`` positions from a pool that is already in random order.

    Integer labels: round-robin over the classes (class order shuffled with ``generator``),
    so every class gets ``floor(k / C)`` or ``ceil(k / C)`` probes when the pool has them;
    a class short of probes leaves its share to the others. The result is sorted by
    (label, pool position). Otherwise: the first ``k`` of the pool.
    """
    k = min(k, pool_size)
    if targets is None or not _is_integer_labels(targets):
        return torch.arange(k)
    labels = targets.tolist()
    classes = sorted(set(labels))
    buckets: dict[Any, list[int]] = {c: [] for c in classes}
    for pos, c in enumerate(labels):
        buckets[c].append(pos)
    order = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    cursors = {c: 0 for c in classes}
    chosen: list[int] = []
    while len(chosen) < k:
        progressed = False
        for c in order:
            if len(chosen) >= k:
                break
            if cursors[c] < len(buckets[c]):
                chosen.append(buckets[c][cursors[c]])
                cursors[c] += 1
                progressed = True
        if not progressed:
            break
    chosen.sort(key=lambda pos: (labels[pos], pos))
    return torch.tensor(chosen, dtype=torch.long)


def find_dataloader(obj: Any) -> Any:
    """The first DataLoader (or other iterable) in what ``trainer.train_dataloader`` returns."""
    if obj is None:
        return None
    if isinstance(obj, DataLoader):
        return obj
    if isinstance(obj, Mapping):
        for v in obj.values():
            found = find_dataloader(v)
            if found is not None:
                return found
        return None
    if isinstance(obj, (list, tuple)) and obj and not isinstance(obj[0], Tensor):
        for v in obj:
            found = find_dataloader(v)
            if found is not None:
                return found
        return None
    return obj if hasattr(obj, "__iter__") else None


def _map_batch(batch: Any, batch_to_probe: Callable[[Any], Probes]) -> Probes:
    mapped = batch_to_probe(batch)
    if not (isinstance(mapped, (tuple, list)) and len(mapped) == 2):
        raise ProbeError(
            "batch_to_probe must return a pair (inputs, targets) (targets may be None); got "
            f"{type(mapped).__name__}"
        )
    inputs, targets = mapped
    if targets is not None and not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    validate_probes(inputs, targets)
    return inputs, targets


def _join(pairs: list[Probes]) -> Probes:
    inputs = concat_inputs([p[0] for p in pairs])
    has_t = [p[1] is not None for p in pairs]
    if all(has_t):
        targets: Tensor | None = torch.cat([p[1] for p in pairs], dim=0)  # type: ignore[misc]
    elif not any(has_t):
        targets = None
    else:
        raise ProbeError("some batches carry targets and others do not. Fix: make "
                         "batch_to_probe consistent.")
    return inputs, targets


def _is_map_style(dataset: Any) -> bool:
    if dataset is None or isinstance(dataset, IterableDataset):
        return False
    try:
        return len(dataset) > 0 and hasattr(dataset, "__getitem__")
    except TypeError:
        return False


def draw_probes(
    loader: Any,
    num_probes: int,
    generator: torch.Generator,
    batch_to_probe: Callable[[Any], Probes] = default_batch_to_probe,
    *,
    pool_factor: int = 4,
    min_pool: int = 256,
) -> Probes:
    """Draw up to ``num_probes`` probes from ``loader`` (a DataLoader or any iterable of batches).

    Map-style dataset: a pool of ``min(len, max(pool_factor * num_probes, min_pool))``
    indices drawn with ``generator``; the label of each pool item is read (items collated
    one at a time with the loader's ``collate_fn``), :func:`select_indices` picks a
    class-balanced subset, and only those items are collated into the probe batch.
    Iterable dataset / other iterables: batches of a fresh single-process iterator are
    taken until ``num_probes`` probes are available. Global RNG states are preserved.
    Returns CPU copies.
    """
    if loader is None:
        raise ProbeError("no dataloader to draw probes from. Fix: pass probes=(inputs, "
                         "targets) to NTKReportCallback.")
    pairs: list[Probes]
    with preserve_global_rng():
        dataset = getattr(loader, "dataset", None) if isinstance(loader, DataLoader) else None
        if isinstance(loader, DataLoader) and dataset is not None and _is_map_style(dataset):
            n = len(dataset)
            size = min(n, max(pool_factor * num_probes, min_pool))
            pool = torch.randperm(n, generator=generator)[:size]
            collate = loader.collate_fn
            # with automatic batching off (batch_size=None) every item is already a batch
            auto = loader.batch_sampler is not None

            def fetch(positions: Sequence[int]) -> Probes:
                items = [dataset[int(pool[p])] for p in positions]
                if auto:
                    return _map_batch(collate(items), batch_to_probe)
                return _join([_map_batch(collate(it), batch_to_probe) for it in items])

            if auto:
                labels = [fetch([p])[1] for p in range(len(pool))]
                present = [t for t in labels if t is not None]
                targets = torch.cat(present) if len(present) == len(labels) else None
                chosen = select_indices(targets, num_probes, generator, len(pool))
                inputs, tgt = fetch(chosen.tolist())
            else:
                pairs = []
                count = 0
                for p in range(len(pool)):
                    pairs.append(fetch([p]))
                    count += num_samples(pairs[-1][0])
                    if count >= max(pool_factor * num_probes, min_pool):
                        break
                inputs, tgt = _join(pairs)
                chosen = select_indices(tgt, num_probes, generator, count)
                inputs = index_inputs(inputs, chosen)
                tgt = tgt[chosen] if tgt is not None else None
        else:
            if isinstance(loader, DataLoader):
                # a fresh single-process loader: never the training iterator, never its workers
                loader = DataLoader(loader.dataset, batch_size=loader.batch_size,
                                    collate_fn=loader.collate_fn, num_workers=0)
            pairs = []
            count = 0
            for batch in loader:
                pair = _map_batch(batch, batch_to_probe)
                pairs.append(pair)
                count += num_samples(pair[0])
                if count >= num_probes:
                    break
            if not pairs:
                raise ProbeError(
                    "the dataloader yielded no batch to draw probes from. "
                    "Fix: pass probes=(inputs, targets) to NTKReportCallback."
                )
            inputs, tgt = _join(pairs)
            chosen = select_indices(tgt, num_probes, generator, count)
            inputs, tgt = index_inputs(inputs, chosen), (tgt[chosen] if tgt is not None else None)
        return to_cpu(inputs), (to_cpu(tgt) if tgt is not None else None)


__all__ = [
    "ProbeError",
    "Probes",
    "apply_to_tensors",
    "concat_inputs",
    "default_batch_to_probe",
    "draw_probes",
    "find_dataloader",
    "index_inputs",
    "num_samples",
    "preserve_global_rng",
    "select_indices",
    "to_cpu",
    "validate_probes",
]
