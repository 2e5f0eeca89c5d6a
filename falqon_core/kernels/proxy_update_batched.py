"""FALQON's row-wise proxy update for L layers of one shape at once: a few launches per step, not a few per layer.

A step of LLaMA-7B runs 224 proxy updates (7 linears x 32 blocks); one at a time that is ~5 launches each
(row norms, topk, merge kernel, zero B) and the host cost of issuing them. Layers of one shape keep their
tensors stacked (falqon_core.methods.falqon_groups makes the stacks):
  melded  L x (N + r_pad) x K fp8: layer l's melded matrix [W8; A8; zero rows] is melded[l]
  b       L x N x r fp32: layer l's trainable B is b[l]
and one update is: L1 norms of every row of every B (L x N) -> one topk per layer in one call (L x k rows) ->
ONE Triton launch merging all L x k rows (W8[l, rows] = sat_e4m3(W8[l, rows] + B[l, rows] @ A8[l])) -> B = 0.

Same arithmetic as the per-layer update (falqon_core.kernels.proxy_update): the same torch ops rank the rows
and the same kernel (_merge_rows_kernel, whose grid has a layer axis; the per-layer update runs it with L = 1)
merges them, so each layer's result is bit-identical to what the per-layer Triton path gives it. No host sync:
capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

from falqon_core.kernels import _triton_common as tc
# the merge kernel is the per-layer update's own, run over a layer axis (grid dimension 2)
from falqon_core.kernels.proxy_update import merge_rows_, proxy_update_reference_


def top_rows_by_l1_batched(b: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (L x k) of each layer's k rows of B (L x N x r) with the largest L1 norm, unsorted (torch.topk)."""
    return torch.topk(b.float().abs().sum(dim=2), k, dim=1, sorted=False).indices


def _check_batched(melded: torch.Tensor, b: torch.Tensor, k: int) -> None:
    shapes = f"melded {tuple(melded.shape)}, b {tuple(b.shape)}"
    if melded.dim() != 3 or b.dim() != 3:
        raise ValueError(f"the batched proxy update needs melded L x (N + r_pad) x K and b L x N x r; got {shapes}")
    n_layers, n_rows, _ = melded.shape
    if b.shape[0] != n_layers or b.shape[1] + b.shape[2] > n_rows:
        raise ValueError(f"melded must hold N + r rows per layer for b L x N x r; got {shapes}")
    if melded.dtype not in tc.FP8_DTYPES:
        raise ValueError(f"melded must be fp8, got {melded.dtype}")
    if not melded.is_contiguous():
        raise ValueError("melded must be contiguous (one stacked tensor; A8 rows follow W8 rows in each layer)")
    if not 0 <= k <= b.shape[1]:
        raise ValueError(f"k must be in [0, N={b.shape[1]}], got {k}")


@torch.no_grad()
def proxy_update_batched_reference_(melded: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """In place, per layer l: the per-layer reference update on W8 = melded[l, :N], A8 = melded[l, N:N+r], B = b[l].

    Returns rows (L x k): row i of the result holds the rows merged into layer i.
    """
    _check_batched(melded, b, k)
    n, r = b.shape[1], b.shape[2]
    rows = [proxy_update_reference_(melded[i, :n], melded[i, n : n + r], b[i], k) for i in range(melded.shape[0])]
    return torch.stack(rows) if rows else torch.empty((0, k), dtype=torch.int64, device=b.device)


@tc.opaque_to_compile
@torch.no_grad()
def proxy_update_batched_triton_(
    melded: torch.Tensor, b: torch.Tensor, k: int, *, software_round: bool | None = None
) -> torch.Tensor:
    """The Triton path of proxy_update_batched_reference_ (same contract): ranks, one merge launch, B = 0.

    software_round: round to the e4m3 grid with fp32 adds before the cast (None: only under the interpreter).
    """
    _check_batched(melded, b, k)
    rows = top_rows_by_l1_batched(b, k)
    n, r = b.shape[1], b.shape[2]
    merge_rows_(melded, melded[:, n : n + r], b, rows, software_round)  # A8 of layer l: the r rows after its W8
    b.zero_()
    return rows


def proxy_update_batched_(melded: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The Triton path on CUDA (a few launches for all L layers), the per-layer reference elsewhere."""
    if tc.triton_fp8_ok(melded):
        return proxy_update_batched_triton_(melded, b, k)
    return proxy_update_batched_reference_(melded, b, k)
