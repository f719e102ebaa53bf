r"""The kernel of an embedding table from the tokens the probes share.

An embedding's per-probe gradient with cotangent rows ``D_ris`` (k, n, S, o) and tokens
``T_is`` is ``D_ris`` scattered into row ``T_is`` of the (V, o) table, so

    K[i, j] = sum_r sum_{s,t : T_is = T_jt} D_ris . D_rjt
            = sum_v sum_r <G_riv, G_rjv>,    G_riv = sum_{s : T_is = v} D_ris.

Only pairs of probes that use the same token meet. The dense Gram route multiplies every
(probe, position) pair, ``(n S)^2 k o`` flops, and the rows route the whole (V, o) table
a probe pair; here the per-probe sums ``G`` (one a probe and distinct token) are grouped
by token and each group's Gram ``G_v G_v^T`` (c_v probes) is scattered into the kernel:
``sum_v c_v^2 k o`` flops -- for a 1,024-token vocabulary over 64 probes of 32 tokens,
~10^4 probe pairs instead of ~4 * 10^6 position pairs. Groups are batched by size,
padded to the next power of two, so a token every probe uses (a [CLS] or padding token,
a position) costs one batched product like the rest.

Self-kernels of modes of same-index row pairs (target, trace, sum); the driver uses the
Gram route for the others.
"""
from __future__ import annotations

import torch

from .terms import TokenTerm


def add_token_kernel(out: torch.Tensor, term: TokenTerm, budget: int) -> None:
    """``out +=`` the (n, n) self-kernel of ``term``, exact on and above the diagonal
    (below it too: the scatter writes both triangles), with ``budget`` bytes of
    temporaries at most a batch of groups."""
    k, n, s, o = term.d.shape
    vocab = term.vocab
    device = out.device
    ids = term.inputs.reshape(n, s).to(device)
    key = (torch.arange(n, device=device).unsqueeze(1) * vocab + ids).reshape(-1)
    d = term.d.permute(1, 2, 0, 3).reshape(n * s, k * o)
    uniq, inverse = torch.unique(key, return_inverse=True)
    sums = d.new_zeros(uniq.shape[0], k * o).index_add_(0, inverse, d)
    token = uniq % vocab
    order = torch.argsort(token, stable=True)
    sums, probe = sums[order], (uniq // vocab)[order]
    _, counts = torch.unique_consecutive(token[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # a group of c probes goes to the bucket of size 2^ceil(log2 c)
    bucket = torch.ceil(torch.log2(counts.to(torch.float64))).long()
    itemsize = out.element_size()
    for b in torch.unique(bucket).tolist():
        width = 1 << int(b)
        groups = (bucket == b).nonzero().squeeze(1)
        step = max(1, budget // max(1, (width * width + 2 * width * k * o) * itemsize))
        lane = torch.arange(width, device=device)
        for g0 in range(0, groups.shape[0], step):
            chunk = groups[g0:g0 + step]
            valid = lane.unsqueeze(0) < counts[chunk].unsqueeze(1)          # (G, w)
            idx = torch.where(valid, starts[chunk].unsqueeze(1) + lane, 0)
            x = sums[idx] * valid.unsqueeze(-1).to(sums.dtype)              # (G, w, k o)
            gram = torch.bmm(x, x.transpose(1, 2))                          # (G, w, w)
            who = probe[idx]
            pair = valid.unsqueeze(2) & valid.unsqueeze(1)
            rows = who.unsqueeze(2).expand(-1, width, width)[pair]
            cols = who.unsqueeze(1).expand(-1, width, width)[pair]
            out.index_put_((rows, cols), gram[pair], accumulate=True)


__all__ = ["add_token_kernel"]
