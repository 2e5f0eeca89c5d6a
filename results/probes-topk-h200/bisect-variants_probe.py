"""One-program selects counting 1, 2 or 4 bits of the k-th largest key per round (2^bits - 1 thresholds at once),
at 8-32 warps, against the committed bisect select (then topk_indices_triton). Output: bisect-variants.txt.
(As run, the kernel ended with the bisect's own store code, since factored out as _store_from_threshold.)"""
import torch, triton, triton.language as tl
from triton.testing import do_bench_cudagraph as bench
from falqon_core.kernels.topk import _order_key, _store_from_threshold, topk_indices_triton


@triton.jit
def _topk_bits_kernel(values_ptr, out_ptr, n, k, BLOCK: tl.constexpr, BITS: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    key = _order_key(tl.load(values_ptr + offs, mask=valid, other=0.0))
    ukey = (key ^ -2147483648).to(tl.uint32, bitcast=True)
    j = tl.arange(0, 2**BITS).to(tl.uint32)
    prefix = tl.zeros([], tl.uint32)
    for it in tl.static_range(32 // BITS):
        shift = 32 - BITS * (it + 1)
        t = prefix | (j << shift)
        cnt = tl.sum((valid[:, None] & (ukey[:, None] >= t[None, :])).to(tl.int32), axis=0)
        best = tl.max(tl.where(cnt >= k, j, 0), axis=0)
        prefix = prefix | (best << shift)
    _store_from_threshold(out_ptr, offs, valid, ukey, prefix, k)


def topk_bits(values, k, bits, num_warps):
    out = torch.empty(k, device=values.device, dtype=torch.int64)
    block = triton.next_power_of_2(values.numel())
    _topk_bits_kernel[(1,)](values, out, values.numel(), k, BLOCK=block, BITS=bits, num_warps=num_warps)
    return out


for n in (1024, 4096, 11008, 14336):
    for k in (16, 64, 256):
        v = torch.rand(n, device="cuda") * 3
        ref = set(torch.topk(v, k).indices.tolist())
        line = [f"n={n} k={k} bsearch={1000 * bench(lambda: topk_indices_triton(v, k, 'bisect'), rep=100):.2f}"]
        for bits in (1, 2, 4):
            for nw in (8, 16, 32):
                ok = set(topk_bits(v, k, bits, nw).tolist()) == ref
                line.append(f"b{bits}w{nw}={1000 * bench(lambda: topk_bits(v, k, bits, nw), rep=100):.2f}{'' if ok else '!'}")
        print(" ".join(line), flush=True)
