"""Does programmatic dependent launch (PDL) shorten a CUDA-graph chain of dependent Triton kernels on the H200?
A chain of 12 kernels, each reading the previous one's output (amax-like read of 16 MB or 4 MB, or a 1 MB copy),
replayed as one graph, with and without launch_pdl=True (+ gdc_wait at the kernel's start)."""
import torch, triton, triton.language as tl


@triton.jit
def _copy_scale(x_ptr, y_ptr, n, USE_GDC: tl.constexpr, BLOCK: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    off = pid * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    x = tl.load(x_ptr + off, mask=m)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y_ptr + off, x * 1.0001, mask=m)


def chain(bufs, pdl, n):
    for i in range(len(bufs) - 1):
        _copy_scale[(triton.cdiv(n, 4096),)](bufs[i], bufs[i + 1], n, USE_GDC=pdl, BLOCK=4096, num_warps=8,
                                            launch_pdl=pdl)


for mb in (1, 4, 16):
    n = mb * (1 << 20) // 2
    bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(13)]
    res = {}
    for pdl in (False, True, False, True):
        chain(bufs, pdl, n); torch.cuda.synchronize()
        ref = bufs[-1].clone()
        t = triton.testing.do_bench_cudagraph(lambda: chain(bufs, pdl, n), rep=300) * 1e3
        ok = torch.equal(ref, bufs[-1])  # same input, same result (no race)
        res.setdefault(pdl, []).append(t)
        print(f"{mb:>3} MB bf16, 12 dependent kernels, pdl={pdl}: {t:.1f} us ({t / 12:.2f} per kernel), result stable {ok}")
    copy_bytes = 2 * mb * (1 << 20)
    print(f"    -> pdl saves {(min(res[False]) - min(res[True])) / 12:.2f} us per kernel; one kernel at 3.3 TB/s = {copy_bytes / 3.3e6:.2f} us")
