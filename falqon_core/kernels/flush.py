"""FALQON's flush (option flush_every): merge every row of B into the fp8 backbone, refresh W^T, zero B.

W8 = round(W8 + B @ A8) over all N rows (round: saturating round-to-nearest or the stochastic rounding of the
proxy-update variants, 16 random bits per entry from proxy_update's pair hash: _stochastic_round, the same
bits as the variant kernel's), the cached transpose W8^T (if the layer keeps one) refreshed by
transpose_fp8, then B = 0. Two launches: _prepare_kernel splits B into bf16 pieces, casts A8 to bf16 and
zeroes B; _flush_kernel makes one dense pass over W8 (no row list, no per-row flag: all of B is merged).

Floor (H200, 4.8 TB/s HBM; a copy of W8 measures ~27 us for llama-7b up): bytes = N K (W8 read) + N K (W8
written) [+ 2 N K (transpose_fp8)] + B, its pieces and A8 (a few MB). llama-7b up/gate (N = 11008,
K = 4096): ~91 MB -> ~19 us; attn 4096 x 4096: ~34 MB -> ~7 us.

The delta B @ A8 (N K r multiply-adds) runs on bf16 tensor cores: A8 (e4m3: 4 significant bits) is exact in
bf16, fp32 B is split into two bf16 pieces b0 + b1 (_prepare_kernel: b0 = B truncated to bf16, b1 = the rest
rounded to bf16), and a bf16 x bf16 product is exact in fp32. So the delta is a sum of 2 r exact products
in an fp32 accumulator, with B represented to 2^-16 of |B| (|B - b0 - b1| <= 2^-9 |B - b0| < 2^-16 |B|):
tests/test_flush.py derives the bound against fp64 (allowing for tensor cores that truncate). A third piece
made B exact and cost ~8 us more at r = 64 (llama-7b up); 2^-16 of a delta is below the 16 random bits of
the stochastic rounding. B and A8 are prepared once per flush, not once per tile (each of the K / 128 tiles
of a row block used to split the same B rows and cast the same A8 columns: at r = 64 as many conversions as
W8 has entries).

Measured per variant on the H200 (docs/perf-notes.md, "FALQON's flush"): the per-entry instruction count
bounds this kernel, not its bytes: the stochastic rounding is integer work on fp32 bits (add the random
bits below the grid, clear them), one hash per two entries, the W8 tile loaded before the delta, and a
128-register cap (four programs per SM).
W8^T (layers with cache_weight_t): the kernel stores it too, so a step needs no transpose of W8 for its dX GEMM
(9 us for llama-7b attn, 24 us for up / down, measured in the step). Not as tl.trans of the rounded tile: with
64 x 128 tiles that store gave wrong W8^T bytes on the H200, the pattern of the Triton 3.6 miscompile
quantize_transpose works around. Instead each program, after a barrier, reloads the tile it has just written
(from L2, bypassing L1) in transposed order and stores that: Triton moves it through shared memory itself.
Measured (H200, code 4de6915): the store adds 4-5 us to the flush on llama-7b attn and 12-14 us on up / down,
about half of the transpose it saves (results/probes-step-h200/variant-cache-flush).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import cast_bf16
from falqon_core.kernels.proxy_update import _check_variant, _hash32, _round_to_fp8, proxy_update_variant_reference_
from falqon_core.kernels.transpose import transpose_fp8_triton

# W8 rows x columns per program, one program per tile, 4 warps (one warpgroup: 64 x 128 wgmma), each half of
# the 128 columns its own dot (the stochastic rounding's pairs are (c, c + 64)). The cap of 128 registers
# lets four programs share an SM; timed against 96 / 168 / uncapped and 128 x 128, 64 x 64, 64 x 256 tiles
# (H200, llama-7b attn / up / down, r 16 and 64: docs/perf-notes.md).
_BLOCK_ROWS = 64
_BLOCK_COLS = 128
_NUM_WARPS = 4
_MAX_REGISTERS = 128
_NUM_STAGES = 2  # the rank loop has 1-4 trips: double-buffer its B and A blocks, no deeper
_PIECES = 2  # bf16 pieces of fp32 B (see the module docstring)
_PREPARE_BLOCK = 1024


def _block_rank(rank: int) -> int:
    """Ranks per tl.dot: 16 (the smallest bf16 dot K) up to r = 16, else 32 (64 measured slower at r = 64)."""
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


def split_b_reference(b: torch.Tensor) -> torch.Tensor:
    """fp32 B (N x r) -> its bf16 pieces (2 x N x r): b0 = B truncated to bf16 (its low 16 bits cleared: never
    rounds up to inf), b1 = B - b0 (exact in fp32) rounded to bf16; inf stays in b0 (b1 = 0), NaN stays NaN."""
    b = b.float()
    b0 = (b.view(torch.int32) & -65536).view(torch.float32)
    rest = torch.where(b0 == b, 0.0, b - b0)
    return torch.stack([b0, rest]).to(torch.bfloat16)


@triton.jit
def _prepare_kernel(b_ptr, pieces_ptr, a_ptr, a16_ptr, n_b, rank, n_a, n_cols, stride_b, stride_b_col,
                    stride_a, SOFTWARE_ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """The flush's inputs, once per flush: pieces = split_b_reference(B) (2 x N x r, contiguous), then B = 0;
    a16 = A8 in bf16 (r x K, contiguous; exact). Programs below cdiv(N r, BLOCK) take B, the rest A8."""
    pid = tl.program_id(0)
    n_b_programs = tl.cdiv(n_b, BLOCK)
    if pid < n_b_programs:
        i = pid * BLOCK + tl.arange(0, BLOCK)
        m = i < n_b
        b_ptrs = b_ptr + (i // rank).to(tl.int64) * stride_b + (i % rank) * stride_b_col
        b = tl.load(b_ptrs, mask=m, other=0.0).to(tl.float32)
        b0 = (b.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
        rest = tl.where(b0 == b, 0.0, b - b0)
        tl.store(pieces_ptr + i, b0.to(tl.bfloat16), mask=m)
        tl.store(pieces_ptr + n_b + i, cast_bf16(rest, SOFTWARE_ROUND), mask=m)
        tl.store(b_ptrs, tl.zeros_like(b).to(b_ptr.dtype.element_ty), mask=m)
    else:
        i = (pid - n_b_programs) * BLOCK + tl.arange(0, BLOCK)
        m = i < n_a
        a = tl.load(a_ptr + (i // n_cols).to(tl.int64) * stride_a + i % n_cols, mask=m, other=0.0)
        tl.store(a16_ptr + i, a.to(tl.float32).to(tl.bfloat16), mask=m)


def prepare_flush_inputs_(b: torch.Tensor, a8: torch.Tensor, software_round: bool | None = None):
    """One launch: (pieces, a16) = (split_b_reference(B), A8 in bf16), both contiguous; then B = 0 in place."""
    soft = tc.is_interpreter() if software_round is None else bool(software_round)
    n_rows, rank = b.shape
    n_cols = a8.shape[1]
    pieces = torch.empty((_PIECES, n_rows, rank), dtype=torch.bfloat16, device=b.device)
    a16 = torch.empty((rank, n_cols), dtype=torch.bfloat16, device=b.device)
    n_b, n_a = n_rows * rank, rank * n_cols
    if n_b + n_a > 0:  # then rank > 0 (n_cols may be 0: its programs never run)
        _prepare_kernel[(triton.cdiv(n_b, _PREPARE_BLOCK) + triton.cdiv(n_a, _PREPARE_BLOCK),)](
            b, pieces, a8, a16, n_b, rank, n_a, max(n_cols, 1), b.stride(0), b.stride(1), a8.stride(0),
            SOFTWARE_ROUND=soft, BLOCK=_PREPARE_BLOCK,
        )
    return pieces, a16


@triton.jit
def _dot_half(pieces_ptr, piece_stride, b_offs, b_mask, a16, acc, PIECES: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + (b0 + b1)[rows, ranks] @ a16[ranks, cols]: one tensor-core dot per piece (DOT_F32, the interpreter,
    whose tl.dot multiplies bf16's uint16 storage as integers: the same values upcast to fp32, exact)."""
    for p in tl.static_range(PIECES):
        piece = tl.load(pieces_ptr + p * piece_stride + b_offs, mask=b_mask, other=0.0)
        if DOT_F32:
            acc = tl.dot(piece.to(tl.float32), a16.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(piece, a16, acc)
    return acc


@triton.jit
def _tile_and_delta(w_ptr, a16_ptr, pieces_ptr, pid, n_rows, n_cols, rank, stride_w, BLOCK_ROWS: tl.constexpr,
                    BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr, PIECES: tl.constexpr, DOT_F32: tl.constexpr):
    """Program pid's tile of W8 as two halves of BLOCK_COLS / 2 columns: (row0, col0, r_loc, h_loc, and per half its
    pointers, mask, old fp8 values and fp32 delta (b0 + b1)[rows] @ a16[:, cols]). The W8 tile is loaded first:
    its latency overlaps the delta."""
    HALF: tl.constexpr = BLOCK_COLS // 2
    n_col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    row0 = (pid // n_col_blocks) * BLOCK_ROWS
    col0 = (pid % n_col_blocks) * BLOCK_COLS
    r_loc = tl.arange(0, BLOCK_ROWS)
    h_loc = tl.arange(0, HALF)
    rows = row0 + r_loc
    r_mask = rows < n_rows
    cols_l = col0 + h_loc
    cols_r = cols_l + HALF
    mask_l = r_mask[:, None] & (cols_l < n_cols)[None, :]
    mask_r = r_mask[:, None] & (cols_r < n_cols)[None, :]
    w_l = (w_ptr + row0.to(tl.int64) * stride_w + col0) + (r_loc[:, None] * stride_w + h_loc[None, :])
    w_r = w_l + HALF
    old_l = tl.load(w_l, mask=mask_l, other=0.0)
    old_r = tl.load(w_r, mask=mask_r, other=0.0)
    acc_l = tl.zeros([BLOCK_ROWS, HALF], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_ROWS, HALF], dtype=tl.float32)
    piece_stride = n_rows * rank
    for j0 in range(0, rank, BLOCK_RANK):
        j = j0 + tl.arange(0, BLOCK_RANK)
        j_mask = j < rank
        b_offs = rows[:, None] * rank + j[None, :]
        b_mask = r_mask[:, None] & j_mask[None, :]
        a_rows = a16_ptr + j[:, None] * n_cols
        a_l = tl.load(a_rows + cols_l[None, :], mask=j_mask[:, None] & (cols_l < n_cols)[None, :], other=0.0)
        a_r = tl.load(a_rows + cols_r[None, :], mask=j_mask[:, None] & (cols_r < n_cols)[None, :], other=0.0)
        acc_l = _dot_half(pieces_ptr, piece_stride, b_offs, b_mask, a_l, acc_l, PIECES, DOT_F32)
        acc_r = _dot_half(pieces_ptr, piece_stride, b_offs, b_mask, a_r, acc_r, PIECES, DOT_F32)
    return row0, col0, r_loc, h_loc, r_mask, w_l, w_r, mask_l, mask_r, old_l, old_r, acc_l, acc_r


@triton.jit
def _flush_kernel(
    w_ptr, a16_ptr, pieces_ptr, seed_ptr, wt_ptr, n_rows, n_cols, rank, stride_w,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    STOCHASTIC: tl.constexpr, WRITE_T: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    BLOCK_RANK: tl.constexpr, PIECES: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One BLOCK_ROWS x BLOCK_COLS tile of W8: W8 = round(W8 + (b0 + b1)[rows] @ a16[:, cols]), as two halves
    of BLOCK_COLS / 2 columns (c and c + BLOCK_COLS / 2 share one hash: the pairs of _rounding_bits).

    Grid: (cdiv(N, BLOCK_ROWS) * cdiv(K, BLOCK_COLS),), column blocks fastest: consecutive programs read the
    same rows of the pieces (kept in L2) and walk a16 (r x K bf16) which L2 holds whole (_tile_and_delta). Tile
    offsets are int32 from an int64 tile base.
    WRITE_T: the new tile is also stored to wt_ptr (W8^T, K x N contiguous), reloaded transposed (module docstring).
    """
    tl.static_assert(BLOCK_COLS == 128, "the rounding's pairs are (c, c + 64) of each 128-column block")
    HALF: tl.constexpr = BLOCK_COLS // 2
    row0, col0, r_loc, h_loc, r_mask, w_l, w_r, mask_l, mask_r, old_l, old_r, acc_l, acc_r = _tile_and_delta(
        w_ptr, a16_ptr, pieces_ptr, tl.program_id(0), n_rows, n_cols, rank, stride_w, BLOCK_ROWS, BLOCK_COLS,
        BLOCK_RANK, PIECES, DOT_F32,
    )
    bits_l = tl.zeros([BLOCK_ROWS, HALF], dtype=tl.int32)
    bits_r = bits_l
    if STOCHASTIC:  # the pair counter of _rounding_bits, row * K + col0 / 2 + (c mod 64), mod 2^32 (as the hash)
        base = (row0.to(tl.int64) * n_cols + col0 // 2).to(tl.uint32)
        x = _hash32(tl.load(seed_ptr), base + (r_loc[:, None] * n_cols + h_loc[None, :]).to(tl.uint32))
        bits_l = (x & 0xFFFF).to(tl.int32)
        bits_r = (x >> 16).to(tl.int32)
    out = w_ptr.dtype.element_ty
    q_l = _round_to_fp8(old_l.to(tl.float32) + acc_l, bits_l, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, STOCHASTIC, out)
    q_r = _round_to_fp8(old_r.to(tl.float32) + acc_r, bits_r, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, STOCHASTIC, out)
    tl.store(w_l, q_l, mask=mask_l)
    tl.store(w_r, q_r, mask=mask_r)
    if WRITE_T:
        tl.debug_barrier()  # every thread's stores of the tile are visible to the whole program after this
        c_loc = tl.arange(0, BLOCK_COLS)
        mask_t = ((col0 + c_loc) < n_cols)[:, None] & r_mask[None, :]
        tile_t = tl.load((w_ptr + row0.to(tl.int64) * stride_w + col0) + (c_loc[:, None] + r_loc[None, :] * stride_w),
                         mask=mask_t, other=0.0, cache_modifier=".cg")
        tl.store((wt_ptr + col0.to(tl.int64) * n_rows + row0) + (c_loc[:, None] * n_rows + r_loc[None, :]),
                 tile_t, mask=mask_t)


@tc.opaque_to_compile
@torch.no_grad()
def flush_triton_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, *, stochastic: bool = False,
    seed: torch.Tensor | None = None, weight_t: torch.Tensor | None = None, software_round: bool | None = None,
) -> None:
    """The Triton path of flush_reference_ (same contract): two launches (prepare, flush). No host sync.

    B is zeroed by the prepare kernel, after it has split B: the flush's programs read the pieces, so none
    races with the zeroing. A contiguous weight_t is written by the flush kernel itself; any other is refreshed
    by a transpose after it. software_round: as in proxy_update_triton_.
    """
    _check_flush(w8, a8, b, stochastic, seed, weight_t)
    n_rows, n_cols = w8.shape
    rank = a8.shape[0]
    soft = tc.is_interpreter() if software_round is None else bool(software_round)
    if n_rows == 0 or n_cols == 0:
        b.zero_()
        return
    write_t = weight_t is not None and weight_t.is_contiguous() and rank > 0
    if rank > 0:  # rank 0: nothing to merge, W8 stays (W8^T is still refreshed below, as the contract says)
        pieces, a16 = prepare_flush_inputs_(b, a8, software_round=soft)
        fp8_max, mant_bits, min_exp = tc.format_constants(w8.dtype)
        grid = (triton.cdiv(n_rows, _BLOCK_ROWS) * triton.cdiv(n_cols, _BLOCK_COLS),)
        _flush_kernel[grid](
            w8, a16, pieces, seed if stochastic else w8, weight_t if write_t else w8, n_rows, n_cols, rank,
            w8.stride(0), FP8_MAX=fp8_max, MANT_BITS=mant_bits, MIN_EXP=min_exp, SOFTWARE_ROUND=soft,
            STOCHASTIC=bool(stochastic), WRITE_T=write_t,
            BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS, BLOCK_RANK=_block_rank(rank), PIECES=_PIECES,
            DOT_F32=tc.is_interpreter(), num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, maxnreg=_MAX_REGISTERS,
        )
    if weight_t is not None and not write_t:  # in place: a captured graph keeps weight_t's address
        weight_t.copy_(transpose_fp8_triton(w8))


def flush_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, **options) -> None:
    """The fast path on CUDA, the reference elsewhere (keywords of flush_reference_)."""
    if tc.triton_fp8_ok(w8) and w8.stride(1) == 1 and a8.stride(1) == 1:
        flush_triton_(w8, a8, b, **options)
    else:
        flush_reference_(w8, a8, b, **options)
