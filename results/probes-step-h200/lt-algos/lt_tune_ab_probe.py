"""falqon step A/B: cuBLASLt algorithm timed per shape (cublaslt.TUNE) against the heuristic's first; CUDA-graph
replay, 3 interleaved rounds, min of medians; plans rebuilt for each setting. Prints each GEMM's choice."""
import statistics, torch
from collections import defaultdict
from falqon_core import cublaslt
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

cells = [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 4096, 48, 3000), (4096, 4096, 24, 3000),
         (4096, 4096, 64, 4096), (4096, 11008, 64, 2048), (4096, 11008, 64, 4096), (11008, 4096, 64, 4096),
         (4096, 1024, 40, 2048), (5120, 5120, 16, 4096), (4096, 14336, 64, 3000)]
for K, N, r, M in cells:
    res = defaultdict(list)
    for rnd in range(3):
        for name, tune in (("first", False), ("tuned", True)):
            cublaslt.TUNE = tune
            cublaslt._plans.clear()
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            res[name].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)) * 1e3)
            if tune and rnd == 0:
                picks = [f"{k[1]}x{k[2]}x{k[3]}:{'h' if p is None else p.algo.waves_count:.2f}" for k, p in cublaslt._plans.items() if p is not None]
            del w; torch.cuda.empty_cache()
    a, b = min(res["first"]), min(res["tuned"])
    print(f"K {K:5d} N {N:5d} r {r:3d} M {M:5d}: first {a:7.1f} tuned {b:7.1f} ({b/a:.3f})  waves of picks {picks}", flush=True)
