"""Small LightningModules and the Lightning-flavour fixture for the callback tests.

The models are deliberately unlike ``examples/blobs.py`` (an MLP on Gaussian blobs):

* ``BNCNN``: a 2-conv CNN with BatchNorm and Dropout on random 8x8 one-channel
  images, 3 classes, Adam (exercises buffers, RNG-consuming layers, optimizer state);
* ``Regressor``: an MLP with an ``(N, 1)`` output trained with MSE on float targets;
* ``DictBatchNet``: a classifier whose batches are dicts with an extra field, so the
  callback needs ``batch_to_probe``;
* ``NaNAfterEpoch``: a classifier whose eval-mode output becomes NaN from a given epoch
  on (training itself stays finite), to test fault handling;
* ``DictOutputNet``: returns a dict of tensors, which the NTK engine cannot handle
  without an ``output_fn``.

Every model exists once per installed Lightning flavour (``pytorch_lightning`` and
``lightning.pytorch``): :func:`model_class` builds the class on the flavour's
``LightningModule`` and registers it under a module-level name so that it pickles
(``ddp_spawn`` sends the module to its workers by pickling).

Each model records what the test needs to compare two runs bit for bit:
``batch_checksums`` (float64 sum and first index of every training batch, in order)
and ``train_losses`` (the exact loss tensors' values).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

FLAVOURS: Tuple[str, ...] = ("pytorch_lightning", "lightning.pytorch")


@dataclass(frozen=True)
class Flavour:
    """One Lightning flavour: the pieces a test needs, all from the same package."""

    name: str  # "pytorch_lightning" or "lightning.pytorch"
    pl: ModuleType  # the top-level flavour module
    Trainer: type
    LightningModule: type
    Callback: type
    loggers: ModuleType
    callbacks: ModuleType
    seed_everything: Callable[..., int]
    MisconfigurationException: type

    @property
    def short(self) -> str:
        return "pl" if self.name == "pytorch_lightning" else "lightning"


def load_flavour(name: str) -> Flavour:
    """Import one flavour; ``pytest.skip`` when it is not installed."""
    try:
        pl = importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.skip(f"{name} is not installed")
    exc_mod = importlib.import_module(
        "lightning_fabric.utilities.exceptions"
        if name == "pytorch_lightning"
        else "lightning.fabric.utilities.exceptions"
    )
    return Flavour(
        name=name,
        pl=pl,
        Trainer=pl.Trainer,
        LightningModule=pl.LightningModule,
        Callback=pl.Callback,
        loggers=importlib.import_module(f"{name}.loggers"),
        callbacks=importlib.import_module(f"{name}.callbacks"),
        seed_everything=pl.seed_everything,
        MisconfigurationException=exc_mod.MisconfigurationException,
    )


@pytest.fixture(params=FLAVOURS, ids=["pytorch_lightning", "lightning"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """Parametrises a test over both Lightning flavours."""
    return load_flavour(request.param)


def quiet_trainer_kwargs(**overrides: Any) -> Dict[str, Any]:
    """Trainer kwargs for fast, deterministic CPU tests; ``overrides`` win."""
    kw: Dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        logger=False,
    )
    kw.update(overrides)
    return kw


# ----------------------------------------------------------------------------- data


def image_data(n: int = 96, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random 8x8 one-channel images ``(n, 1, 8, 8)`` and int64 labels in {0, 1, 2}.

    The label is the arg-max of three fixed random projections, so it is learnable.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    w = torch.randn(3, 64, generator=g)
    y = (x.flatten(1) @ w.T).argmax(dim=1)
    return x, y


def regression_data(n: int = 80, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, 5)`` and float targets ``(n, 1)``: a smooth nonlinear function."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.sin(x[:, :1] * 1.5) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y


class DictDataset(Dataset):
    """Items are dicts: ``signal`` (D,), ``cls`` (int64), ``weight`` (float).

    The key names are deliberately not ones a generic batch mapper would guess
    (``x``/``features``/``label``...), so the callback needs ``batch_to_probe``.
    """

    def __init__(self, n: int = 72, seed: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()
        self.w = torch.rand(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"signal": self.x[i], "cls": self.y[i], "weight": self.w[i]}


def dict_batch_to_probe(batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``batch_to_probe`` for :class:`DictDataset` batches."""
    return batch["signal"], batch["cls"]


