"""A/B of falqon.ONE_LAUNCH_OA (O_A's amax and cast in one launch with a grid barrier) against the two launches,
one falqon layer step by CUDA-graph replay, min and median of 3 interleaved rounds. Usage: oa_ab.py K,N,r,M ..."""
import statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.methods import falqon

for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    res = defaultdict(list)
    for rnd in range(3):
        for name, on in (("two-launches", False), ("one-launch", True)):
            falqon.ONE_LAUNCH_OA = on
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w
            torch.cuda.empty_cache()
    line = "  ".join(f"{n} {min(v):6.1f} ({statistics.median(v):6.1f})" for n, v in res.items())
    print(f"K {K} N {N} r {r} M {M}: us min (median of 3 rounds): {line}  ratio {min(res['one-launch']) / min(res['two-launches']):.3f}", flush=True)
falqon.ONE_LAUNCH_OA = True
