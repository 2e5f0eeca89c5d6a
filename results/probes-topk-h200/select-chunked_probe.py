"""The default update's row select alone: one rank select over N rows vs the chunked select (H200, CUDA-graph
replay of norms + select, B re-filled each replay so every select sees the same norms)."""
import torch, triton
from falqon_core.kernels.row_select import take_top_rows_triton_
from falqon_core.kernels.proxy_update import proxy_update_triton_
for n in (1024, 4096, 11008, 14336):
    for k in (8, 16, 64, 256):
        src = torch.randn(n, k, device="cuda")
        b = src.clone()
        res = []
        for chunked in (False, True):
            if chunked is False and n > 12288:
                res.append(float("nan")); continue
            def go():
                b.copy_(src)
                take_top_rows_triton_(b, k, chunked=chunked)
            res.append(triton.testing.do_bench_cudagraph(go, rep=100) * 1e3)
        fill = triton.testing.do_bench_cudagraph(lambda: b.copy_(src), rep=100) * 1e3
        print(f"N {n:>6} k=r {k:>3}: rank {res[0]:6.1f} us, chunked {res[1]:6.1f} us (incl. a B refill of {fill:.1f} us)")
