"""Default proxy update, unfused (norms by torch, select, merge, B.zero_) vs fused (row_select), side by side."""
import torch
from triton.testing import do_bench_cudagraph
from falqon_core import fp8
from falqon_core.kernels.proxy_update import proxy_update_triton_
torch.manual_seed(0)
print(f"{'N':>6} {'K':>6} {'r':>4} {'unfused us':>11} {'fused us':>9} {'refill us':>9}")
for n, kd in [(1024, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]:
    for r in (16, 64):
        w8 = (torch.randn(n, kd, device="cuda") * 64).to(fp8.E4M3)
        a8 = (torch.randn(r, kd, device="cuda") * 20).to(fp8.E4M3)
        b0 = torch.randn(n, r, device="cuda") * 0.3
        b = b0.clone()
        t = {}
        t["refill"] = do_bench_cudagraph(lambda: b.copy_(b0), rep=50)
        for name, fused in (("unfused", False), ("fused", True), ("unfused2", False), ("fused2", True)):
            t[name] = do_bench_cudagraph(lambda: (b.copy_(b0), proxy_update_triton_(w8, a8, b, r, fused_select=fused)), rep=50)
        us = lambda x: (t[x] - t["refill"]) * 1000
        print(f"{n:>6} {kd:>6} {r:>4} {us('unfused'):>6.2f}/{us('unfused2'):<5.2f} {us('fused'):>5.2f}/{us('fused2'):<5.2f} {t['refill']*1000:>7.2f}")
