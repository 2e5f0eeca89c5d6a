"""(1) falqon's db_path "fused" against "transpose" at narrow outputs (N 1024), (2) the merge kernel's tile and
warps, each as the layer step by CUDA-graph replay, min of 3 interleaved rounds."""
import statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.kernels import proxy_update as pu


def step_us(K, N, r, M, options):
    w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options=options), "cuda")
    s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=250)
    del w
    torch.cuda.empty_cache()
    return statistics.median(s) * 1e3


def ab(points, variants, apply):
    for K, N, r, M in points:
        res = defaultdict(list)
        for _ in range(3):
            for name, v in variants.items():
                res[name].append(apply(v, K, N, r, M))
        base = min(next(iter(res.values())))
        line = "  ".join(f"{n} {min(t):7.1f} ({min(t) / base:.3f})" for n, t in res.items())
        print(f"K {K} N {N} r {r} M {M}: us min of 3 (ratio to first): {line}", flush=True)


print("== db_path at N 1024")
ab([(4096, 1024, 40, 2048), (4096, 1024, 64, 2048), (4096, 1024, 24, 3000), (4096, 1024, 8, 4096),
    (4096, 1024, 128, 4096), (4096, 1024, 64, 16384), (4096, 1024, 64, 512)],
   {"transpose": "transpose", "fused": "fused"}, lambda v, K, N, r, M: step_us(K, N, r, M, {"db_path": v}))


def merge_cfg(v, K, N, r, M):
    pu._BLOCK_ROWS, pu._BLOCK_COLS, pu._MERGE_WARPS = v
    return step_us(K, N, r, M, {})


print("== merge (rows, cols, warps)")
ab([(4096, 1024, 40, 2048), (4096, 4096, 64, 2048), (4096, 11008, 64, 4096), (4096, 4096, 256, 4096)],
   {str(v): v for v in [(16, 128, 4), (16, 64, 4), (16, 64, 2), (16, 256, 4), (16, 256, 8), (32, 128, 4), (16, 32, 2)]},
   merge_cfg)
