"""Kernel timeline of one falqon layer step under CUDA-graph replay: each kernel in launch order with its device
time and the gap before it (median over profiled replays). Usage: timeline.py K,N,r,M ..."""
import statistics, sys, torch
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import capture_graph, time_cudagraph

REPLAYS = 20
for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
    s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
    g = capture_graph(w.step, "cuda", 20)
    for _ in range(5): g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            g.replay()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    n = len(ev) // REPLAYS
    rows = []
    for i in range(n):
        durs, gaps = [], []
        for rep in range(1, REPLAYS):
            e = ev[rep * n + i]; p = ev[rep * n + i - 1]
            durs.append(e.time_range.end - e.time_range.start)
            gaps.append(e.time_range.start - p.time_range.end)
        rows.append((ev[i].name[:60], statistics.median(durs), statistics.median(gaps)))
    tot = sum(d for _, d, _ in rows); gap = sum(g for _, _, g in rows)
    print(f"== K {K} N {N} r {r} M {M}: graph step {statistics.median(s)*1e3:.1f} us; {n} kernels, busy {tot:.1f}, gaps {gap:.1f}")
    for name, d, g in rows:
        print(f"   gap {g:5.1f}  {d:6.1f}  {name}")
    del w, g; torch.cuda.empty_cache()
