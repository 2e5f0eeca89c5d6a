"""Does cuBLASLt's workspace setting decide the memset + ~3.5 us gap before falqon's dX GEMM in graph replay?
Run once per CUBLASLT_WORKSPACE_SIZE (KiB) value by the caller. Prints: the dX GEMM alone in a graph (kernels,
gaps), then the falqon step by graph replay (min of 3) at the given points."""
import os, statistics, sys, torch
from falqon_bench.measure.timing import capture_graph, time_cudagraph
from falqon_bench.measure.workload import build_workload

ws = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "default")


def timeline(fn, reps=20):
    g = capture_graph(fn, "cuda", 20)
    for _ in range(5): g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps): g.replay()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    n = len(ev) // reps
    out = []
    for i in range(n):
        d = statistics.median(ev[r * n + i].time_range.end - ev[r * n + i].time_range.start for r in range(1, reps))
        gp = statistics.median(ev[r * n + i].time_range.start - ev[r * n + i - 1].time_range.end for r in range(1, reps))
        out.append(f"gap {gp:4.1f} {d:6.1f} {ev[i].name[:48]}")
    return out


for M, Nred, Kout in ((2048, 4096, 4096), (2048, 1024, 4096), (3000, 4096, 4096)):
    dy8 = torch.randn(M, Nred, device="cuda").to(torch.float8_e5m2)
    wt = torch.randn(Kout, Nred, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    f = lambda: torch._scaled_mm(dy8, wt.t(), one, one, out_dtype=torch.bfloat16)
    s = time_cudagraph(f, device="cuda", warmup_ms=30, budget_ms=200)
    print(f"[ws {ws}] dX GEMM M {M} red {Nred} out {Kout}: {statistics.median(s)*1e3:.1f} us/replay;", " | ".join(timeline(f)))
for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    t = []
    for _ in range(3):
        w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
        t.append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)) * 1e3)
        del w
    print(f"[ws {ws}] falqon K {K} N {N} r {r} M {M}: step min {min(t):.1f} us (median {statistics.median(t):.1f})", flush=True)
