"""How much of a layer step's gpu_ms is the CUDA graph's own start, not the step's kernels?

Per cell and method, 3 interleaved rounds of four timings (us per step, median of samples):
  one     time_cudagraph as the suite runs it: events around one replay of a one-step graph
  x10rep  events around 10 back-to-back replays of the one-step graph, / 10
  sleep   a 200 us device sleep queued before each sample's start event, then one replay (the host's launch
          latency hidden behind the sleep; what is left is the device's own start of the graph)
  g10     a graph that captures 10 steps back to back; events around one replay, / 10 (steps joined as in a model)
"""
import statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph, capture_graph

def med_events(run, n_samples=60, pre=None):
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_samples)]
    for s, e in evs:
        if pre: pre()
        s.record(); run(); e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in evs) * 1e3

cells = [(4096, 4096, 40, 2048), (4096, 1024, 40, 2048), (4096, 11008, 64, 4096), (4096, 4096, 64, 512)]
methods = ["falqon", "bf16_lora", "halo_lora"]
cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1e3 * 200e-6) if hasattr(torch.cuda.get_device_properties(0), "clock_rate") else 400000
for K, N, r, M in cells:
    for m in methods:
        res = defaultdict(list)
        for _ in range(3):
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method=m, options={}), "cuda")
            res["one"].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=200)) * 1e3)
            g = capture_graph(w.step, "cuda", 20)
            g.replay(); torch.cuda.synchronize()
            res["x10rep"].append(med_events(lambda: [g.replay() for _ in range(10)], 30) / 10)
            res["sleep"].append(med_events(g.replay, 60, pre=lambda: torch.cuda._sleep(cycles)))
            g10 = capture_graph(lambda: [w.step() for _ in range(10)], "cuda", 20)
            g10.replay(); torch.cuda.synchronize()
            res["g10"].append(med_events(g10.replay, 30) / 10)
            del g, g10, w; torch.cuda.empty_cache()
        base = min(res["one"])
        print(f"{m:10s} K {K} N {N:5d} r {r:3d} M {M:5d}: " + " ".join(f"{k} {min(v):7.1f} ({min(v)-base:+5.1f})" for k, v in res.items()), flush=True)
