"""The matrix-free spectrum on architectures whose ops lack forward-mode AD.

``nn.TransformerEncoderLayer`` in eval mode runs a fused kernel without forward AD, and the
fused attention kernels have no double backward: the Lanczos products then use the
transposed vjp under the math attention kernel. Reference: dense float64 kernel from the
per-sample loop, eigenvalues by ``torch.linalg.eigvalsh``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_callback import ntk_spectrum
from reference import ntk_loop


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)).mean(1))


@pytest.mark.parametrize("mode", ["target", "trace"])
def test_encoder_spectrum_matches_dense(mode: str) -> None:
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    t = y if mode == "target" else None
    dense = torch.linalg.eigvalsh(ntk_loop(model, ids, t, mode)).flip(0)[:3]
    top = torch.as_tensor(ntk_spectrum(model, ids, t, k=3, mode=mode, dtype=torch.float64,
                                       route="matfree"))
    assert torch.allclose(top, dense, rtol=1e-8, atol=1e-10 * float(dense[0]))
