"""Kernels of data loaders, built block by block: against the one-shot kernel of the
concatenated probes and against the float64 reference (``reference.ntk_func``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ntk_func, rel_err
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ntk_callback import NTKError, empirical_ntk, layerwise_ntk

N, N2 = 23, 9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


X, Y = _data(N, 1)
X2, Y2 = _data(N2, 2)


def _loader(x: torch.Tensor, y: torch.Tensor, bs: int = 5) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _symmetric(k: torch.Tensor) -> bool:
    return bool(torch.equal(k, k.permute(1, 0, 3, 2) if k.dim() == 4 else k.T))


@pytest.mark.parametrize("mode", ["target", "trace", "sum", "full"])
def test_loader_kernel_matches_one_shot_and_reference(mode: str) -> None:
    model = _model()
    one_shot = empirical_ntk(model, X, Y, mode=mode, dtype=torch.float64)
    blocked = empirical_ntk(model, _loader(X, Y), mode=mode, dtype=torch.float64, block_size=7)
    assert blocked.shape == one_shot.shape and blocked.dtype == torch.float64
    assert rel_err(blocked, one_shot) < 1e-13
    assert rel_err(blocked, ntk_func(model, X, Y, mode=mode)) < 1e-12
    assert _symmetric(blocked)  # diagonal blocks exact, off-diagonal mirrored


def test_one_block_is_the_one_shot_kernel_bit_for_bit() -> None:
    model = _model()
    one_shot = empirical_ntk(model, X, Y)
    assert torch.equal(empirical_ntk(model, _loader(X, Y)), one_shot)


@pytest.mark.parametrize("mode", ["target", "full"])
def test_cross_kernel_of_two_loaders(mode: str) -> None:
    model = _model()
    ref = empirical_ntk(model, X, Y, mode=mode, inputs2=X2, targets2=Y2, dtype=torch.float64)
    got = empirical_ntk(model, _loader(X, Y), mode=mode, inputs2=_loader(X2, Y2, 4),
                        dtype=torch.float64, block_size=6)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-13
    assert rel_err(got, ntk_func(model, X, Y, mode=mode, inputs2=X2, targets2=Y2)) < 1e-12


def test_layerwise_from_loader() -> None:
    model = _model()
    ref = layerwise_ntk(model, X, Y, mode="trace", dtype=torch.float64)
    got = layerwise_ntk(model, _loader(X, Y), mode="trace", dtype=torch.float64, block_size=8)
    assert list(got) == list(ref)
    for key in ref:
        assert rel_err(got[key], ref[key]) < 1e-13


class _DictData(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"signal": X[i], "label": Y[i], "id": i}


def test_dict_batches_through_batch_to_probe() -> None:
    model = _model()
    loader = DataLoader(_DictData(), batch_size=6)
    with pytest.raises(NTKError, match="batch_to_probe"):
        empirical_ntk(model, loader)
    got = empirical_ntk(model, loader, batch_to_probe=lambda b: (b["signal"], b["label"]),
                        dtype=torch.float64, block_size=10)
    assert rel_err(got, ntk_func(model, X, Y, mode="target")) < 1e-12


def test_generator_of_batches_and_memmap_output(tmp_path) -> None:
    model = _model()
    path = tmp_path / "k.npy"
    batches = ((X[i:i + 4], Y[i:i + 4]) for i in range(0, N, 4))
    got = empirical_ntk(model, batches, mode="full", dtype=torch.float64, block_size=5,
                        out=str(path))
    assert isinstance(got, np.memmap)
    on_disk = np.load(path)
    ref = empirical_ntk(model, X, Y, mode="full", dtype=torch.float64).numpy()
    assert on_disk.shape == ref.shape and on_disk.dtype == np.float64
    assert np.abs(on_disk - ref).max() <= 1e-13 * np.abs(ref).max()
    assert np.array_equal(on_disk, on_disk.transpose(1, 0, 3, 2))


def test_progress_bar_runs(capsys) -> None:
    got = empirical_ntk(_model(), _loader(X, Y), block_size=12, progress=True)
    assert got.shape == (N, N)
    assert "NTK blocks" in capsys.readouterr().err


def test_bad_inputs_have_clear_errors(tmp_path) -> None:
    model = _model()
    no_targets = DataLoader(TensorDataset(X), batch_size=5)  # batches are 1-tuples
    with pytest.raises(NTKError, match="batch_to_probe"):
        empirical_ntk(model, no_targets)
    with pytest.raises(NTKError, match="class label of every probe"):
        empirical_ntk(model, DataLoader(X, batch_size=5))  # tensor batches, target mode
    trace = empirical_ntk(model, DataLoader(X, batch_size=5), mode="trace", block_size=9)
    assert rel_err(trace, empirical_ntk(model, X, mode="trace")) < 1e-6
    with pytest.raises(NTKError, match="carry the targets"):
        empirical_ntk(model, _loader(X, Y), Y)
    with pytest.raises(NTKError, match="block_size"):
        empirical_ntk(model, _loader(X, Y), block_size=0)
    with pytest.raises(NTKError, match="layerwise"):
        layerwise_ntk(model, _loader(X, Y), out=str(tmp_path / "x.npy"))
    with pytest.raises(NTKError, match="no batch"):
        empirical_ntk(model, iter([]))
    with pytest.raises(NTKError, match="pair"):
        empirical_ntk(model, _loader(X, Y), batch_to_probe=lambda b: b[0])


class _CountingBatches:
    """A re-readable list of batches that records how many batches each reading took and
    the most probes handed out between two readings' starts."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int) -> None:
        self.batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]
        self.reads: list[int] = []

    def __iter__(self):
        self.reads.append(0)
        for batch in self.batches:
            self.reads[-1] += 1
            yield batch


def test_loader_is_read_again_a_block_at_a_time() -> None:
    """A re-readable loader is streamed: one reading for its size, then one a block in
    use, each stopping at the block's last batch; the kernel is the one-shot kernel."""
    model = _model()
    data = _CountingBatches(X, Y, 5)
    blocked = empirical_ntk(model, data, dtype=torch.float64, block_size=7)
    assert rel_err(blocked, empirical_ntk(model, X, Y, dtype=torch.float64)) < 1e-13
    # blocks [0:7] [7:14] [14:21] [21:23]: the first reading sees all 5 batches; block 0
    # needs batches 0-1, block 1 batches 0-2, block 2 batches 0-4
    assert data.reads[0] == 5 and len(data.reads) > 2
    assert min(data.reads[1:]) == 2
    # rows (0, 0..3), (1, 1..3), ...: each of row i's blocks read once, block i kept
    assert len(data.reads) - 1 <= 4 + 4 + 3 + 2 + 1


def test_loader_that_changes_between_readings_is_refused() -> None:
    torch.manual_seed(3)
    shuffled = DataLoader(TensorDataset(X, Y), batch_size=5, shuffle=True)
    with pytest.raises(NTKError, match="shuffle=False"):
        empirical_ntk(_model(), shuffled, block_size=7)
