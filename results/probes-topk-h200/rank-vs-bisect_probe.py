import torch
from triton.testing import do_bench_cudagraph as bench
from falqon_core.kernels.topk import topk_indices_triton
from falqon_core.kernels.proxy_update import proxy_update_

def us(fn):
    return 1000 * bench(fn, rep=100)

for n in (1024, 4096, 11008, 14336):
    for k in (16, 64, 256):
        v = torch.rand(n, device="cuda") * 3
        ref = set(torch.topk(v, k).indices.tolist())
        ok = all(set(topk_indices_triton(v, k, s).tolist()) == ref for s in ("rank", "bisect"))
        print(f"n={n} k={k} same={ok} rank={us(lambda: topk_indices_triton(v, k, 'rank')):.2f} "
              f"bisect={us(lambda: topk_indices_triton(v, k, 'bisect')):.2f}", flush=True)
for (N, K) in [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008)]:
    for r in (16, 64):
        w8 = (torch.randn(N, K, device="cuda") * 50).clamp(-400, 400).to(torch.float8_e4m3fn)
        a8 = (torch.randn(r, K, device="cuda") * 50).to(torch.float8_e4m3fn)
        b0 = torch.randn(N, r, device="cuda") * 1e-2
        b = b0.clone()
        def full():
            b.copy_(b0)
            proxy_update_(w8, a8, b, r)
        print(f"update N={N} K={K} r={r} full_incl_copy={us(full):.2f} copy={us(lambda: b.copy_(b0)):.2f}", flush=True)
