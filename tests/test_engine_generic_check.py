"""The generic (torch.func) path checks vmap's per-probe rows against plain autograd.

vmap runs torch's batching rules, and those are not exact for every op: in torch 2.13 a
PReLU's weight gradient under nested vmap comes back with the probes folded into it
(wrong shape, silently contracted into a 6 % error of the target kernel). The engine
checks the rows of the first block against one batched backward and recomputes them by
the per-probe autograd loop on a mismatch. References: the float64 per-sample loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_callback import empirical_ntk, layerwise_ntk
from ntk_callback.engine import generic
from reference import layerwise_loop, ntk_loop, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.act = nn.PReLU(8)
        self.bil = nn.Bilinear(8, 6, 4)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bil(self.act(self.a(x)), x))


class FreeScale(nn.Module):
    """Parameters no structured rule covers (a free elementwise scale), so the generic
    path computes them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.a(x) * self.scale))


def _case(model: nn.Module, n: int = 5) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))
    return model.eval(), x, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["target", "trace"])
def test_prelu_exact_in_every_mode(mode: str, dtype: torch.dtype) -> None:
    model, x, y = _case(PReLUNet())
    t = y if mode == "target" else None
    ref = ntk_loop(model, x, t, mode)
    k, why = empirical_ntk(model, x, t, mode=mode, dtype=dtype, explain=True)
    assert rel_err(k.double(), ref) <= TOL[dtype]
    layers = layerwise_ntk(model, x, t, mode=mode, dtype=dtype)
    ref_layers = layerwise_loop(model, x, t, mode)
    for key, kernel in layers.items():
        assert rel_err(kernel.double(), ref_layers[key]) <= TOL[dtype], key
    assert why.paths["act.weight"].startswith("generic")


def test_prelu_target_takes_the_loop_with_a_reason() -> None:
    model, x, y = _case(PReLUNet())
    _, why = empirical_ntk(model, x, y, dtype=torch.float64, explain=True)
    assert why.paths["act.weight"] == "generic: loop"
    assert "self-check" in why.reasons["act.weight"]
    # the structured layers stay structured
    assert why.paths["a.weight"].startswith("structured")


def _planted(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """A vmap path that scales the rows of the parameter `scale` (a wrong batching rule)."""
    original = generic._rows

    def wrong(problem, names, x, cot, chunk, name="inputs"):  # type: ignore[no-untyped-def]
        rows = original(problem, names, x, cot, chunk, name)
        if "scale" in names:
            col = 0
            for n in names:
                size = problem.params[n].numel()
                if n == "scale":
                    rows = rows.clone()
                    rows[..., col:col + size] *= factor
                col += size
        return rows

    monkeypatch.setitem(generic.ROWS, "vmap", wrong)


@pytest.mark.parametrize("mode", ["target", "trace"])
def test_planted_wrong_vmap_rows_are_caught(monkeypatch: pytest.MonkeyPatch,
                                            mode: str) -> None:
    model, x, y = _case(FreeScale())
    t = y if mode == "target" else None
    ref = ntk_loop(model, x, t, mode)
    _planted(monkeypatch, 1.001)
    unchecked = empirical_ntk(model, x, t, mode=mode, dtype=torch.float64, self_check=False)
    assert rel_err(unchecked, ref) > 1e-5  # the planted error is visible without the check
    k, why = empirical_ntk(model, x, t, mode=mode, dtype=torch.float64, explain=True)
    assert rel_err(k, ref) <= 1e-10
    assert why.paths["scale"] == "generic: loop"
    assert "self-check" in why.reasons["scale"]


def test_correct_vmap_rows_stay_on_vmap() -> None:
    model, x, y = _case(FreeScale())
    _, why = empirical_ntk(model, x, y, dtype=torch.float32, explain=True)
    assert why.paths["scale"] == "generic: vmap"
    assert "scale" not in why.reasons


class BatchCentred(nn.Module):
    """Outputs centred over the batch: per-probe calls (the kernel's definition) and a
    batched call differ, so the batched check cannot confirm vmap's rows; the loop,
    which calls the model one probe at a time, gives the defined kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) * self.scale
        return self.c(h - 0.5 * h.mean(0, keepdim=True))


def test_batch_mixing_model_matches_the_per_probe_reference() -> None:
    model, x, y = _case(BatchCentred())
    ref = ntk_loop(model, x, y, "target")
    k = empirical_ntk(model, x, y, dtype=torch.float64)
    assert rel_err(k, ref) <= 1e-10


class SharedUnderTwoNames(nn.Module):
    """One Linear registered as ``enc`` and ``dec`` plus an embedding tied to the head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.enc = nn.Linear(6, 6)
        self.dec = self.enc
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(self.emb(ids).mean(1)))
        return self.head(torch.sin(self.dec(h)))


@pytest.mark.parametrize("implementation", ["generic", "auto"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_shared_module_keeps_its_parameters(implementation: str,
                                            dtype: torch.dtype | None) -> None:
    """torch.func's tie handling used to leave a plain tensor shadowing ``enc.weight``
    after the generic path (the model then trained a frozen copy) and the autograd check
    then disagreed with vmap."""
    torch.manual_seed(0)
    model = SharedUnderTwoNames().eval()
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 7, (5,), generator=torch.Generator().manual_seed(2))
    slots = {(id(m), a): p for m in model.modules() for a, p in m._parameters.items()}
    ref = ntk_loop(model, ids, y, "target")
    k = empirical_ntk(model, ids, y, dtype=dtype, implementation=implementation)
    assert rel_err(k.double(), ref) <= TOL[dtype or torch.float32]
    for m in model.modules():
        for attr, p in m._parameters.items():
            assert p is slots[(id(m), attr)]
            assert getattr(m, attr) is p, f"{type(m).__name__}.{attr} is shadowed"
    # and the model still trains its real parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model(ids).detach()
    model(ids)[:, 0].sum().backward()
    assert model.enc.weight.grad is not None and model.enc.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model(ids).detach(), before)
