"""A/B of falqon.PREPASS (W8's transpose in dY's amax launch) against separate launches, falqon layer step by
CUDA-graph replay, min and median of 3 interleaved rounds. Usage: prepass_ab2.py K,N,r,M ..."""
import statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.methods import falqon as fm

for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    res = defaultdict(list)
    for rnd in range(3):
        for name, on in (("separate", False), ("prepass", True)):
            fm.PREPASS = on
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w
            torch.cuda.empty_cache()
    line = "  ".join(f"{n} {min(v):7.1f} ({statistics.median(v):7.1f})" for n, v in res.items())
    print(f"K {K} N {N} r {r} M {M}: us min (median of 3 rounds): {line}  prepass/separate {min(res['prepass']) / min(res['separate']):.3f}", flush=True)
