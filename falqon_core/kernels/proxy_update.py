"""FALQON's row-wise proxy update: merge the top-k rows of B into the fp8 backbone, then zero B.

Triton path (CUDA), three or four launches (falqon_core.kernels.row_select): the row L1 norms of B; the rank
select, in one launch or chunk by chunk on wide layers, which also copies the k chosen rows of B out and zeroes B
(each row of B belongs to one of its programs); then ONE Triton kernel computes, for the k selected rows,
W8[rows] = sat_e4m3(W8[rows] + B[rows] @ A8) in place from that copy. (fused_select=False: the norms, the select of
falqon_core.kernels.topk, the merge reading B's rows, then B.zero_(); the merge cannot zero B: several of its
programs read the same B rows, one per column block of W.) No host sync anywhere: capturable in a CUDA graph.

The product B[rows] @ A8 is a tl.dot over blocks of 32 ranks (fp32 "ieee": CUDA-core FMAs, no TF32), not a
loop over single ranks: the loop's r dependent global loads per program made the kernel latency-bound
(~0.65 us per rank at K = 4096 on an H200: 42 us of a 383 us step at r = 64, 156 us at r = 256), while
the k x r x K FMAs themselves take ~8 us at r = 256 (docs/perf-notes.md, "Where the time goes").
A tl.dot needs at least 16 rows, so a program covers max(BLOCK_ROWS, 16) row slots, the extra ones masked.

Exactness: the fp32 sums over r may run in another order than torch's matmul (and than the old loop),
so they can differ in the last bits and the fp8 results by at most 1 ulp where a sum lies within that
difference of a rounding boundary. With B in bf16 each product b*a is exact in fp32 (8 + 4 significant
bits), so whenever the partial sums are exact in fp32 the result is bit-exact in any order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import saturating_cast
from falqon_core.kernels.row_select import row_l1, row_l1_reference, take_top_rows_triton_
from falqon_core.kernels.topk import topk_indices, topk_indices_reference

# selected rows x W columns per program (GPU); small k and a 128-column block give ~100+ programs at K=4096
_BLOCK_ROWS = 16
_BLOCK_COLS = 128
_MERGE_WARPS = 4  # warps per merge program (results/probes-step-h200/lt-gemm/update-ab.txt: 2 or 8 no faster)
# ranks per tl.dot step of the merge; a tl.dot wants >= 16 rows, so a program has at least that many row slots
_BLOCK_RANK: tl.constexpr = tl.constexpr(32)
_MIN_DOT_ROWS: tl.constexpr = tl.constexpr(16)


def top_rows_by_l1(b: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of the k rows of B (N x r) with the largest L1 norm, in no promised order.

    The norms are row_select.row_l1 (one Triton launch on CUDA: fp32 sums in another order than torch's, see
    there), the selection topk_indices (Triton on CUDA, torch.topk elsewhere): the same set as
    top_rows_by_l1_reference except where the k-th and (k+1)-th norms differ by no more than that order does.
    """
    return topk_indices(row_l1(b), k)


def top_rows_by_l1_reference(b: torch.Tensor, k: int) -> torch.Tensor:
    """top_rows_by_l1 with torch.topk on every device (what the reference update uses)."""
    return topk_indices_reference(row_l1_reference(b), k)


@torch.no_grad()
def proxy_update_reference_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """In place: rows = top-k rows of B by L1 norm; W8[rows] = sat_e4m3(W8[rows] + B[rows] @ A8); B = 0.

    w8: N x K fp8 (the backbone rows of the melded matrix), a8: r x K fp8 (its adapter rows),
    b: N x r. Both share one scale s, so the update is done in fp8 units (W8 += B . A8). Returns rows (k,).
    """
    rows = top_rows_by_l1_reference(b, k)
    merged = w8.index_select(0, rows).float() + b.index_select(0, rows).float() @ a8.float()
    # fp8 has no index_copy_ kernel on every backend: copy the raw bytes
    w8.view(torch.uint8).index_copy_(0, rows, fp8.saturating_cast(merged, w8.dtype).view(torch.uint8))
    b.zero_()
    return rows


