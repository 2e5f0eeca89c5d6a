"""The default proxy update's row choice in two launches: the L1 norms of B's rows, then a rank select that also
moves the chosen rows of B out and zeroes B.

Why: the update ran five launches, torch's abs and sum for the norms, the select (falqon_core.kernels.topk), the
merge and B.zero_(): on an H200 (llama-7b attn, 2048 tokens) ~4.5 us of norms in two launches and 1 us of zeroing,
plus a gap between each pair of launches, in a step of ~184 us (docs/perf-notes.md, "What is left to 85%").
  norms    one Triton launch: |B| summed along each row in fp32 (row_l1_triton)
  select   the rank select's ranks (topk._ranks); the program that ranks entry i also copies B's row i to
           b_rows[rank_i] when rank_i < k and zeroes B's row i. Each row of B belongs to one program, so the copy
           and the zeroing never race; the merge then reads the compact k x r copy, not B.
  chunked  the same in two launches when N is large (chunked_select_wins, measured): rank each row only within
           its chunk of _CHUNK rows, keep the k best of each chunk as candidates (key, row index, copy of the B
           row; B zeroed), then rank the candidates. N x _CHUNK + (N / _CHUNK x k)^2 compares instead of N^2:
           the one-launch select spent 29 us at N = 11008 (llama-7b up) and its N^2 kept N > 12288 on the
           bisect select (39 us) and torch's B.zero_(). The global k best are among each chunk's k best, and the
           candidates' slots are in row order wherever two keys tie (chunks in row order, a chunk's ties by
           lower row), so the second rank gives the same rows in the same order.
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
from falqon_core.kernels.topk import _RANK_BLOCK_I, _RANK_BLOCK_J, _order_key, _ranks

_NORM_BLOCK_ROWS = 64  # rows of B per program of the norms (N / 64 programs: 64 at N = 4096)
# the chunked select's chunk: entries ranked against each other in its first launch (a multiple of _RANK_BLOCK_J)
_CHUNK = _RANK_BLOCK_J
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
    _copy_rows(b_ptr + i.to(tl.int64) * stride_b, stride_b_col, b_rows_ptr + r_i.to(tl.int64) * rank, i_mask, take,
               rank, True, BLOCK_RANK)


@triton.jit
def _copy_rows(src_rows_ptr, src_stride_col, dst_rows_ptr, load_mask, store_mask, rank,
               ZERO_SRC: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """dst[row, :] = src[row, :] (dst contiguous) for the rows of store_mask (src_rows_ptr, dst_rows_ptr: one pointer
    per row, to its first entry); ZERO_SRC: then src[row, :] = 0 for the rows of load_mask."""
    for j0 in range(0, rank, BLOCK_RANK):
        j = j0 + tl.arange(0, BLOCK_RANK)
        j_mask = (j < rank)[None, :]
        x = tl.load(src_rows_ptr[:, None] + j[None, :] * src_stride_col, mask=load_mask[:, None] & j_mask, other=0.0)
        tl.store(dst_rows_ptr[:, None] + j[None, :], x, mask=store_mask[:, None] & j_mask)
        if ZERO_SRC:
            tl.store(src_rows_ptr[:, None] + j[None, :] * src_stride_col, tl.zeros_like(x),
                     mask=load_mask[:, None] & j_mask)


@triton.jit
def _chunk_take_kernel(values_ptr, cand_key_ptr, cand_row_ptr, cand_b_ptr, b_ptr, n, k, rank, stride_b, stride_b_col,
                       CHUNK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """The chunked select's first launch: rank this program's BLOCK_I entries within their CHUNK; one of local rank
    r < k becomes candidate slot chunk * k + r (its order key, its index, its row of B); every row of B is zeroed."""
    PER_CHUNK: tl.constexpr = CHUNK // BLOCK_I
    pid = tl.program_id(0)
    c = pid // PER_CHUNK
    start = c * CHUNK
    i_loc, i_mask, r = _ranks(values_ptr + start, tl.minimum(n - start, CHUNK), pid - c * PER_CHUNK, BLOCK_I, BLOCK_J)
    i = start + i_loc
    take = i_mask & (r < k)
    slot = (c * k + r).to(tl.int64)
    tl.store(cand_key_ptr + slot, _order_key(tl.load(values_ptr + i, mask=i_mask, other=0.0)), mask=take)
    tl.store(cand_row_ptr + slot, i.to(tl.int64), mask=take)
    _copy_rows(b_ptr + i.to(tl.int64) * stride_b, stride_b_col, cand_b_ptr + slot * rank, i_mask, take, rank, True,
               BLOCK_RANK)


@triton.jit
def _candidate_take_kernel(cand_key_ptr, cand_row_ptr, cand_b_ptr, rows_ptr, b_rows_ptr, n_slots, k, n, rank,
                           CHUNK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                           BLOCK_RANK: tl.constexpr):
    """The chunked select's second launch: rank the candidate slots (unused ones below every key; ties between two
    candidates fall to the lower slot, which is the lower row: chunks are in row order and a chunk's ties in row
    order); the k first become rows[rank] and b_rows[rank, :]."""
    s, s_mask, r = _ranks(cand_key_ptr, n_slots, tl.program_id(0), BLOCK_I, BLOCK_J, True, k, n, CHUNK)
    take = s_mask & (r < k)
    tl.store(rows_ptr + r, tl.load(cand_row_ptr + s, mask=take, other=0), mask=take)
    _copy_rows(cand_b_ptr + s.to(tl.int64) * rank, 1, b_rows_ptr + r.to(tl.int64) * rank, take, take, rank, False,
               BLOCK_RANK)


def chunked_select_wins(n: int, k: int) -> bool:
    """The chunked select (two launches: ranks within chunks of _CHUNK rows, then among the k best of each chunk)
    where it was faster than the one-launch rank select on the H200 (norms + select, CUDA-graph replay,
    results/probes-topk-h200/select-chunked.txt): from N = 4096 while the candidates are at most an eighth of the
    rows (4096: 8.4-9.7 vs 9.3-10.4 us at k 8-64, slower at k 256: 16.8 vs 14.9), at every k above N = 8192
    (11008: 11.6-31.6 vs 33.7-42.4 us; past MAX_RANK_LENGTH the alternative is the bisect select, ~39 us + B.zero_()),
    never at N = 1024 (6.9-12.6 vs 4.8-9.6 us: its second launch costs more than the N^2 compares it saves)."""
    return n > 8192 or (n >= 4096 and 8 * triton.cdiv(n, _CHUNK) * k <= n)


@tc.opaque_to_compile
@torch.no_grad()
def take_top_rows_triton_(b: torch.Tensor, k: int, chunked: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """take_top_rows_reference_ in Triton: the norms, then a select that copies the chosen rows and zeroes B. No
    host sync. The select: one rank select over all N rows (N^2 compares; callers use it up to
    topk.MAX_RANK_LENGTH rows) or, chunked (None: chunked_select_wins), two launches whose work grows as N: the k
    best of each chunk of _CHUNK rows, then the k best of those. Both give the reference's rows in its order."""
    _check_b(b, k)
    n, rank = b.shape
    rows = torch.empty(k, device=b.device, dtype=torch.int64)
    b_rows = torch.empty((k, rank), device=b.device, dtype=b.dtype)
    if n == 0 or rank == 0:
        return rows.copy_(torch.arange(k, device=b.device)), b_rows  # all norms 0: the first k rows
    norms = row_l1_triton(b)
    blocks = dict(BLOCK_I=_RANK_BLOCK_I, BLOCK_J=_RANK_BLOCK_J, BLOCK_RANK=_block_rank(rank), num_warps=4)
    if k == 0 or not (chunked_select_wins(n, k) if chunked is None else chunked):
        _rank_take_kernel[(triton.cdiv(n, _RANK_BLOCK_I),)](
            norms, rows, b, b_rows, n, k, rank, b.stride(0), b.stride(1), **blocks
        )
        return rows, b_rows
    n_slots = triton.cdiv(n, _CHUNK) * k
    cand_key = torch.empty(n_slots, device=b.device, dtype=torch.int32)
    cand_row = torch.empty(n_slots, device=b.device, dtype=torch.int64)
    cand_b = torch.empty((n_slots, rank), device=b.device, dtype=b.dtype)
    _chunk_take_kernel[(triton.cdiv(n, _CHUNK) * (_CHUNK // _RANK_BLOCK_I),)](
        norms, cand_key, cand_row, cand_b, b, n, k, rank, b.stride(0), b.stride(1), CHUNK=_CHUNK, **blocks
    )
    _candidate_take_kernel[(triton.cdiv(n_slots, _RANK_BLOCK_I),)](
        cand_key, cand_row, cand_b, rows, b_rows, n_slots, k, n, rank, CHUNK=_CHUNK, **blocks
    )
    return rows, b_rows


def _check_b(b: torch.Tensor, k: int | None = None) -> None:
    if b.dim() != 2 or not b.dtype.is_floating_point:
        raise ValueError(f"B must be a 2-D float tensor (N x r), got shape {tuple(b.shape)} {b.dtype}")
    if k is not None and not 0 <= k <= b.shape[0]:
        raise ValueError(f"k must be in [0, N={b.shape[0]}], got {k}")
