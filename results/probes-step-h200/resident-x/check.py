"""resident quantize on the GPU: bit-identity vs the two launches (eager and graph replay), compiled regs/spills,
and the kernel alone timed by graph replay (x warm in L2, and cold after a flush)."""
import statistics, torch
from falqon_core import fp8
from falqon_core.kernels import quantize as q
from falqon_core.kernels import quantize_resident as qr
from falqon_bench.measure.timing import time_cudagraph, capture_graph

torch.manual_seed(0)
for M, K in [(2048, 4096), (1024, 4096), (512, 4096), (2000, 4096), (100, 4096), (7, 6), (2048, 4224), (3000, 4096), (1024, 14336)]:
    x = (torch.randn(M, K, device="cuda") * 2).to(torch.bfloat16)
    x[M // 2, K // 3] = -700.0
    for dt in (fp8.E4M3, fp8.E5M2):
        q.RESIDENT = True; a, sa = q.quantize_fp8_triton(x, dt, "tensorwise")
        q.RESIDENT = False; b, sb = q.quantize_fp8_triton(x, dt, "tensorwise")
        ref, sr = fp8.quantize(x, dt, "tensorwise")
        plan = qr.resident_plan(x.numel(), torch.cuda.get_device_properties(0).multi_processor_count)
        print(f"M {M} K {K} {dt}: plan {plan} equal-2launch {torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)} "
              f"equal-ref {torch.equal(a.view(torch.uint8), ref.view(torch.uint8)) and torch.equal(sa, sr)}", flush=True)
# graph replay: same bits, barrier reused over many replays
q.RESIDENT = True
x = (torch.randn(2048, 4096, device="cuda")).to(torch.bfloat16)
outs = {}
def f():
    outs["r"] = q.quantize_fp8_triton(x, fp8.E4M3, "tensorwise")
g = capture_graph(f, "cuda", 5)
for i in range(200):
    x.copy_(torch.randn_like(x, dtype=torch.float32) * (1 + i % 7))
    g.replay()
    ref, sr = fp8.quantize(x, fp8.E4M3, "tensorwise")
    if not (torch.equal(outs["r"][0].view(torch.uint8), ref.view(torch.uint8)) and torch.equal(outs["r"][1], sr)):
        print("graph replay MISMATCH at", i); break
else:
    print("graph replay: 200 replays bit-identical")
for dev, cache in qr._resident_quantize_kernel.device_caches.items():
    for key, k in cache[0].items():
        print("compiled:", "n_regs", k.n_regs, "n_spills", k.n_spills, "warps", k.metadata.num_warps, "shared", k.metadata.shared)
# alone
for M, K in [(2048, 4096), (1024, 4096), (512, 4096)]:
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    for cache in ("warm", "cold"):
        res = {}
        for rnd in range(3):
            for name, flag in (("two", False), ("one", True)):
                q.RESIDENT = flag
                s = time_cudagraph(lambda: q.quantize_fp8_triton(x, fp8.E4M3, "tensorwise"), device="cuda", warmup_ms=20, budget_ms=150, cache=cache)
                res.setdefault(name, []).append(statistics.median(s) * 1e3)
        print(f"alone M {M} K {K} {cache}: two {min(res['two']):.2f} us  one {min(res['one']):.2f} us", flush=True)
q.RESIDENT = True