def indexed(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """``(x, y, index)`` items: the index lets a test record the exact batch order."""
    return TensorDataset(x, y, torch.arange(len(x)))


# --------------------------------------------------------------------------- models


class _Recorder:
    """Mixin: records batch checksums and losses of every training step."""

    def _init_records(self) -> None:
        self.batch_checksums: List[Tuple[float, int]] = []
        self.train_losses: List[float] = []

    def _record(self, x: torch.Tensor, first_index: int, loss: torch.Tensor) -> None:
        self.batch_checksums.append((float(x.double().sum()), first_index))
        self.train_losses.append(float(loss.detach()))


class _BNCNNLogic(_Recorder):
    """Conv(1->6) - BN - ReLU - Dropout2d - Conv(6->6, stride 2) - BN - ReLU - Dropout
    - Linear(96 -> 3). Batches are ``(x, y, index)`` or ``(x, y)``."""

    def __init__(self, lr: float = 0.02, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(6, 6, 3, stride=2, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(6 * 4 * 4, 3),
        )
        self.lr = lr
        self._init_records()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self._record(x, int(batch[2][0]) if len(batch) > 2 else -1, loss)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return [opt], [sched]


class _RegressorLogic(_Recorder):
    """MLP 5-16-16-1 (Tanh) with an ``(N, 1)`` output, MSE loss, SGD with momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
        )
        self.lr = lr
        self._init_records()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = nn.functional.mse_loss(self(x), y)
        self._record(x, int(batch[2][0]) if len(batch) > 2 else -1, loss)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _DictBatchLogic(_Recorder):
    """MLP 6-12-3 on dict batches; the loss is weighted by the batch's ``weight`` field."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        self.lr = lr
        self._init_records()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        per = nn.functional.cross_entropy(self(batch["signal"]), batch["cls"], reduction="none")
        loss = (per * batch["weight"]).mean()
        self._record(batch["signal"], -1, loss)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _NaNAfterEpochLogic(_Recorder):
    """MLP on images whose *eval-mode* output is multiplied by NaN from ``nan_epoch`` on.

    Training (train mode) stays finite, so the run itself is healthy; the kernel, which
    the callback measures in eval mode, is NaN from that epoch on. The multiplication
    (not an addition) makes the Jacobian NaN too, not only the output.
    """

    def __init__(self, nan_epoch: int = 1, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
        self.nan_epoch = nan_epoch
        self.lr = lr
        self.poisoned = False
        self._init_records()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.poisoned and not self.training:
            out = out * float("nan")
        return out

    def on_train_epoch_start(self) -> None:
        self.poisoned = self.current_epoch >= self.nan_epoch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self._record(x, -1, loss)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _DictOutputLogic(_Recorder):
    """``forward`` returns ``{"logits": (N, 3), "hidden": (N, 8)}`` (a HuggingFace-style
    output): not a tensor, so the NTK engine refuses it unless an ``output_fn`` picks
    the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self._init_records()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        hidden = self.body(x)
        return {"logits": self.head(hidden), "hidden": hidden}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x)["logits"], y)
        self._record(x, -1, loss)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def logits_of(output: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``output_fn`` for :class:`DictOutputNet`."""
    return output["logits"]


_LOGIC: Dict[str, type] = {
    "BNCNN": _BNCNNLogic,
    "Regressor": _RegressorLogic,
    "DictBatchNet": _DictBatchLogic,
    "NaNAfterEpoch": _NaNAfterEpochLogic,
    "DictOutputNet": _DictOutputLogic,
}
_CLASSES: Dict[Tuple[str, str], type] = {}


def model_class(flavour: "Flavour | str", kind: str) -> type:
    """The ``kind`` model built on ``flavour``'s ``LightningModule``.

    The class is registered at module level as ``{kind}_{pl|lightning}`` (so pickling
    by qualified name works, e.g. for ``ddp_spawn``).
    """
    fl = flavour if isinstance(flavour, Flavour) else load_flavour(flavour)
    key = (fl.name, kind)
    if key not in _CLASSES:
        name = f"{kind}_{fl.short}"
        cls = type(name, (_LOGIC[kind], fl.LightningModule), {"__module__": __name__})
        cls.__qualname__ = name
        globals()[name] = cls
        _CLASSES[key] = cls
    return _CLASSES[key]


def __getattr__(name: str) -> Any:
    # Unpickling in a fresh (spawned) process looks the class up by name before anyone
    # called model_class there: build it on demand.
    for kind in _LOGIC:
        for fl_name, short in (("pytorch_lightning", "pl"), ("lightning.pytorch", "lightning")):
            if name == f"{kind}_{short}":
                return model_class(fl_name, kind)
    raise AttributeError(name)


def make_model(flavour: Flavour, kind: str, seed: int = 0, **kwargs: Any) -> Any:
    """A freshly initialised ``kind`` model; the global seed is set first so two calls
    give identical weights."""
    flavour.seed_everything(seed, workers=True, verbose=False)
    return model_class(flavour, kind)(**kwargs)


def loaders(
    kind: str, batch_size: int = 16, shuffle: bool = True
) -> Tuple[DataLoader, Optional[DataLoader]]:
    """Train (shuffled, global-RNG driven) and validation loaders for ``kind``."""
    if kind in ("BNCNN", "NaNAfterEpoch", "DictOutputNet"):
        x, y = image_data()
        train = DataLoader(indexed(x[:80], y[:80]), batch_size=batch_size, shuffle=shuffle)
        val = DataLoader(TensorDataset(x[80:], y[80:]), batch_size=batch_size)
        return train, val
    if kind == "Regressor":
        x, y = regression_data()
        return DataLoader(indexed(x, y), batch_size=batch_size, shuffle=shuffle), None
    if kind == "DictBatchNet":
        return DataLoader(DictDataset(), batch_size=batch_size, shuffle=shuffle), None
    raise KeyError(kind)
