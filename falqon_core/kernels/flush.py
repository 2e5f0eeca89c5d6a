"""FALQON's flush (option flush_every): merge every row of B into the fp8 backbone, refresh W^T, zero B.

W8 = round(W8 + B @ A8) over all N rows (round: saturating round-to-nearest or the stochastic rounding of the
proxy-update variants), the cached transpose W8^T (if the layer keeps one) refreshed by transpose_fp8, then
B = 0. It is proxy_update_variant_(k=N, merge="grid", keep_unmerged=False), which is what flush ran before,
without what that general kernel carries for a row subset: no row-index list, no per-row 'changed' flag and
its atomics (all of B is zeroed anyway), small row blocks, and a separate strided copy for W8^T.

Exactness: the tile's delta is _flush_delta, the variant kernel's _merged_delta (fp32 tl.dot "ieee", masked
ranks read as 0) over 16-rank blocks; the tile is the variant kernel's 16 x 128. On the H200 its W8 bytes
equal the variant kernel's for general fp32 B at r = 5, 16, 24, 48, 64, both roundings (tests/test_flush.py,
gpu); r = 1 is open (see that test).
W8^T is not stored from the kernel's tile (tl.trans of the rounded tile): with 64 x 128 tiles that store gave
wrong W8^T bytes on the H200, the pattern of the Triton 3.6 miscompile quantize_transpose works around; the
separate transpose (one more read of W8) only costs the layers that opt into cache_weight_t. The stochastic bits are the variant kernel's: u = hash(seed, row * K + col).
Against the torch reference (an fp32 matmul) the usual caveat of proxy_update applies: bit-exact whenever the
fp32 sums are exact (the CPU tests), else at most 1 e4m3 ulp next to a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels.proxy_update import (
    _check_variant,
    _merged_delta,
    _round_merged,
    proxy_update_variant_reference_,
)
from falqon_core.kernels.transpose import transpose_fp8_triton

# W8 rows x columns per program, one program per tile: the variant kernel's 16 x 128 tile (see _flush_kernel's
# docstring: on the H200 it was the fastest of 16-128 rows x 64-256 columns, and 64-row tiles gave other bytes at r = 1)
_BLOCK_ROWS = 16
_BLOCK_COLS = 128
_NUM_WARPS = 4
_BLOCK_RANK = 16  # the smallest tl.dot K; _flush_delta says why any block size gives the same sums


@torch.no_grad()
def flush_reference_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, *, stochastic: bool = False,
    seed: torch.Tensor | None = None, weight_t: torch.Tensor | None = None,
) -> None:
    """In place: W8 = round(W8 + B @ A8) for all N rows, W8^T refreshed (if given: K x N, W8's dtype), B = 0.

    The torch reference: the variants' reference update with k = N, merge="grid", keep_unmerged=False (what
    flush ran before it had a kernel), then weight_t = W8^T. seed: int 0-dim tensor (stochastic only).
    """
    _check_flush(w8, a8, b, stochastic, seed, weight_t)
    proxy_update_variant_reference_(
        w8, a8, b, w8.shape[0], stochastic=stochastic, seed=seed, merge="grid", keep_unmerged=False
    )
    if weight_t is not None:
        weight_t.view(torch.uint8).copy_(w8.view(torch.uint8).t())


def _check_flush(w8, a8, b, stochastic, seed, weight_t) -> None:
    _check_variant(w8, a8, b, w8.shape[0] if w8.dim() == 2 else 0, stochastic, seed, "grid")
    if weight_t is not None:
        if weight_t.dim() != 2 or tuple(weight_t.shape) != (w8.shape[1], w8.shape[0]) or weight_t.dtype != w8.dtype:
            raise ValueError(
                f"weight_t must be K x N = {(w8.shape[1], w8.shape[0])} of {w8.dtype}, "
                f"got {tuple(weight_t.shape)} of {weight_t.dtype}"
            )


@triton.jit
def _flush_delta(b_rows, r_mask, a_ptr, cols, c_mask, rank, stride_a, stride_b_col, BLOCK_ROWS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """_merged_delta (proxy_update) over blocks of BLOCK_RANK ranks, meant to give the same fp32 values.

    Why it should: an fp32 "ieee" tl.dot is, per output element, the chain acc = fma(B[i, j], A[j, c], acc) over j in order;
    across rank blocks the chain goes on (acc is the dot's accumulator). So the block size changes only the
    masked tail: ranks past r padded with zeros, each step fma(0, 0, acc) = acc + 0.0. Those steps are
    identities except that -0.0 becomes +0.0 (and the first one does all that any number of them do).
    _merged_delta pads r to a multiple of 32; with 16-rank blocks (half the FMAs at r = 16) the tail is empty
    exactly when r % 32 == 16 while _merged_delta's is not: then one acc + 0.0 stands in for it.
    """
    acc = _merged_delta(b_rows, r_mask, a_ptr, cols, c_mask, rank, stride_a, stride_b_col, BLOCK_ROWS, BLOCK_COLS,
                        BLOCK_RANK)
    if rank % 32 == 16:
        acc = acc + 0.0
    return acc


@triton.jit
def _flush_kernel(
    w_ptr, a_ptr, b_ptr, seed_ptr, n_rows, n_cols, rank,
    stride_w, stride_a, stride_b, stride_b_col,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    STOCHASTIC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
):
    """One BLOCK_ROWS x BLOCK_COLS tile of W8: W8 = round(W8 + B[rows] @ A8[:, cols]).

    Grid: (cdiv(N, BLOCK_ROWS) * cdiv(K, BLOCK_COLS),), column blocks fastest (neighbouring programs write
    neighbouring bytes of the same W8 rows; B's row block and A8, r x K, stay in L2).

    Floor (H200, 4.8 TB/s HBM): bytes = N K (W8 read) + N K (W8 written) [+ N K (W8^T written)] + 4 N r (B read)
    + r K (A8 read), then B.zero_() writes 4 N r. llama-7b up/gate (N = 11008, K = 4096, r = 16): 45.1 + 45.1
    [+ 45.1] + 0.7 + 0.07 MB = 91 MB -> 19 us (136 MB -> 28 us with W8^T); attn 4096 x 4096: 34 MB -> 7 us
    (50 MB -> 11 us). The delta is N K r fp32 FMAs on the CUDA cores (an fp32 "ieee" dot has no tensor-core
    form, and TF32 would change the bits): 0.72 G FMAs for up at r = 16, ~22 us at the H200's ~33.5 T FMA/s,
    more in practice (the FMA lowering of tl.dot also moves operands through shared memory and registers).
    Development timings (H200, r = 16, CUDA-graph replays of the flush alone, ad hoc, not a committed run;
    without / with W8^T, then stored from the tile): up 116 / 158 us nearest, 144 / 234 us stochastic (the old
    path: 287 / 569 and 308 / 591 us); attn 42 / 57 and 54 / 88 us (old: 106 / 194, 111 / 202). So this kernel
    is bound by the dot's instructions, not by memory: 64 x 128 tiles with 8 warps (>= 32 KB in flight per SM)
    were no faster (117 us for up, nearest) and gave other bytes at r = 1. The next lever is the delta as an
    explicit per-rank FMA loop over register tiles (the same in-order chain, without tl.dot's FMA lowering).
    """
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    pid_r = pid // n_col_blocks
    pid_c = pid % n_col_blocks
    rows = (pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    r_mask = rows < n_rows
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_mask = cols < n_cols
    acc = _flush_delta(b_ptr + rows * stride_b, r_mask, a_ptr, cols, c_mask, rank, stride_a, stride_b_col,
                       BLOCK_ROWS, BLOCK_COLS, BLOCK_RANK)
    mask = r_mask[:, None] & c_mask[None, :]
    w_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
    merged = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    q = _round_merged(merged, rows, cols, n_cols, w_ptr, seed_ptr, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND,
                      STOCHASTIC)
    tl.store(w_ptrs, q, mask=mask)


@tc.opaque_to_compile
@torch.no_grad()
def flush_triton_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, *, stochastic: bool = False,
    seed: torch.Tensor | None = None, weight_t: torch.Tensor | None = None, software_round: bool | None = None,
) -> None:
    """The Triton path of flush_reference_ (same contract): one launch, then B.zero_(). No host sync.

    B is zeroed outside the kernel: every column block's program reads the same rows of B, so a program
    zeroing them would race with the others. software_round: as in proxy_update_triton_.
    """
    _check_flush(w8, a8, b, stochastic, seed, weight_t)
    n_rows, n_cols = w8.shape
    if n_rows > 0 and n_cols > 0:
        fp8_max, mant_bits, min_exp = tc.format_constants(w8.dtype)
        grid = (triton.cdiv(n_rows, _BLOCK_ROWS) * triton.cdiv(n_cols, _BLOCK_COLS),)
        _flush_kernel[grid](
            w8, a8, b, seed if stochastic else w8, n_rows, n_cols, a8.shape[0],
            w8.stride(0), a8.stride(0), b.stride(0), b.stride(1),
            FP8_MAX=fp8_max, MANT_BITS=mant_bits, MIN_EXP=min_exp,
            SOFTWARE_ROUND=tc.is_interpreter() if software_round is None else bool(software_round),
            STOCHASTIC=bool(stochastic),
            BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS, BLOCK_RANK=_BLOCK_RANK,
            num_warps=_NUM_WARPS,
        )
        if weight_t is not None:  # in place: a captured graph keeps weight_t's address
            weight_t.copy_(transpose_fp8_triton(w8))
    b.zero_()


def flush_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, **options) -> None:
    """The fast path on CUDA, the reference elsewhere (keywords of flush_reference_)."""
    if tc.triton_fp8_ok(w8) and w8.stride(1) == 1 and a8.stride(1) == 1:
        flush_triton_(w8, a8, b, **options)
    else:
        flush_reference_(w8, a8, b, **options)
