"""Hugging Face style batches: a dict of keyword inputs with a ``labels`` entry.

The callback takes the ``labels`` tensor as the targets and the other entries as the
model's keyword inputs, without a ``batch_to_probe``. Reference: the kernel the engine
gives on the same probes, and the float64 per-sample loop."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ntk_callback import NTKReportCallback, empirical_ntk
from ntk_callback._probes import default_batch_to_probe
from reference import ntk_loop, rel_err


class _Tokens(Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 20, (n, 6), generator=g)
        self.mask = (torch.rand(n, 6, generator=g) > 0.2).long()
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(torch.tanh(h.sum(1)))

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(out, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_default_batch_to_probe_splits_labels_from_keyword_inputs() -> None:
    batch = {"input_ids": torch.ones(4, 6, dtype=torch.long),
             "attention_mask": torch.ones(4, 6, dtype=torch.long), "labels": torch.arange(4)}
    inputs, targets = default_batch_to_probe(batch)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(targets, torch.arange(4))
    with pytest.raises(ValueError, match="batch_to_probe"):  # no target key: ambiguous
        default_batch_to_probe({"input_ids": batch["input_ids"]})


def test_callback_reports_on_dict_batches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pl.seed_everything(0)
    model = _Classifier()
    cb = NTKReportCallback(num_probes=8, console="off", log_figures=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(_Tokens(), batch_size=16))
    assert len(cb.history) >= 2
    inputs, targets = cb.probes
    assert set(inputs) == {"input_ids", "attention_mask"} and targets is not None
    # the last report's kernel is the engine's kernel of the final weights on those probes
    ref = ntk_loop(model, inputs, targets, "target")
    ours = empirical_ntk(model, inputs, targets, dtype=torch.float64)
    assert rel_err(ours, ref) <= 1e-10
    last = cb.monitor.last_kernel
    assert last is not None and rel_err(last.double(), ref) <= 2e-5
