"""Indices of the k largest entries of a 1-D fp32 vector, in one Triton program (FALQON's row selection).

Why: the proxy update picks the top-k rows of B by L1 norm on every step. torch.topk on one vector of
N = 1024 .. 14336 norms runs a single-block radix select that took 11 us (N = 1024), 22 us (4096) and
48-62 us (11008-14336) of an H200 step (results/shapes-h200 profiles), up to 8% of a 4096-token step and
15% of a 512-token one. Here one program holds all N values in registers and finds the k-th largest by a
binary search over the 32-bit order key (32 block-wide counts), then writes every index above it and the
lowest-indexed ties at it with two prefix sums. One launch, no host sync: capturable in a CUDA graph.

Same set as torch.topk whenever the k-th largest value is not tied with a value left out (ties at the
threshold are broken by lowest index here, unspecified in torch); the order of the indices is ascending
(torch.topk(sorted=False) gives no order either). NaN ranks above everything, as in torch.topk.
Vectors longer than MAX_TRITON_LENGTH take torch.topk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc

# a vector of up to this many fp32 values is held by one program (32 values per thread at 32 warps)
MAX_TRITON_LENGTH = 32768


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
    above = valid & (key > lo)
    tied = valid & (key == lo)
    room = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pos, offs.to(tl.int64), mask=take)


def _check(values: torch.Tensor, k: int) -> None:
    if values.dim() != 1 or values.dtype != torch.float32:
        raise ValueError(f"topk_indices needs a 1-D fp32 tensor, got shape {tuple(values.shape)} {values.dtype}")
    if not 0 <= k <= values.numel():
        raise ValueError(f"k must be in [0, {values.numel()}], got {k}")


@tc.opaque_to_compile
def topk_indices_triton(values: torch.Tensor, k: int) -> torch.Tensor:
    """The Triton select behind topk_indices (same set as the reference; indices ascending). (k,) int64."""
    _check(values, k)
    n = values.numel()
    out = torch.empty(k, device=values.device, dtype=torch.int64)
    if k > 0:
        block = triton.next_power_of_2(n)
        num_warps = max(4, min(32, block // 1024))
        _topk_indices_kernel[(1,)](values.contiguous(), out, n, k, BLOCK=block, num_warps=num_warps)
    return out


def topk_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of the k largest entries of a 1-D fp32 vector: the Triton select on CUDA (up to
    MAX_TRITON_LENGTH entries), torch.topk elsewhere."""
    if values.is_cuda and not tc.is_interpreter() and values.numel() <= MAX_TRITON_LENGTH:
        return topk_indices_triton(values, k)
    return topk_indices_reference(values, k)
