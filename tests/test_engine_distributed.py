"""Kernels and spectra split across two real processes (gloo, torch.multiprocessing
spawn) against the single-process results; a failure on one rank stops both."""
from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import rel_err
from torch import nn

from ntk_callback import NTKError, empirical_ntk, layerwise_ntk, ntk_spectrum
from ntk_callback.engine import TorchDistributedComm

N = 26


class _Net(nn.Module):
    """A small MLP that raises on rank 1 when armed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
        self.armed = False
        self.tricky: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("planted failure on rank 1")
        # fails a batched call that starts with probe `tricky` (rank 1's capture share)
        if self.tricky is not None and x.dim() == 2 and x.shape[0] > 1 \
                and float(x[0, 0]) == self.tricky:
            raise RuntimeError("planted failure in rank 1's capture pass")
        return self.net(x)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (N,), generator=g)


def _loader():
    x, y = _data()
    return [(x[i:i + 6], y[i:i + 6]) for i in range(0, N, 6)]


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    result: dict = {}
    try:
        comm = TorchDistributedComm()
        model = _Net().double()
        x, y = _data()
        result["trace"] = empirical_ntk(model, iter(_loader()), mode="trace", block_size=7,
                                        comm=comm)
        result["full"] = empirical_ntk(model, x, y, mode="full", block_size=9, comm=comm)
        result["layers"] = layerwise_ntk(model, iter(_loader()), block_size=8, comm=comm)
        npy = os.path.join(out_dir, "kernel.npy")
        empirical_ntk(model, x, y, block_size=5, out=npy, comm=comm)
        result["matfree"] = ntk_spectrum(model, x, y, k=4, mode="trace", route="matfree",
                                         comm=comm, return_vectors=True)
        result["gram"] = ntk_spectrum(model, x, y, k=4, mode="full", route="gram", comm=comm)
        # the structured pass fails on rank 1's share only: both ranks agree to take the
        # exact path, and the kernel is still right
        model.tricky = float(x[N // 2, 0])
        result["agreed"] = empirical_ntk(model, x, y, comm=comm, explain=True)
        model.tricky = None
        # a rank that holds other probes is refused on every rank
        try:
            empirical_ntk(model, x[:N - rank], y[:N - rank], block_size=7, comm=comm)
        except NTKError as exc:
            result["mismatch"] = str(exc)
        try:  # the same probes in another order (a shuffling loader on one rank)
            order = torch.arange(N).flip(0) if rank else torch.arange(N)
            ntk_spectrum(model, x[order], y[order], k=2, comm=comm)
        except NTKError as exc:
            result["order"] = str(exc)
        # a failure on rank 1: both ranks raise, neither hangs
        model.armed = True
        start = time.monotonic()
        try:
            empirical_ntk(model, x, y, block_size=7, comm=comm)
        except Exception as exc:  # noqa: BLE001 - recorded for the parent
            result["failure"] = f"{type(exc).__name__}: {exc}"
        try:
            ntk_spectrum(model, x, y, k=2, route="matfree", comm=comm)
        except Exception as exc:  # noqa: BLE001
            result["spectrum_failure"] = f"{type(exc).__name__}: {exc}"
        result["failure_seconds"] = time.monotonic() - start
    except Exception:  # noqa: BLE001 - any other error goes to the parent
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one(tmp_path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish (a hang)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert "error" not in r, r.get("error")

    model = _Net().double()
    x, y = _data()
    trace = empirical_ntk(model, x, mode="trace")
    full = empirical_ntk(model, x, y, mode="full")
    layers = layerwise_ntk(model, x, y)
    target = empirical_ntk(model, x, y)
    single_blocked = empirical_ntk(model, iter(_loader()), mode="trace", block_size=7)
    for r in ranks:
        assert rel_err(r["trace"], trace) < 1e-12
        # each rank contracts its rows of a block: round-off, not bits, differ from one process
        assert rel_err(r["trace"], single_blocked) < 1e-12
        assert rel_err(r["full"], full) < 1e-12
        assert list(r["layers"]) == list(layers)
        for key in layers:
            assert rel_err(r["layers"][key], layers[key]) < 1e-12
    for r in ranks:
        kernel, explanation = r["agreed"]
        assert rel_err(kernel, target) < 1e-12
        assert all(path.startswith("generic") for path in explanation.paths.values())
    for key in ("trace", "full"):  # the ranks hold the very same kernel
        assert torch.equal(ranks[0][key], ranks[1][key])
    import numpy as np
    assert rel_err(torch.from_numpy(np.load(tmp_path / "kernel.npy")), target) < 1e-12

    dense = torch.linalg.eigvalsh(trace).flip(0)[:4]
    full2 = full.permute(0, 2, 1, 3).reshape(3 * N, 3 * N)
    dense_full = torch.linalg.eigvalsh(full2).flip(0)[:4]
    for r in ranks:
        vals, vecs = r["matfree"]
        assert float(((vals - dense).abs() / dense[0]).max()) < 1e-9
        assert float(((r["gram"] - dense_full).abs() / dense_full[0]).max()) < 1e-12
    assert torch.equal(ranks[0]["matfree"][0], ranks[1]["matfree"][0])

    for r in ranks:
        assert "different probes" in r["mismatch"]
        assert "different data" in r["order"]
        assert r["failure_seconds"] < 60
    assert "planted failure on rank 1" in ranks[1]["failure"]
    assert "rank 1 of 2 failed" in ranks[0]["failure"]
    assert "planted failure on rank 1" in ranks[1]["spectrum_failure"]
    assert "rank 1 of 2 failed" in ranks[0]["spectrum_failure"]
