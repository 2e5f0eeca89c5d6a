"""FALQON's flush (option flush_every): merge every row of B into the fp8 backbone, refresh W^T, zero B.

W8 = round(W8 + B @ A8) over all N rows (round: saturating round-to-nearest or the stochastic rounding of the
proxy-update variants, u = hash(seed, row * K + col): _round_merged, shared with the variant kernel), the cached
transpose W8^T (if the layer keeps one) refreshed by transpose_fp8, then B = 0. One dense pass over W8: no row
list, no per-row 'changed' flag (all of B is zeroed anyway).

Floor (H200, 4.8 TB/s HBM): bytes = N K (W8 read) + N K (W8 written) [+ 2 N K (transpose_fp8)] + 4 N r (B read)
+ r K (A8 read), then B.zero_() writes 4 N r. llama-7b up/gate (N = 11008, K = 4096): ~91 MB -> ~19 us; attn
4096 x 4096: ~34 MB -> ~7 us.

Why tensor cores: the delta B @ A8 is N K r multiply-adds. As an fp32 "ieee" tl.dot (what this kernel used to
run, the variant kernel's _merged_delta) it runs on the CUDA cores and bounds the flush (H200, llama-7b up:
152 us at r = 16, 336 us at r = 64, against the ~19 us floor). Here it is three bf16 tensor-core dots whose
products are exact (_flush_delta): A8 (e4m3: 4 significant bits, exponents -9..8) is exact in bf16, fp32 B is
split exactly into three bf16 pieces (_bf16_pieces: 8 + 8 + 8 significant bits), and a bf16 x bf16 product
(at most 16 significant bits) is exact in fp32. So the delta is a sum of 3 r exact products in an fp32
accumulator; only the order and rounding of that sum differ from an fp32 matmul. (tf32x3 would need as many
dots at half the bf16 rate, and its two tf32 pieces of B keep only ~22 of B's 24 bits.)

Exactness: whenever the fp32 sums are exact (the CPU tests' inputs) the bytes are the torch reference's. For
general fp32 B the merged fp32 value is within gamma_{9r+1}(2^-23) (|W8| + sum_j |B_j A8_j|) of the exact one
(tests/test_flush.py derives it, allowing for tensor cores that truncate instead of rounding), so W8 differs
from an exact-arithmetic rounding only where the exact merged value is that close to a rounding boundary, and
there by one e4m3 step. An infinite entry of B stays whole (its pieces b1, b2 are 0): its products are
+-inf (NaN times a zero of A8) as in the reference, and saturate to +-448.
W8^T is not stored from the kernel's tile (tl.trans of the rounded tile): with 64 x 128 tiles that store gave
wrong W8^T bytes on the H200, the pattern of the Triton 3.6 miscompile quantize_transpose works around; the
separate transpose (one more read of W8) only costs the layers that opt into cache_weight_t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels.proxy_update import _check_variant, _round_merged, proxy_update_variant_reference_
from falqon_core.kernels.transpose import transpose_fp8_triton

# W8 rows x columns per program, one program per tile, 4 warps (one warpgroup: 64 x 128 wgmma). Chosen from an
# ahead-of-time compile for sm_90 (registers, spills, shared memory; not yet timed). A thread holds 64 entries
# of the tile; uncapped, ptxas takes 128-163 registers (nearest) and 168-192 (stochastic: the hash), i.e. 2-4
# programs per SM; capped at 168 nothing spills and at least 3 share an SM: while one waits for its W8 tile
# (8 KB) the others compute, >= 24 KB of W8 in flight per SM (HBM needs ~25 KB: 4.8 TB/s x ~0.7 us / 132).
# 128 x 128 with 8 warps takes 136-198 registers: one program per SM. A cap of 128: 4 programs, but up to 176
# bytes a thread spilled.
_BLOCK_ROWS = 64
_BLOCK_COLS = 128
_NUM_WARPS = 4
_MAX_REGISTERS = 168
_NUM_STAGES = 2  # the rank loop has 1-4 trips: double-buffer its B and A8 blocks, no deeper


def _block_rank(rank: int) -> int:
    """Ranks per tl.dot: 16 (the smallest bf16 dot K) up to r = 16, else 32 (fewer loop trips)."""
    return 16 if rank <= 16 else 32


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
def _bf16_pieces(b):
    """fp32 b -> (b0, b1, b2) in bf16 with b0 + b1 + b2 = b, the pieces of b's significand (8 + 8 + 8 bits).

    b0 is b with its low 16 bits cleared (a bf16 value, truncated: never rounds up to inf), rest = b - b0 is
    exact (b's low 16 bits), b1 is rest with its low 16 bits cleared, b2 = rest - b1 has at most 8 significant
    bits. All three have b's sign and |b0| + |b1| + |b2| = |b|. Exact whenever |b| >= 2^-103 (then every
    nonzero piece is a multiple of b's ulp >= 2^-126, a normal bf16); below that a piece may be subnormal or
    below bf16's subnormals (and a tensor core may flush subnormal inputs): what is lost is < 2^-126 per entry.
    The where keeps an infinite b from giving inf - inf; a NaN stays NaN.
    """
    b0 = (b.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    rest = tl.where(b0 == b, 0.0, b - b0)
    b1 = (rest.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    b2 = rest - b1
    return b0.to(tl.bfloat16), b1.to(tl.bfloat16), b2.to(tl.bfloat16)


@triton.jit
def _flush_delta(b_rows, r_mask, a_ptr, cols, c_mask, rank, stride_a, stride_b_col, BLOCK_ROWS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr, DOT_F32: tl.constexpr):
    """sum_j B[rows, j] * A8[j, cols] (BLOCK_ROWS x BLOCK_COLS, fp32) as 3 bf16 tensor-core dots per rank block.

    Each of the 3 r products (b0, b1, b2 of B times A8, which is exact in bf16) is exact in fp32; the dots add
    them into one fp32 accumulator. Ranks past r (and rows past N) read as 0: zero products, exact.
    DOT_F32 (the interpreter, whose tl.dot multiplies bf16's uint16 storage as integers): the same bf16 pieces
    and A8, upcast to fp32 (exact) for an fp32 dot.
    """
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_RANK):
        j = j0 + tl.arange(0, BLOCK_RANK)
        j_mask = j < rank
        b_blk = tl.load(b_rows[:, None] + j[None, :] * stride_b_col, mask=r_mask[:, None] & j_mask[None, :],
                        other=0.0)
        a_blk = tl.load(a_ptr + j[:, None] * stride_a + cols[None, :], mask=j_mask[:, None] & c_mask[None, :],
                        other=0.0).to(tl.bfloat16)
        b0, b1, b2 = _bf16_pieces(b_blk.to(tl.float32))
        if DOT_F32:
            a32 = a_blk.to(tl.float32)
            acc = tl.dot(b0.to(tl.float32), a32, acc, input_precision="ieee")
            acc = tl.dot(b1.to(tl.float32), a32, acc, input_precision="ieee")
            acc = tl.dot(b2.to(tl.float32), a32, acc, input_precision="ieee")
        else:
            acc = tl.dot(b0, a_blk, acc)
            acc = tl.dot(b1, a_blk, acc)
            acc = tl.dot(b2, a_blk, acc)
    return acc


@triton.jit
def _flush_kernel(
    w_ptr, a_ptr, b_ptr, seed_ptr, n_rows, n_cols, rank,
    stride_w, stride_a, stride_b, stride_b_col,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    STOCHASTIC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    BLOCK_RANK: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One BLOCK_ROWS x BLOCK_COLS tile of W8: W8 = round(W8 + B[rows] @ A8[:, cols]).

    Grid: (cdiv(N, BLOCK_ROWS) * cdiv(K, BLOCK_COLS),), column blocks fastest: consecutive programs read the
    same row block of B (kept in L2 while they run) and walk A8 (r x K, at most a few MB) which L2 holds whole.
    The W8 tile is loaded after the delta: loaded before, it and its pointers stay live across the rank loop
    (~255 registers a thread in the sm_90 compile); the other programs on the SM hide its latency. Tile offsets
    are int32 from an int64 tile base (per-entry int64 pointers cost registers too).
    """
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    row0 = (pid // n_col_blocks) * BLOCK_ROWS
    col0 = (pid % n_col_blocks) * BLOCK_COLS
    r_loc = tl.arange(0, BLOCK_ROWS)
    c_loc = tl.arange(0, BLOCK_COLS)
    rows = row0 + r_loc
    cols = col0 + c_loc
    r_mask = rows < n_rows
    c_mask = cols < n_cols
    mask = r_mask[:, None] & c_mask[None, :]
    w_ptrs = (w_ptr + row0.to(tl.int64) * stride_w + col0) + (r_loc[:, None] * stride_w + c_loc[None, :])
    acc = _flush_delta(b_ptr + rows.to(tl.int64) * stride_b, r_mask, a_ptr, cols, c_mask, rank, stride_a,
                       stride_b_col, BLOCK_ROWS, BLOCK_COLS, BLOCK_RANK, DOT_F32)
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    merged = w.to(tl.float32) + acc
    q = _round_merged(merged, rows.to(tl.int64), cols, n_cols, w_ptr, seed_ptr, FP8_MAX, MANT_BITS, MIN_EXP,
                      SOFTWARE_ROUND, STOCHASTIC)
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
            BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS, BLOCK_RANK=_block_rank(a8.shape[0]),
            DOT_F32=tc.is_interpreter(), num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, maxnreg=_MAX_REGISTERS,
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
