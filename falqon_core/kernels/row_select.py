"""The default proxy update's row choice in two launches: the L1 norms of B's rows, then a rank select that also
moves the chosen rows of B out and zeroes B.

Why: the update ran five launches, torch's abs and sum for the norms, the select (falqon_core.kernels.topk), the
merge and B.zero_(): on an H200 (llama-7b attn, 2048 tokens) ~4.5 us of norms in two launches and 1 us of zeroing,
plus a gap between each pair of launches, in a step of ~184 us (docs/perf-notes.md, "What is left to 85%").
  norms    one Triton launch: |B| summed along each row in fp32 (row_l1_triton)
  select   the rank select's ranks (topk._ranks); the program that ranks entry i also copies B's row i to
           b_rows[rank_i] when rank_i < k and zeroes B's row i. Each row of B belongs to one program, so the copy
           and the zeroing never race; the merge then reads the compact k x r copy, not B.
B.zero_() is gone, and the merge kernel reads k contiguous rows instead of gathering them. Measured (H200, update alone,
CUDA-graph replay, side by side): ~1 us less at N <= 4096 (11.7 -> 10.6 us at N 4096, r 16), 0.4 at N 11008
(results/shapes-h200-rowselect/update-fused.txt): less than the profiled kernel times of the removed launches.

Numerics: the norms' fp32 sums run in another order than torch's sum, so they can differ in the last bits; the
selected set differs from the reference's only where the k-th and (k+1)-th norms lie within that difference
(tests/test_row_select.py bounds it against fp64). With entries whose sums are exact in fp32 (the exactness tests'
inputs) the norms, and so the sets, are identical. Rows come out by norm, largest first (ties: lower index first),
NaN above everything, as the rank select gives them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels.topk import _RANK_BLOCK_I, _RANK_BLOCK_J, _ranks

_NORM_BLOCK_ROWS = 64  # rows of B per program of the norms (N / 64 programs: 64 at N = 4096)
_MAX_BLOCK_RANK = 64  # ranks per load; larger ranks loop


def _block_rank(rank: int) -> int:
    return min(triton.next_power_of_2(max(rank, 1)), _MAX_BLOCK_RANK)


def row_l1_reference(b: torch.Tensor) -> torch.Tensor:
    """The L1 norm of each row of B (N x r) in fp32, torch's ops (what the reference update ranks by)."""
    return b.float().abs().sum(dim=1)


@triton.jit
def _row_l1_kernel(b_ptr, norms_ptr, n_rows, rank, stride_b, stride_b_col,
                   BLOCK_ROWS: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """norms[rows] = sum_j |B[rows, j]| in fp32 for this program's BLOCK_ROWS rows."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r_mask = rows < n_rows
    acc = tl.zeros([BLOCK_ROWS, BLOCK_RANK], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_RANK):
        j = j0 + tl.arange(0, BLOCK_RANK)
        mask = r_mask[:, None] & (j < rank)[None, :]
        x = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_b + j[None, :] * stride_b_col, mask=mask, other=0.0)
        acc += tl.abs(x.to(tl.float32))
    tl.store(norms_ptr + rows, tl.sum(acc, axis=1), mask=r_mask)


@tc.opaque_to_compile
def row_l1_triton(b: torch.Tensor) -> torch.Tensor:
    """row_l1_reference in one Triton launch (any strides of B; fp32 sums in another order: module docstring)."""
    _check_b(b)
    n_rows, rank = b.shape
    norms = torch.empty(n_rows, device=b.device, dtype=torch.float32)
    if n_rows == 0:
        return norms
    if rank == 0:
        return norms.zero_()
    _row_l1_kernel[(triton.cdiv(n_rows, _NORM_BLOCK_ROWS),)](
        b, norms, n_rows, rank, b.stride(0), b.stride(1), BLOCK_ROWS=_NORM_BLOCK_ROWS, BLOCK_RANK=_block_rank(rank),
        num_warps=4,
    )
    return norms


def row_l1(b: torch.Tensor) -> torch.Tensor:
    """Row L1 norms of B: one Triton launch on CUDA, torch's ops elsewhere."""
    if b.is_cuda and not tc.is_interpreter():
        return row_l1_triton(b)
    return row_l1_reference(b)


@torch.no_grad()
def take_top_rows_reference_(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, b_rows): the k rows of B with the largest L1 norm, largest first (ties: lower index first; NaN
    first), and a copy of those rows of B (k x r, B's dtype); then B = 0 in place."""
    _check_b(b, k)
    rows = torch.sort(row_l1_reference(b), descending=True, stable=True).indices[:k]
    b_rows = b.index_select(0, rows)
    b.zero_()
    return rows, b_rows


@triton.jit
def _rank_take_kernel(values_ptr, rows_ptr, b_ptr, b_rows_ptr, n, k, rank, stride_b, stride_b_col,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """For this program's BLOCK_I entries i (rank_i from _ranks): rows[rank_i] = i and b_rows[rank_i, :] = B[i, :]
    where rank_i < k; B[i, :] = 0 for every i (each row of B is read and zeroed by this program only)."""
    i, i_mask, r_i = _ranks(values_ptr, n, tl.program_id(0), BLOCK_I, BLOCK_J)
    take = i_mask & (r_i < k)
    tl.store(rows_ptr + r_i, i.to(tl.int64), mask=take)
    b_i = b_ptr + i.to(tl.int64)[:, None] * stride_b
    out_i = b_rows_ptr + r_i.to(tl.int64)[:, None] * rank
    for j0 in range(0, rank, BLOCK_RANK):
        j = j0 + tl.arange(0, BLOCK_RANK)
        j_mask = (j < rank)[None, :]
        x = tl.load(b_i + j[None, :] * stride_b_col, mask=i_mask[:, None] & j_mask, other=0.0)
        tl.store(out_i + j[None, :], x, mask=take[:, None] & j_mask)
        tl.store(b_i + j[None, :] * stride_b_col, tl.zeros_like(x), mask=i_mask[:, None] & j_mask)


@tc.opaque_to_compile
@torch.no_grad()
def take_top_rows_triton_(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """take_top_rows_reference_ in two launches (norms, then the rank select that copies and zeroes). The rank
    select does N^2 compares: callers use it up to topk.MAX_RANK_LENGTH rows. No host sync."""
    _check_b(b, k)
    n, rank = b.shape
    rows = torch.empty(k, device=b.device, dtype=torch.int64)
    b_rows = torch.empty((k, rank), device=b.device, dtype=b.dtype)
    if n == 0 or rank == 0:
        return rows.copy_(torch.arange(k, device=b.device)), b_rows  # all norms 0: the first k rows
    norms = row_l1_triton(b)
    _rank_take_kernel[(triton.cdiv(n, _RANK_BLOCK_I),)](
        norms, rows, b, b_rows, n, k, rank, b.stride(0), b.stride(1),
        BLOCK_I=_RANK_BLOCK_I, BLOCK_J=_RANK_BLOCK_J, BLOCK_RANK=_block_rank(rank), num_warps=4,
    )
    return rows, b_rows


def _check_b(b: torch.Tensor, k: int | None = None) -> None:
    if b.dim() != 2 or not b.dtype.is_floating_point:
        raise ValueError(f"B must be a 2-D float tensor (N x r), got shape {tuple(b.shape)} {b.dtype}")
    if k is not None and not 0 <= k <= b.shape[0]:
        raise ValueError(f"k must be in [0, N={b.shape[0]}], got {k}")
