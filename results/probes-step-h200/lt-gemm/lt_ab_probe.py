"""A/B of fp8.WORKSPACE_FREE_GEMM (falqon_core/cublaslt.py: cuBLASLt with no workspace) against torch._scaled_mm,
one layer step by CUDA-graph replay, min and median of 3 interleaved rounds. Usage: lt_ab.py method:K,N,r,M ..."""
import statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core import fp8

for spec in sys.argv[1:]:
    method, dims = spec.split(":")
    K, N, r, M = (int(v) for v in dims.split(","))
    res = defaultdict(list)
    for rnd in range(3):
        for name, on in (("scaled_mm", False), ("no-workspace", True)):
            fp8.WORKSPACE_FREE_GEMM = on
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method=method, options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w
            torch.cuda.empty_cache()
    line = "  ".join(f"{n} {min(v):7.1f} ({statistics.median(v):7.1f})" for n, v in res.items())
    print(f"{method} K {K} N {N} r {r} M {M}: us min (median of 3 rounds): {line}  ratio {min(res['no-workspace']) / min(res['scaled_mm']):.3f}", flush=True)