@triton.jit
def _merged_delta(b_rows, i_mask, a_ptr, cols, c_mask, rank, stride_a, stride_b_col, ROWS: tl.constexpr,
                  BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr):
    """sum_j B[rows, j] * A[j, cols] in fp32 (ROWS x BLOCK_COLS): tl.dot over blocks of BLOCK_RANK ranks.

    b_rows: ROWS pointers to the selected rows of B (masked rows read as 0); A8 is upcast to fp32 exactly.
    """
    acc = tl.zeros([ROWS, BLOCK_COLS], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_RANK):
        j = j0 + tl.arange(0, BLOCK_RANK)
        j_mask = j < rank
        b_blk = tl.load(b_rows[:, None] + j[None, :] * stride_b_col, mask=i_mask[:, None] & j_mask[None, :], other=0.0)
        a_blk = tl.load(a_ptr + j[:, None] * stride_a + cols[None, :], mask=j_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(b_blk.to(tl.float32), a_blk.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _merge_rows_kernel(
    w_ptr, a_ptr, b_ptr, rows_ptr, k, n_cols, rank,
    stride_wl, stride_w, stride_al, stride_a, stride_bl, stride_b, stride_b_col,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, B_COMPACT: tl.constexpr,
):
    """W[l, rows[l, i], cols] = sat_cast(W[l, rows[l, i], cols] + sum_j B[l, rows[l, i], j] * A[l, j, cols]), one tile.

    Grid: (cdiv(k, BLOCK_ROWS), cdiv(n_cols, BLOCK_COLS), L): L layers of one shape (rows: L x k; the per-layer
    update is L = 1). rows are distinct within a layer, so tiles never overlap. The sum over j is the same
    fp32 tl.dot over rank blocks (_merged_delta) whatever L is: the batched update is bit-identical to the per-layer one.
    B_COMPACT: B holds only the selected rows (L x k x r, row i of B for rows[l, i]: row_select's copy).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    ROWS: tl.constexpr = BLOCK_ROWS if BLOCK_ROWS > _MIN_DOT_ROWS else _MIN_DOT_ROWS
    slot = tl.arange(0, ROWS)
    i = pid_r * BLOCK_ROWS + slot
    i_mask = (i < k) & (slot < BLOCK_ROWS)
    rows = tl.load(rows_ptr + layer * k + i, mask=i_mask, other=0).to(tl.int64)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_mask = cols < n_cols
    w_layer = w_ptr + layer * stride_wl
    a_layer = a_ptr + layer * stride_al
    b_rows = b_ptr + layer * stride_bl + (i.to(tl.int64) if B_COMPACT else rows) * stride_b
    mask = i_mask[:, None] & c_mask[None, :]
    w_ptrs = w_layer + rows[:, None] * stride_w + cols[None, :]
    old = tl.load(w_ptrs, mask=mask, other=0.0)  # issued before the product's loads: their latencies overlap
    acc = _merged_delta(b_rows, i_mask, a_layer, cols, c_mask, rank, stride_a, stride_b_col, ROWS, BLOCK_COLS,
                        _BLOCK_RANK)
    merged = old.to(tl.float32) + acc
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
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int, *, software_round: bool | None = None,
    fused_select: bool | None = None,
) -> torch.Tensor:
    """The Triton path of proxy_update_ (same contract as proxy_update_reference_). Returns rows (k,).

    software_round: round to the e4m3 grid with fp32 adds before the cast (None: only under the interpreter).
    fused_select: take the rows with row_select (norms, then a select that copies and zeroes B; rows by norm,
    largest first) instead of top_rows_by_l1 + B.zero_(); None: on CUDA (row_select takes any N: past
    topk.MAX_RANK_LENGTH its chunked select).
    """
    _check_inputs(w8, a8, b, k)
    if fused_select is None:
        fused_select = tc.triton_fp8_ok(b)
    if fused_select:
        rows, b_rows = take_top_rows_triton_(b, k)
        merge_rows_(w8[None], a8[None], b_rows[None], rows[None], software_round, b_compact=True)
        return rows
    rows = top_rows_by_l1(b, k)
    merge_rows_(w8[None], a8[None], b[None], rows[None], software_round)
    b.zero_()
    return rows


def merge_rows_(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, software_round: bool | None,
    b_compact: bool = False,
) -> None:
    """One launch of _merge_rows_kernel over L layers: W[l, rows[l]] = sat_cast(W[l, rows[l]] + B[l, rows[l]] @ A[l]).

    w: L x (>= N) x K fp8, a: L x (>= r) x K fp8, b: L x N x r (r = b's last dim is the sum's length), rows: L x k
    int64; rows of w and a have stride 1 along K. The per-layer update passes L = 1 views.
    b_compact: b is L x k x r, its row i the B row of rows[l, i] (row_select's copy), instead of all N rows.
    """
    n_layers, k = rows.shape
    if k == 0 or n_layers == 0:
        return
    fp8_max, mant_bits, min_exp = tc.format_constants(w.dtype)
    block_rows = min(_BLOCK_ROWS, triton.next_power_of_2(k))
    grid = (triton.cdiv(k, block_rows), triton.cdiv(w.shape[2], _BLOCK_COLS), n_layers)
    _merge_rows_kernel[grid](
        w, a, b, rows.contiguous(), k, w.shape[2], b.shape[2],
        w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        FP8_MAX=fp8_max, MANT_BITS=mant_bits, MIN_EXP=min_exp,
        SOFTWARE_ROUND=tc.is_interpreter() if software_round is None else bool(software_round),
        BLOCK_ROWS=block_rows, BLOCK_COLS=_BLOCK_COLS, B_COMPACT=bool(b_compact),
        num_warps=_MERGE_WARPS,
    )


def proxy_update_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The fast path on CUDA, the reference elsewhere."""
    if tc.triton_fp8_ok(w8) and w8.stride(1) == 1 and a8.stride(1) == 1:
        return proxy_update_triton_(w8, a8, b, k)
    return proxy_update_reference_(w8, a8, b, k)


# ---------------------------------------------------------------- variants (options of the falqon method)
#
# The reference update above loses a merged delta for good when it rounds away on the e4m3 grid (at LoRA's
# usual learning rates nearly all of them do). The variants below change what is merged and how it is
# rounded; the default path above is untouched (same kernel, same speed).
#   stochastic     round W8 + B.A8 onto the e4m3 grid stochastically (unbiased: E[result] = W8 + B.A8 up to
#                  2^-17 of a grid step), with a counter-based RNG: 16 random bits per entry of W8, the two
#                  halves of one 32-bit hash of (seed, pair counter) for the entries (row, col) and
#                  (row, col + 64) of each 128-column block (rounding_bits_reference), so a seed gives the
#                  same bits in every kernel and in the torch reference, and a kernel that holds both entries
#                  of a pair hashes once for two (the flush; docs/perf-notes.md "FALQON's flush").
#   merge="grid"   merge every row in which some entry changes under round-to-nearest (i.e. |delta| >= half
#                  an e4m3 spacing at that weight) instead of the top-k rows by L1 norm.
#   keep_unmerged  zero only the merged rows of B (the others keep accumulating) instead of all of B.
# stats (optional, int32 (3,), added to on the device, no host sync): [merged entries whose delta is nonzero
# but whose fp8 value did not change, merged entries with a nonzero delta, rows merged].

MERGE_RULES = ("topk", "grid")
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B
_SEED_MUL = 0x9E3779B1
_MASK32 = 0xFFFFFFFF


@triton.jit
def _hash32(seed, counters):
    """uint32 hash of (seed, counter): lowbias32 (C. Wellons) of counter ^ (seed * golden ratio)."""
    x = counters.to(tl.uint32) ^ (seed.to(tl.uint32) * 0x9E3779B1)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _rounding_bits(seed, rows, cols, n_cols):
    """16 random bits (int32 in [0, 2^16)) per entry (rows[:, None], cols[None, :]) of W8: rounding_bits_reference."""
    counters = rows[:, None] * n_cols + ((cols >> 7) << 6)[None, :] + (cols & 63)[None, :]
    x = _hash32(seed, counters)
    return tl.where(((cols >> 6) & 1)[None, :] == 1, x >> 16, x & 0xFFFF).to(tl.int32)


@triton.jit
def _stochastic_round(y, bits16, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """Clamp fp32 y to +-FP8_MAX, then |y| -> floor(|y| / step + u) * step, u = (bits16 + 1/2) / 2^16, sign kept:
    rounded up with probability the fraction of a step |y| lies above the grid point below (to 2^-17).

    Integer work on fp32 bits: adding u's bits just below the grid's lowest bit (SHIFT = 23 - MANT_BITS
    fp32 bits lie below it) carries into it exactly when the fraction + u >= 1; clearing those bits then
    floors. Below 2^MIN_EXP (the format's subnormals, spacing 2^(MIN_EXP - MANT_BITS)) |y| is first moved
    up by c = 2^MIN_EXP into the binade whose spacing is the same, and c is taken off after (exact; the fp32
    add may drop bits of |y| below 2^(MIN_EXP - 24)). On-grid values never move; inf saturates; NaN stays.
    """
    SHIFT: tl.constexpr = 23 - MANT_BITS
    a = tl.minimum(tl.abs(y), FP8_MAX, propagate_nan=tl.PropagateNan.ALL)  # the clamp, on |y| (sign: y's bits)
    c = tl.where(a < 2.0**MIN_EXP, 2.0**MIN_EXP, 0.0)
    z = (a + c).to(tl.int32, bitcast=True)
    z = (z + ((bits16 << (SHIFT - 16)) + (1 << (SHIFT - 17)))) & (-(1 << SHIFT))
    q = z.to(tl.float32, bitcast=True) - c
    return (q.to(tl.int32, bitcast=True) | (y.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64 (the product split to stay below 2^63)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def hash32_reference(seed: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Torch twin of _hash32: the same uint32 arithmetic in int64 (values in [0, 2^32))."""
    x = (counters.to(torch.int64) & _MASK32) ^ _mul32(seed.to(torch.int64) & _MASK32, _SEED_MUL)
    x = x ^ (x >> 16)
    x = _mul32(x, _HASH_MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _HASH_MUL_2)
    return x ^ (x >> 16)


def hash_uniform_reference(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """u in [0, 1) (multiples of 2^-24, fp32) from the hash of (seed, offset): the top 24 bits of hash32."""
    return (hash32_reference(seed, offsets) >> 8).to(torch.float32) * (1.0 / 16777216.0)


def rounding_bits_reference(seed: torch.Tensor, rows: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The stochastic rounding's 16 random bits (int64 in [0, 2^16)) for W8[rows, :] (len(rows) x n_cols).

    Entries (row, c) and (row, c + 64) of each 128-column block c0..c0 + 127 share the counter
    row * n_cols + c0 / 2 + (c mod 64) (distinct over all pairs: it stays below (row + 1) * n_cols); the low
    16 bits of its hash go to the first, the high 16 to the second.
    """
    cols = torch.arange(n_cols, device=rows.device)
    counters = rows.to(torch.int64)[:, None] * n_cols + ((cols >> 7) << 6) + (cols & 63)
    x = hash32_reference(seed, counters)
    return torch.where(((cols >> 6) & 1) == 1, x >> 16, x & 0xFFFF)


def stochastic_round_reference(y: torch.Tensor, bits16: torch.Tensor, dtype: torch.dtype = fp8.E4M3) -> torch.Tensor:
    """Torch twin of _stochastic_round: fp32 y -> fp32 values on `dtype`'s grid, |y| -> floor(|y| / step + u) *
    step with u = (bits16 + 1/2) / 2^16 (unbiased to 2^-17 of a step inside the range; saturates at +-max)."""
    fp8_max, mant_bits, min_exp = tc.format_constants(dtype)
    shift = 23 - mant_bits
    y = torch.clamp(y.float(), -fp8_max, fp8_max)
    a = y.abs()
    c = torch.where(a < 2.0**min_exp, 2.0**min_exp, 0.0)
    z = (a + c).view(torch.int32)
    z = (z + ((bits16.to(torch.int32) << (shift - 16)) + (1 << (shift - 17)))) & (-(1 << shift))
    q = z.view(torch.float32) - c
    return (q.view(torch.int32) | (y.view(torch.int32) & -2147483648)).view(torch.float32)


def _variant_rows(b: torch.Tensor, a8: torch.Tensor, w8: torch.Tensor, merge: str, k: int) -> torch.Tensor:
    if merge == "topk":
        return top_rows_by_l1(b, k)
    return torch.arange(w8.shape[0], device=w8.device)


@torch.no_grad()
def proxy_update_variant_reference_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int, *, stochastic: bool = False,
    seed: torch.Tensor | None = None, merge: str = "topk", keep_unmerged: bool = False,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """The variants' torch reference (see the block comment above). seed: int 0-dim tensor (stochastic only).

    Returns the rows whose W8 was written: the top-k rows (merge="topk") or all N rows (merge="grid",
    where rows without a changing entry are written back unchanged).
    """
    _check_variant(w8, a8, b, k, stochastic, seed, merge)
    rows = _variant_rows(b, a8, w8, merge, k)
    old = w8.index_select(0, rows).float()
    delta = b.index_select(0, rows).float() @ a8.float()
    merged = old + delta
    if stochastic:
        new = stochastic_round_reference(merged, rounding_bits_reference(seed, rows, w8.shape[1]), w8.dtype)
        new = new.to(w8.dtype)
    else:
        new = fp8.saturating_cast(merged, w8.dtype)
    changed = new.float() != old
    row_merged = changed.any(dim=1) if merge == "grid" else torch.ones(len(rows), dtype=torch.bool, device=w8.device)
    w8.view(torch.uint8).index_copy_(0, rows, new.view(torch.uint8))
    if stats is not None:
        counted = (delta != 0) & row_merged[:, None]
        lost = counted & ~changed
        stats += torch.stack([lost.sum(), counted.sum(), row_merged.sum()]).to(stats.dtype)
    _zero_b(b, rows, row_merged, keep_unmerged)
    return rows


def _zero_b(b: torch.Tensor, rows: torch.Tensor, row_merged: torch.Tensor | None, keep_unmerged: bool) -> None:
    """B = 0 (the reference), or only B[merged rows] = 0 (keep_unmerged). row_merged: bool per entry of rows
    (merge="grid"), None for top-k (every row in rows was merged)."""
    if not keep_unmerged:
        b.zero_()
    elif row_merged is not None and rows.numel() == b.shape[0]:  # merge="grid": rows = 0..N-1
        b.masked_fill_(row_merged[:, None], 0)
    else:
        b.index_fill_(0, rows, 0)


def _check_variant(w8, a8, b, k, stochastic, seed, merge) -> None:
    _check_inputs(w8, a8, b, k)
    if merge not in MERGE_RULES:
        raise ValueError(f"merge must be one of {', '.join(MERGE_RULES)}, got {merge!r}")
    if stochastic and (seed is None or seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64)):
        raise ValueError("stochastic rounding needs `seed`, a one-element int32/int64 tensor on w8's device")


@triton.jit
def _round_to_fp8(merged, bits16, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
                  SOFTWARE_ROUND: tl.constexpr, STOCHASTIC: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """merged (fp32) -> OUT_DTYPE: _stochastic_round with the given random bits (its result is on the grid, so
    the cast is exact), else the saturating round-to-nearest (bits16 unused)."""
    if STOCHASTIC:
        q = _stochastic_round(merged, bits16, FP8_MAX, MANT_BITS, MIN_EXP).to(OUT_DTYPE)
    else:
        q = saturating_cast(merged, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, OUT_DTYPE)
    return q


@triton.jit
def _round_merged(merged, rows, cols, n_cols, w_ptr, seed_ptr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr,
                  MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr, STOCHASTIC: tl.constexpr):
    """W8's new bytes for merged = W8 + delta (rows x cols of W8): stochastic rounding with _rounding_bits (the
    same bits wherever a row is merged: top-k update or flush), else the saturating round-to-nearest."""
    bits = 0
    if STOCHASTIC:
        bits = _rounding_bits(tl.load(seed_ptr), rows, cols, n_cols)
    return _round_to_fp8(merged, bits, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, STOCHASTIC,
                         w_ptr.dtype.element_ty)


@triton.jit
def _merge_rows_variant_kernel(
    w_ptr, a_ptr, b_ptr, rows_ptr, seed_ptr, flag_ptr, counts_ptr, k, n_cols, rank,
    stride_w, stride_a, stride_b, stride_b_col,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    STOCHASTIC: tl.constexpr, FLAG_ROWS: tl.constexpr, TRACK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """As _merge_rows_kernel, plus: stochastic rounding, a per-row 'some entry changed' flag (atomic max into
    flag_ptr, merge="grid") and per-row lost-update counts (atomic adds into counts_ptr, N x 2 int32)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    ROWS: tl.constexpr = BLOCK_ROWS if BLOCK_ROWS > _MIN_DOT_ROWS else _MIN_DOT_ROWS
    slot = tl.arange(0, ROWS)
    i = pid_r * BLOCK_ROWS + slot
    i_mask = (i < k) & (slot < BLOCK_ROWS)
    rows = tl.load(rows_ptr + i, mask=i_mask, other=0).to(tl.int64)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_mask = cols < n_cols
    b_rows = b_ptr + rows * stride_b
    mask = i_mask[:, None] & c_mask[None, :]
    w_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
    old = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)  # before the product's loads, as _merge_rows_kernel
    acc = _merged_delta(b_rows, i_mask, a_ptr, cols, c_mask, rank, stride_a, stride_b_col, ROWS, BLOCK_COLS,
                        _BLOCK_RANK)
    merged = old + acc
    q = _round_merged(merged, rows, cols, n_cols, w_ptr, seed_ptr, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND,
                      STOCHASTIC)
    tl.store(w_ptrs, q, mask=mask)
    changed = (q.to(tl.float32) != old) & mask
    if FLAG_ROWS:
        tl.atomic_max(flag_ptr + rows, tl.max(changed.to(tl.int32), axis=1), mask=i_mask)
    if TRACK:  # per-row counts (the launcher keeps those of merged rows): [lost, nonzero deltas]
        counted = (acc != 0.0) & mask
        tl.atomic_add(counts_ptr + rows * 2, tl.sum((counted & ~changed).to(tl.int32), axis=1), mask=i_mask)
        tl.atomic_add(counts_ptr + rows * 2 + 1, tl.sum(counted.to(tl.int32), axis=1), mask=i_mask)


@tc.opaque_to_compile
@torch.no_grad()
def proxy_update_variant_triton_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int, *, stochastic: bool = False,
    seed: torch.Tensor | None = None, merge: str = "topk", keep_unmerged: bool = False,
    stats: torch.Tensor | None = None, software_round: bool | None = None,
) -> torch.Tensor:
    """The Triton path of proxy_update_variant_reference_ (same contract). No host sync."""
    _check_variant(w8, a8, b, k, stochastic, seed, merge)
    rows = _variant_rows(b, a8, w8, merge, k)
    n_rows = rows.numel()
    grid_merge = merge == "grid"
    # only what the options need is allocated (the recommended variant adds no launch but the seed's add_)
    flag = torch.zeros(w8.shape[0], dtype=torch.int32, device=w8.device) if grid_merge else None
    counts = torch.zeros((w8.shape[0], 2), dtype=torch.int32, device=w8.device) if stats is not None else None
    if n_rows > 0:
        fp8_max, mant_bits, min_exp = tc.format_constants(w8.dtype)
        block_rows = min(_BLOCK_ROWS, triton.next_power_of_2(n_rows))
        grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(w8.shape[1], _BLOCK_COLS))
        unused = rows  # a pointer the kernel never touches (its constexpr branch is compiled out)
        _merge_rows_variant_kernel[grid](
            w8, a8, b, rows, seed if stochastic else unused, unused if flag is None else flag,
            unused if counts is None else counts, n_rows, w8.shape[1], a8.shape[0],
            w8.stride(0), a8.stride(0), b.stride(0), b.stride(1),
            FP8_MAX=fp8_max, MANT_BITS=mant_bits, MIN_EXP=min_exp,
            SOFTWARE_ROUND=tc.is_interpreter() if software_round is None else bool(software_round),
            STOCHASTIC=bool(stochastic), FLAG_ROWS=grid_merge, TRACK=stats is not None,
            BLOCK_ROWS=block_rows, BLOCK_COLS=_BLOCK_COLS,
            num_warps=4,
        )
    row_merged = flag.bool() if flag is not None else None
    if counts is not None:
        if row_merged is None:
            row_merged_all = torch.zeros(w8.shape[0], dtype=torch.bool, device=w8.device).index_fill_(0, rows, True)
        else:
            row_merged_all = row_merged
        kept = counts * row_merged_all[:, None]
        stats += torch.cat([kept.sum(dim=0), row_merged_all.sum().reshape(1)]).to(stats.dtype)
    _zero_b(b, rows, row_merged, keep_unmerged)
    return rows


def proxy_update_variant_(w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int, **variant) -> torch.Tensor:
    """The variants' fast path on CUDA, their reference elsewhere (keywords of proxy_update_variant_reference_)."""
    if tc.triton_fp8_ok(w8) and w8.stride(1) == 1 and a8.stride(1) == 1:
        return proxy_update_variant_triton_(w8, a8, b, k, **variant)
    return proxy_update_variant_reference_(w8, a8, b, k, **variant)
