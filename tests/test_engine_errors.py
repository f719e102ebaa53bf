"""Bad input raises NTKError (a ValueError) whose message names the problem and the fix."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import pytest
import torch
from torch import nn

import models as M
import reference as R
from ntk_callback import NTKError, empirical_ntk, layerwise_ntk

Words = Union[str, Tuple[str, ...]]


def _assert_mentions(exc: BaseException, *groups: Words) -> None:
    """Every group must appear (case-insensitive); a tuple group means any one of its words."""
    msg = str(exc).lower()
    for group in groups:
        alts: Sequence[str] = (group,) if isinstance(group, str) else group
        assert any(a.lower() in msg for a in alts), f"message lacks any of {alts!r}:\n{exc}"


def _raises(*args, **kwargs) -> NTKError:  # type: ignore[no-untyped-def]
    with pytest.raises(NTKError) as info:
        empirical_ntk(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


def test_ntkerror_is_valueerror() -> None:
    assert issubclass(NTKError, ValueError)


def test_unknown_mode() -> None:
    case = M.build("mlp_relu")
    exc = _raises(case.model, case.inputs, case.targets, mode="diagonal")
    _assert_mentions(exc, "diagonal", "mode", "target", "trace", "sum", "full")
    with pytest.raises(NTKError):
        layerwise_ntk(case.model, case.inputs, case.targets, mode="diagonal")


def test_target_mode_without_targets_multi_output() -> None:
    case = M.build("mlp_relu")
    exc = _raises(case.model, case.inputs, None, mode="target")
    # problem: no targets for O = 3 outputs; fix: pass targets= or use another mode
    _assert_mentions(exc, "target", ("3", "output"), ("trace", "mode="))


def test_targets_wrong_length() -> None:
    case = M.build("mlp_relu")  # N = 6
    exc = _raises(case.model, case.inputs, case.targets[:4])
    _assert_mentions(exc, "target", "4", "6")


def test_targets2_wrong_length() -> None:
    case = M.build("mlp_relu")
    other = M.build("mlp_relu", seed=1)
    exc = _raises(case.model, case.inputs, case.targets, inputs2=other.inputs, targets2=other.targets[:2])
    _assert_mentions(exc, "targets2", "2", "6")


def test_targets_wrong_shape() -> None:
    case = M.build("mlp_relu")
    bad = torch.nn.functional.one_hot(case.targets, 3)  # (N, O) int: a common mistake
    exc = _raises(case.model, case.inputs, bad)
    _assert_mentions(exc, "target", ("shape", "1-d", "dim"), ("(6,)", "(n,)", "one-hot", "argmax", "1-d"))


def test_targets_float_for_multiclass() -> None:
    case = M.build("mlp_relu")
    exc = _raises(case.model, case.inputs, case.targets.float())
    _assert_mentions(exc, "target", ("float",), ("int64", "long", "integer"))


@pytest.mark.parametrize("bad_label", [-1, 3, 7])
def test_label_out_of_range(bad_label: int) -> None:
    case = M.build("mlp_relu")  # O = 3
    t = case.targets.clone()
    t[2] = bad_label
    exc = _raises(case.model, case.inputs, t)
    _assert_mentions(exc, ("label", "target"), str(bad_label), ("range", "[0", "0 <=", "0.."))
    _assert_mentions(exc, "3")  # the number of outputs O


class _NonFinite(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return torch.cat([out[:1] * self.value, out[1:]])  # only sample 0 is bad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["target", "trace", "full"])
def test_non_finite_outputs(value: float, mode: str) -> None:
    torch.manual_seed(0)
    exc = _raises(_NonFinite(value), torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), mode=mode)
    _assert_mentions(exc, ("finite", "nan", "inf"), ("output", "model"))


def test_no_trainable_parameters() -> None:
    case = M.build("mlp_relu")
    case.model.requires_grad_(False)
    exc = _raises(case.model, case.inputs, case.targets)
    _assert_mentions(exc, ("trainable", "requires_grad"), "requires_grad")
    assert not any(p.requires_grad for p in case.model.parameters()), "the engine must not unfreeze"


def test_model_without_parameters() -> None:
    exc = _raises(nn.Sequential(nn.ReLU()), torch.randn(3, 2), None, mode="trace")
    _assert_mentions(exc, ("trainable", "parameter"))


@pytest.mark.parametrize("name", ["mlp_relu", "embedding", "dict_batch", "tuple_batch"])
def test_empty_probe_batch(name: str) -> None:
    case = M.build(name)
    empty = R.take(case.inputs, slice(0, 0))
    exc = _raises(case.model, empty, case.targets[:0])
    _assert_mentions(exc, ("empty", "n = 0", "n=0", "no probe", "zero", "0 samples", "0 probes"), ("at least", "probe", "sample"))


def test_empty_second_probe_batch() -> None:
    case = M.build("mlp_relu")
    exc = _raises(case.model, case.inputs, case.targets, inputs2=case.inputs[:0], targets2=case.targets[:0])
    _assert_mentions(exc, ("empty", "n = 0", "n=0", "zero", "0 samples", "0 probes"))


def test_tuple_batch_mismatched_leading_dims() -> None:
    case = M.build("tuple_batch")
    xa, xb = case.inputs
    exc = _raises(case.model, (xa, xb[:4]), case.targets)
    _assert_mentions(exc, ("leading", "batch", "first dim", "dimension 0", "dim 0"), "6", "4")


def test_dict_batch_mismatched_leading_dims() -> None:
    case = M.build("dict_batch")
    bad = dict(case.inputs, mask=case.inputs["mask"][:3])
    exc = _raises(case.model, bad, case.targets)
    _assert_mentions(exc, ("leading", "batch", "first dim", "dimension 0", "dim 0"), "6", "3")


def test_bad_dtype_argument() -> None:
    case = M.build("mlp_relu")
    with pytest.raises((NTKError, TypeError)):
        empirical_ntk(case.model, case.inputs, case.targets, dtype=torch.int64)


def test_dict_output_without_output_fn() -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.lin(x)}

    exc = _raises(DictOut(), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    _assert_mentions(exc, "dict", "output_fn")


def test_output_leading_dim_not_n() -> None:
    """A model whose output does not have N rows (here it averages over the batch) cannot
    give a per-probe kernel; a silent answer would be wrong."""

    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).mean(0)  # (2,) for any N

    exc = _raises(BatchMean(), torch.randn(4, 3), None, mode="trace")
    _assert_mentions(exc, "output", ("shape", "(2,)"), "4")


class _Squeezing(nn.Module):
    """``.squeeze()`` in forward: right for batches of several probes, wrong for a batch
    of one (the output loses its probe dimension)."""

    def __init__(self, free_parameter: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5)) if free_parameter else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x).squeeze()
        return out * self.scale if self.scale is not None else out


@pytest.mark.parametrize("free_parameter, implementation", [(True, "auto"), (False, "generic")])
def test_single_probe_batches_checked_when_the_generic_path_runs(
        free_parameter: bool, implementation: str) -> None:
    """The generic path feeds the model one probe at a time; a model that squeezes the
    probe dimension away there is refused with the fix, not measured wrongly."""
    torch.manual_seed(0)
    exc = _raises(_Squeezing(free_parameter), torch.randn(5, 3), None, mode="trace",
                  implementation=implementation)
    _assert_mentions(exc, "1 of the 5 probes", "squeeze(-1)")


def test_squeezing_model_fully_structured_is_exact() -> None:
    """Without generic-path parameters the model never sees a one-probe batch: the kernel
    is computed, and equals the one of the model that keeps the dimension."""
    torch.manual_seed(0)
    model = _Squeezing(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    got = empirical_ntk(model.double(), x, mode="trace")
    ref = empirical_ntk(model.lin, x, mode="trace", implementation="generic")
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
