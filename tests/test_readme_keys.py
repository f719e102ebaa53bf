"""The README's key table lists exactly the keys the callback logs, in both directions.

Two real fits: a classifier (target mode, per-layer breakdown) and a regressor with the
training dynamics and held-out probes on. Every ``ntk/...`` scalar they log must be in
the table of README.md ("What gets logged"), and every key of the table must be logged
by one of them; per-layer keys are compared with the layer name replaced by ``<layer>``.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch
from lightning_models import load_flavour, quiet_trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_keys() -> set[str]:
    """The backticked ``ntk/...`` names in the first column of the README's key table."""
    text = open(README, encoding="utf-8").read()
    section = text.split("## What gets logged", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `ntk/"):
            first = line.split("|")[1]
            keys.update(re.findall(r"`(ntk/[^`]+)`", first))
    return keys


def _logged(history: Any) -> set[str]:
    keys: set[str] = set()
    for record in history:
        for key in record["metrics"]:
            key = re.sub(r"^(layer_share|layer_drift)/.*$", r"\1/<layer>", key)
            keys.add("ntk/" + key)
    return keys


def _module(fl: Any, net: nn.Module, loss: Any, lr: float) -> Any:
    class Module(fl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Module()


def test_readme_key_table_matches_the_logged_keys() -> None:
    from ntk_callback import NTKReportCallback

    fl = load_flavour("pytorch_lightning")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    logged: set[str] = set()

    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    clf = _module(fl, nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), nn.functional.cross_entropy, 0.1)
    cb = NTKReportCallback(num_probes=12, console="off", log_images=False)
    fl.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs()).fit(clf, DataLoader(TensorDataset(x, y), batch_size=16))
    logged |= _logged(cb.history)

    xr = torch.randn(64, 2, generator=g)
    yr = torch.sin(xr[:, :1])
    reg = _module(fl, nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)), nn.functional.mse_loss, 0.1)
    cbr = NTKReportCallback(num_probes=16, num_heldout=8, console="off", log_images=False)
    loader = DataLoader(TensorDataset(xr, yr), batch_size=16)
    fl.Trainer(max_epochs=2, callbacks=[cbr], **quiet_trainer_kwargs()).fit(reg, loader, loader)
    assert cbr.dynamics_active
    logged |= _logged(cbr.history)

    documented = readme_keys()
    assert len(documented) > 20, documented
    assert not logged - documented, f"logged but not in the README key table: {sorted(logged - documented)}"
    assert not documented - logged, f"in the README key table but never logged: {sorted(documented - logged)}"
