"""Indices of the k largest entries of a 1-D fp32 vector in one Triton launch (FALQON's row selection).

Why: the proxy update picks the top-k rows of B by L1 norm on every step. torch.topk on one vector of
N = 1024 .. 14336 norms runs a single-block radix select that took 11 us (N = 1024), 22 us (4096) and
48-62 us (11008-14336) of an H200 step (results/shapes-h200 profiles), up to 8% of a 4096-token step and
15% of a 512-token one. Two selects here, both exact:
  rank    (N <= MAX_RANK_LENGTH) every entry's rank, the number of entries ahead of it (larger, or equal with
          a lower index), counted by many programs at once (N^2 integer compares spread over the GPU); an
          entry of rank < k is written to out[rank]. No serial step: the one-program select below spent 15 us
          at N = 4096 and 39 us at N = 11008 in its 32 dependent block-wide counts (H200, CUDA-graph replay,
          results/probes-topk-h200); more warps or counting 2-4 bits per round were no faster. Rank: 5.9 and 29 us.
  bisect  (N <= MAX_TRITON_LENGTH) one program holds all N values in registers and finds the k-th largest by a
          binary search over the 32-bit order key (32 block-wide counts), then writes every index above it and
          the lowest-indexed ties at it with two prefix sums.
One launch, no host sync: capturable in a CUDA graph. Longer vectors take torch.topk.

Same set as torch.topk whenever the k-th largest value is not tied with a value left out (ties at the
threshold are broken by lowest index here, unspecified in torch). Order: rank gives the entries by value,
largest first (ties: lower index first), bisect ascending indices (torch.topk(sorted=False) promises no order).
NaN ranks above everything, as in torch.topk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc

# a vector of up to this many fp32 values is held by one program (32 values per thread at 32 warps)
MAX_TRITON_LENGTH = 32768
# the rank select's work grows as N^2: up to this length it is the faster one (H200: 2.2 / 5.9 / 29 us at
# N = 1024 / 4096 / 11008 against the bisect's 7.2 / 15.2 / 38.6; 47 against 39 at 14336)
MAX_RANK_LENGTH = 12288
SELECTS = ("rank", "bisect")
# rank select: entries ranked per program x entries compared per loop step. Few entries per program make many
# programs (N / 4), so the loop's loads of the compared chunk are hidden by other programs: 32 x 128 took
# 13.7 us at N = 4096, 4 x 512 5.9 (results/probes-topk-h200/rank-blocks.txt)
_RANK_BLOCK_I = 4
_RANK_BLOCK_J = 512
assert _RANK_BLOCK_J % _RANK_BLOCK_I == 0, "a program's entries must lie in one compared chunk"


def topk_indices_reference(values: torch.Tensor, k: int) -> torch.Tensor:
    """Torch reference: torch.topk(values, k, sorted=False).indices (int64, (k,), unspecified order)."""
    return torch.topk(values, k, sorted=False).indices


@triton.jit
def _order_key(x):
    """fp32 -> int32 key with the same order as the floats (negatives flipped); every NaN is the largest key."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(x != x, 2147483647, key)


@triton.jit
def _topk_indices_kernel(values_ptr, out_ptr, n, k, BLOCK: tl.constexpr):
    """out[:k] = indices of the k largest of values[:n], ascending. One program; BLOCK >= n (a power of 2)."""
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    key = _order_key(tl.load(values_ptr + offs, mask=valid, other=0.0)).to(tl.int64)
    # the largest t with count(key >= t) >= k is the k-th largest key: binary search over [-2^31, 2^31)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((valid & (key >= mid)).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    _store_from_threshold(out_ptr, offs, valid, key, lo, k)


@triton.jit
def _store_from_threshold(out_ptr, offs, valid, key, kth, k):
    """Given the k-th largest key, write (ascending) every index whose key is above it and the lowest-indexed ties
    at it, k in all: two prefix sums over the program's block."""
    above = valid & (key > kth)
    tied = valid & (key == kth)
    room = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pos, offs.to(tl.int64), mask=take)


@triton.jit
def _load_keys(ptr, j, n, CANDIDATES: tl.constexpr, cand_k, cand_n, CHUNK: tl.constexpr):
    """Order keys of entries j (int32; j >= n reads as 0, always masked by the caller). CANDIDATES False: ptr holds
    fp32 values (_order_key). True: ptr holds the chunked select's candidate keys, cand_k slots per CHUNK entries of
    the cand_n ranked (row_select); a slot past its chunk's length is unused and reads as int32 min, below every
    key (-inf's is -2^31 + 2^23 - 1)."""
    if CANDIDATES:
        chunk = j // cand_k
        used = (j < n) & (j - chunk * cand_k < tl.minimum(cand_n - chunk * CHUNK, CHUNK))
        key = tl.load(ptr + j, mask=used, other=-2147483648)
    else:
        key = _order_key(tl.load(ptr + j, mask=j < n, other=0.0))
    return key


