import torch, triton
from triton.testing import do_bench_cudagraph as bench
from falqon_core.kernels import topk as tk

def run(v, k, bi, bj, nw):
    n = v.numel()
    out = torch.empty(k, device=v.device, dtype=torch.int64)
    tk._topk_rank_kernel[(triton.cdiv(n, bi),)](v, out, n, k, BLOCK_I=bi, BLOCK_J=bj, num_warps=nw)
    return out

configs = [(32, 128, 4), (8, 256, 4), (8, 512, 4), (16, 256, 4), (4, 512, 4), (8, 256, 2), (16, 512, 8), (4, 1024, 4), (2, 1024, 4)]
for n in (1024, 4096, 11008, 14336, 16384):
    v = torch.rand(n, device="cuda") * 3
    k = 64
    ref = set(torch.topk(v, k).indices.tolist())
    line = [f"n={n} bisect={1000*bench(lambda: tk.topk_indices_triton(v, k, 'bisect'), rep=100):.2f}"]
    for bi, bj, nw in configs:
        ok = set(run(v, k, bi, bj, nw).tolist()) == ref
        t = 1000 * bench(lambda: run(v, k, bi, bj, nw), rep=100)
        line.append(f"{bi}x{bj}w{nw}={t:.2f}{'' if ok else '!'}")
    print(" ".join(line), flush=True)
