"""A small communicator interface for splitting kernel and spectrum work across ranks.

The engine knows nothing of Lightning or of how processes were started: it talks to a
:class:`Communicator` (``rank``, ``world_size``, ``all_reduce``, ``all_gather``).
:class:`TorchDistributedComm` implements it on an initialised ``torch.distributed``
process group (gloo or NCCL); an adapter for a training framework (e.g. a Lightning
strategy) only has to provide the same four members. ``comm=None`` means one process.

Failure discipline: every collective the engine issues is preceded by
:func:`agree_no_error`, an all-reduce of an error flag, so that an exception on one rank
makes every rank raise (with the failing rank's number) instead of leaving the others
waiting forever in the next collective.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, TypeVar, runtime_checkable

import torch

from .errors import NTKError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")


@runtime_checkable
class Communicator(Protocol):
    """What the engine needs of a group of processes (one process each rank).

    ``all_reduce(tensor, op)`` returns the element-wise ``op`` (``"sum"`` or ``"max"``)
    of ``tensor`` over all ranks (same shape and dtype on every rank; may work in place);
    ``all_gather(tensor)`` returns the list of every rank's tensor, by rank (same shape
    and dtype on every rank). Both are collective: every rank must call them in the
    same order.
    """

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


class LocalComm:
    """One process: the collectives are identities."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