@triton.jit
def _ranks(values_ptr, n, pid, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, CANDIDATES: tl.constexpr = False,
           cand_k=1, cand_n=0, CHUNK: tl.constexpr = 1):
    """(i, i_mask, rank_i) for the BLOCK_I entries i of program pid: rank_i = #{j: key_j > key_i or (key_j == key_i
    and j < i)}. BLOCK_I divides BLOCK_J, so the program's entries lie in one j-chunk: before it every j < i (count
    key_j >= key_i), after it every j > i (count key_j > key_i), one compare each. Keys: _load_keys."""
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < n
    key_i = _load_keys(values_ptr, i, n, CANDIDATES, cand_k, cand_n, CHUNK)[:, None]
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)  # summed over j-chunks first, reduced once at the end
    cols = tl.arange(0, BLOCK_J)
    chunk = (pid * BLOCK_I) // BLOCK_J * BLOCK_J
    for j0 in range(0, chunk, BLOCK_J):  # whole chunks of lower indices
        key_j = _load_keys(values_ptr, j0 + cols, n, CANDIDATES, cand_k, cand_n, CHUNK)[None, :]
        acc += (key_j >= key_i).to(tl.int32)
    j = chunk + cols
    key_j = _load_keys(values_ptr, j, n, CANDIDATES, cand_k, cand_n, CHUNK)[None, :]
    ahead = (key_j > key_i) | ((key_j == key_i) & (j[None, :] < i[:, None]))
    acc += (ahead & (j < n)[None, :]).to(tl.int32)
    for j0 in range(chunk + BLOCK_J, n, BLOCK_J):  # higher indices; the last chunk may be partial
        j = j0 + cols
        key_j = _load_keys(values_ptr, j, n, CANDIDATES, cand_k, cand_n, CHUNK)[None, :]
        acc += ((key_j > key_i) & (j < n)[None, :]).to(tl.int32)
    return i, i_mask, tl.sum(acc, axis=1)


@triton.jit
def _topk_rank_kernel(values_ptr, out_ptr, n, k, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[rank_i] = i for the BLOCK_I entries i of this program whose rank (_ranks) is below k."""
    i, i_mask, rank = _ranks(values_ptr, n, tl.program_id(0), BLOCK_I, BLOCK_J)
    tl.store(out_ptr + rank, i.to(tl.int64), mask=i_mask & (rank < k))


def _check(values: torch.Tensor, k: int) -> None:
    if values.dim() != 1 or values.dtype != torch.float32:
        raise ValueError(f"topk_indices needs a 1-D fp32 tensor, got shape {tuple(values.shape)} {values.dtype}")
    if not 0 <= k <= values.numel():
        raise ValueError(f"k must be in [0, {values.numel()}], got {k}")


@tc.opaque_to_compile
def topk_indices_triton(values: torch.Tensor, k: int, select: str | None = None) -> torch.Tensor:
    """The Triton select behind topk_indices (same set as the reference). (k,) int64.

    select: "rank" or "bisect" (module docstring; their orders differ); None: rank up to MAX_RANK_LENGTH entries.
    """
    _check(values, k)
    n = values.numel()
    if select is None:
        select = "rank" if n <= MAX_RANK_LENGTH else "bisect"
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if select == "bisect" and n > MAX_TRITON_LENGTH:
        raise ValueError(f"the bisect select holds at most {MAX_TRITON_LENGTH} values in one program, got {n}")
    out = torch.empty(k, device=values.device, dtype=torch.int64)
    if k == 0:
        return out
    values = values.contiguous()
    if select == "rank":
        grid = (triton.cdiv(n, _RANK_BLOCK_I),)
        _topk_rank_kernel[grid](values, out, n, k, BLOCK_I=_RANK_BLOCK_I, BLOCK_J=_RANK_BLOCK_J, num_warps=4)
    else:
        block = triton.next_power_of_2(n)
        num_warps = max(4, min(32, block // 1024))
        _topk_indices_kernel[(1,)](values, out, n, k, BLOCK=block, num_warps=num_warps)
    return out


def topk_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of the k largest entries of a 1-D fp32 vector: the Triton select on CUDA (up to
    MAX_TRITON_LENGTH entries), torch.topk elsewhere."""
    if values.is_cuda and not tc.is_interpreter() and values.numel() <= MAX_TRITON_LENGTH:
        return topk_indices_triton(values, k)
    return topk_indices_reference(values, k)
