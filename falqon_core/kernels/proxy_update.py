"""FALQON's row-wise proxy update: merge the top-k rows of B into the fp8 backbone, then zero B.

Triton path (CUDA): row L1 norms of B and torch.topk pick the rows exactly as the reference does (same
torch ops, so the same rows); then ONE Triton kernel computes, for the k selected rows,
W8[rows] = sat_e4m3(W8[rows] + B[rows] @ A8) in place; then B.zero_(). Zeroing B is not fused into the
kernel: several programs read the same B rows (one per column block of W), so a program zeroing them
would race with the others. No host sync anywhere: capturable in a CUDA graph.

Exactness: B[rows] @ A8 is summed over r in order j = 0..r-1 in fp32; torch's matmul may sum in
another order, so the fp32 sums can differ in the last bits and the fp8 results by at most 1 ulp where
a sum lies within that difference of a rounding boundary. With B in bf16 each product b*a is exact in
fp32 (8 + 4 significant bits), so whenever the partial sums are exact in fp32 the result is bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import saturating_cast

# selected rows x W columns per program (GPU); small k and a 128-column block give ~100+ programs at K=4096
_BLOCK_ROWS = 16
_BLOCK_COLS = 128


def top_rows_by_l1(b: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of the k rows of B (N x r) with the largest L1 norm, unsorted (torch.topk)."""
    return torch.topk(b.float().abs().sum(dim=1), k, sorted=False).indices


@torch.no_grad()
def proxy_update_reference_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """In place: rows = top-k rows of B by L1 norm; W8[rows] = sat_e4m3(W8[rows] + B[rows] @ A8); B = 0.

    w8: N x K fp8 (the backbone rows of the melded matrix), a8: r x K fp8 (its adapter rows),
    b: N x r. Both share one scale s, so the update is done in fp8 units (W8 += B . A8). Returns rows (k,).
    """
    rows = top_rows_by_l1(b, k)
    merged = w8.index_select(0, rows).float() + b.index_select(0, rows).float() @ a8.float()
    # fp8 has no index_copy_ kernel on every backend: copy the raw bytes
    w8.view(torch.uint8).index_copy_(0, rows, fp8.saturating_cast(merged, w8.dtype).view(torch.uint8))
    b.zero_()
    return rows


@triton.jit
def _merge_rows_kernel(
    w_ptr, a_ptr, b_ptr, rows_ptr, k, n_cols, rank,
    stride_w, stride_a, stride_b, stride_b_col,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """W[rows[i], cols] = sat_cast(W[rows[i], cols] + sum_j B[rows[i], j] * A[j, cols]) for one tile.

    Grid: (cdiv(k, BLOCK_ROWS), cdiv(n_cols, BLOCK_COLS)). rows are distinct, so tiles never overlap.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    i = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    i_mask = i < k
    rows = tl.load(rows_ptr + i, mask=i_mask, other=0).to(tl.int64)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_mask = cols < n_cols
    b_rows = b_ptr + rows * stride_b
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for j in range(0, rank):
        b_j = tl.load(b_rows + j * stride_b_col, mask=i_mask, other=0.0).to(tl.float32)
        a_j = tl.load(a_ptr + j * stride_a + cols, mask=c_mask, other=0.0).to(tl.float32)
        acc += b_j[:, None] * a_j[None, :]
    mask = i_mask[:, None] & c_mask[None, :]
    w_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
    merged = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    q = saturating_cast(merged, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, w_ptr.dtype.element_ty)
    tl.store(w_ptrs, q, mask=mask)


def _check_inputs(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> None:
    shapes = f"{tuple(w8.shape)}, {tuple(a8.shape)}, {tuple(b.shape)}"
    if w8.dim() != 2 or a8.dim() != 2 or b.dim() != 2:
        raise ValueError(f"proxy_update_ needs 2-D w8, a8, b, got shapes {shapes}")
    n, n_cols = w8.shape
    rank = a8.shape[0]
    if a8.shape[1] != n_cols or tuple(b.shape) != (n, rank):
        raise ValueError(f"shapes must be w8 N x K, a8 r x K, b N x r; got {shapes}")
    if w8.dtype not in tc.FP8_DTYPES or a8.dtype not in tc.FP8_DTYPES:
        raise ValueError(f"w8 and a8 must be fp8, got {w8.dtype} and {a8.dtype}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, N={n}], got {k}")
    if w8.stride(1) != 1 or a8.stride(1) != 1:
        raise ValueError("w8 and a8 need contiguous rows (stride 1 along K); the melded matrix's row slices have them")


@tc.opaque_to_compile
@torch.no_grad()
def proxy_update_triton_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int, *, software_round: bool | None = None
) -> torch.Tensor:
    """The Triton path of proxy_update_ (same contract as proxy_update_reference_). Returns rows (k,).

    software_round: round to the e4m3 grid with fp32 adds before the cast (None: only under the interpreter).
    """
    _check_inputs(w8, a8, b, k)
    rows = top_rows_by_l1(b, k)
    if k > 0:
        fp8_max, mant_bits, min_exp = tc.format_constants(w8.dtype)
        block_rows = min(_BLOCK_ROWS, triton.next_power_of_2(k))
        grid = (triton.cdiv(k, block_rows), triton.cdiv(w8.shape[1], _BLOCK_COLS))
        _merge_rows_kernel[grid](
            w8, a8, b, rows, k, w8.shape[1], a8.shape[0],
            w8.stride(0), a8.stride(0), b.stride(0), b.stride(1),
            FP8_MAX=fp8_max, MANT_BITS=mant_bits, MIN_EXP=min_exp,
            SOFTWARE_ROUND=tc.is_interpreter() if software_round is None else bool(software_round),
            BLOCK_ROWS=block_rows, BLOCK_COLS=_BLOCK_COLS,
            num_warps=4,
        )
    b.zero_()
    return rows


def proxy_update_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The fast path on CUDA, the reference elsewhere."""
    if tc.triton_fp8_ok(w8) and w8.stride(1) == 1 and a8.stride(1) == 1:
        return proxy_update_triton_(w8, a8, b, k)
    return proxy_update_reference_(w8, a8, b, k)