class TorchDistributedComm:
    """:class:`Communicator` on an initialised ``torch.distributed`` process group
    (``group=None``: the default group). Tensors go through the collectives on their own
    device (NCCL needs CUDA tensors, gloo CPU ones)."""

    def __init__(self, group: ProcessGroup | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise NTKError("TorchDistributedComm needs an initialised process group: call "
                           "torch.distributed.init_process_group(...) first (or pass "
                           "comm=None for one process).")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX}
        if op not in ops:
            raise NTKError(f"all_reduce op {op!r}; choose 'sum' or 'max'.")
        out = tensor.contiguous().clone()
        self._dist.all_reduce(out, op=ops[op], group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._dist.all_gather(parts, tensor, group=self.group)
        return parts

    def all_gather_into(self, parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        """:meth:`all_gather` into the given tensors (e.g. views of one buffer), saving a
        copy; optional for a Communicator (:func:`gather_rows` uses it when present)."""
        self._dist.all_gather(parts, tensor.contiguous(), group=self.group)


def resolve(comm: Communicator | None) -> Communicator:
    """``comm`` itself, checked, or :class:`LocalComm` for ``None``."""
    if comm is None:
        return LocalComm()
    for attr in ("rank", "world_size", "all_reduce", "all_gather"):
        if not hasattr(comm, attr):
            raise NTKError(f"comm={type(comm).__name__} has no `{attr}`; pass a "
                           "Communicator (e.g. ntk_callback.engine.TorchDistributedComm() "
                           "after torch.distributed.init_process_group) or None.")
    if not (0 <= int(comm.rank) < int(comm.world_size)):
        raise NTKError(f"comm has rank {comm.rank} outside 0..{comm.world_size - 1}.")
    return comm


def agree_no_error(comm: Communicator, error: BaseException | None) -> None:
    """Collective: raise on every rank if ``error`` is set on any rank.

    The failing rank re-raises its own exception; the others raise an NTKError naming
    the (highest) failing rank. A no-op for one process (the error is raised as is)."""
    if comm.world_size == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([float(STOP + comm.rank) if error is not None else 0.0],
                        dtype=torch.float64)
    if error is not None and getattr(error, AGREED, False):
        raise error  # every rank knows already: agreeing again would wait forever
    failed = int(comm.all_reduce(flag, "max").item())
    if error is not None:
        raise mark_agreed(error)
    if failed >= STOP:
        raise PeerFailed(failed - STOP, comm.world_size)
    if failed:
        raise NTKError(f"a rank sent the agreement code {failed}, which this point of the "
                       "computation does not expect: the ranks are out of step.")


#: agreement codes from STOP on mean "rank (code - STOP) stops"; smaller positive codes
#: are the caller's (e.g. a module every rank sends to the exact path), and lose to a stop
STOP = 1 << 24


#: attribute set on an exception every rank has already agreed on
AGREED = "_ntk_agreed"


def mark_agreed(error: BaseException) -> BaseException:
    """``error``, marked as known to every rank: :func:`agree_no_error` re-raises it
    without another agreement."""
    setattr(error, AGREED, True)
    return error


class PeerFailed(NTKError):
    """Another rank failed; every rank has agreed on it (no further agreement)."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(f"rank {rank} of {world_size} failed while computing its share of "
                         "the NTK (see that rank's error); every rank stops.")
        setattr(self, AGREED, True)


def guarded(comm: Communicator, fn: Callable[[], T]) -> T:
    """Run ``fn`` locally, then :func:`agree_no_error` (collective) before returning its
    value: call this around the local work that precedes a collective."""
    value, error = None, None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank after the agreement
        error = exc
    agree_no_error(comm, error)
    return value  # type: ignore[return-value]


def shard(n: int, comm: Communicator) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks get one
    more)."""
    w, r = comm.world_size, comm.rank
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def gather_rows(comm: Communicator, local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's :func:`shard` of a (n_r, ...) tensor into (n, ...)
    (shards padded to a common length for the collective)."""
    if comm.world_size == 1:
        return local
    size = -(-n // comm.world_size)
    into = getattr(comm, "all_gather_into", None)
    if into is not None and n % comm.world_size == 0 and local.shape[0] == size:
        # equal shares: every rank's part lands in its rows of the result, no copies
        whole = torch.empty((n,) + tuple(local.shape[1:]), dtype=local.dtype,
                            device=local.device)
        into([whole[r * size:(r + 1) * size] for r in range(comm.world_size)], local)
        return whole
    pad = torch.zeros((size,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    pad[:local.shape[0]] = local
    parts = comm.all_gather(pad)
    base, extra = divmod(n, comm.world_size)
    out = [part[:base + (1 if r < extra else 0)] for r, part in enumerate(parts)]
    return torch.cat(out)


class ProbeSplit:
    """One engine call's probes split across the ranks of ``comm``: each rank captures the
    per-probe factors of its :func:`shard` (:meth:`share`), the factors are gathered
    (:meth:`gather`), each rank contracts its rows of the kernel (:meth:`rows`), and the
    partial kernels are summed (:meth:`reduce`, zeros elsewhere, so an entry is one rank's
    product). Every collective is preceded by :meth:`agree`.

    The structured path (:mod:`.structured.ranks`) uses it without importing this module
    (duck typing)."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.rank = int(comm.rank)
        self.world_size = int(comm.world_size)

    def usable(self, n: int) -> bool:
        """Whether ``n`` probes can be split (every rank gets at least one)."""
        return self.world_size > 1 and n >= self.world_size

    def share(self, n: int) -> slice:
        """This rank's probes of ``n``."""
        return shard(n, self.comm)

    def rows(self, n: int, symmetric: bool) -> slice:
        """This rank's rows of an (n, .) kernel. A self-kernel is computed on and above the
        diagonal only, so row ranges are cut to equal areas of the upper triangle (row i
        costs n - i entries); a cross kernel is cut into equal row ranges."""
        if not symmetric:
            return self.share(n)
        total = n * (n + 1) / 2

        def cut(r: int) -> int:
            if r <= 0:
                return 0
            if r >= self.world_size:
                return n
            # rows 0..a-1 hold a n - a (a - 1) / 2 entries: solve for r / world of them
            target = total * r / self.world_size
            b = 2 * n + 1
            a = (b - (b * b - 8 * target) ** 0.5) / 2
            return min(n, max(0, int(round(a))))

        return slice(cut(self.rank), cut(self.rank + 1))

    def agree(self, code: int) -> int:
        """Collective (the same one as :func:`agree_no_error`, so a rank that stopped
        elsewhere meets this one): the largest ``code`` of all ranks. 0: no trouble;
        1 .. STOP - 1: the caller's codes; :meth:`stop_code` and above: a rank stops,
        and every other rank raises :class:`PeerFailed` here (the stopping rank raises
        its own error, marked agreed with :func:`mark_agreed`)."""
        flag = torch.tensor([float(code)], dtype=torch.float64)
        got = int(self.comm.all_reduce(flag, "max").item())
        if got >= STOP and code < STOP:
            raise PeerFailed(got - STOP, self.world_size)
        return got

    def stop_code(self) -> int:
        """The code :meth:`agree` sends for an error that stops this rank."""
        return STOP + self.rank

    def stopped(self, error: BaseException) -> BaseException:
        """``error`` after :meth:`agree` has sent :meth:`stop_code` for it: marked agreed,
        so that no caller agrees on it again."""
        return mark_agreed(error)

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's (n_r, ...) share, concatenated to (n, ...)."""
        return gather_rows(self.comm, local, n)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks."""
        return self.comm.all_reduce(tensor, "sum")


def check_same_data(comm: Communicator, n: int, checksum: float, what: str) -> None:
    """Collective: every rank must hold the same ``n`` probes (compared by count and a
    float64 checksum of their values)."""
    if comm.world_size == 1:
        return
    mine = torch.tensor([float(n), float(checksum)], dtype=torch.float64)
    parts = comm.all_gather(mine)
    # counts exactly; checksums to a relative 1e-9 (a sum's rounding may depend on the
    # rank's thread count), far below what a different probe would change
    scale = max(1.0, max(abs(float(p[1])) for p in parts))
    if any(int(p[0]) != int(parts[0][0]) or abs(float(p[1] - parts[0][1])) > 1e-9 * scale
           for p in parts):
        counts = [int(p[0]) for p in parts]
        raise NTKError(f"the ranks hold different {what} (counts per rank {counts}, or the "
                       "same count with different values): with comm=, every rank must pass "
                       "the same probes in the same order -- do not use a DistributedSampler "
                       "or a shuffling loader for them; each rank computes its share itself.")


__all__ = ["Communicator", "LocalComm", "TorchDistributedComm", "agree_no_error", "guarded",
           "shard", "gather_rows", "check_same_data", "resolve", "ProbeSplit", "PeerFailed",
           "mark_agreed", "STOP"]
