"""A/B of the fused cast + dB's split sum: by each block's last program (CastDbConfig.last_sums, one launch) against
the third reduce launch; at N < 2048 also db_path "fused" (with the last-program sum, at two split targets)
against the transposed path "auto" picks there. One layer step by CUDA-graph replay, min and median of 3
interleaved rounds. Usage: lastsum_ab.py K,N,r,M ..."""
import dataclasses, statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.kernels import cast_db

BASE = cast_db.CastDbConfig()
for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    variants = {"reduce-launch": (dict(last_sums=False), {}), "last-sums": (dict(last_sums=True), {})}
    if N < 2048:
        variants = {"auto(transpose)": (dict(), {}), "fused-reduce": (dict(last_sums=False), {"db_path": "fused"}),
                    "fused-last": (dict(last_sums=True), {"db_path": "fused"}),
                    "fused-last-pps2": (dict(last_sums=True, programs_per_sm=2), {"db_path": "fused"}),
                    "fused-last-pps1": (dict(last_sums=True, programs_per_sm=1), {"db_path": "fused"})}
    res = defaultdict(list)
    for rnd in range(3):
        for name, (cfg, options) in variants.items():
            cast_db.CAST_DB_CONFIG = dataclasses.replace(BASE, **cfg)
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options=options), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w
            torch.cuda.empty_cache()
    first = min(next(iter(res.values())))
    line = "  ".join(f"{n} {min(v):6.1f} ({statistics.median(v):6.1f}) {min(v) / first:.3f}x" for n, v in res.items())
    print(f"K {K} N {N} r {r} M {M}: us min (median of 3 rounds), ratio to the first: {line}", flush=True)
cast_db.CAST_DB_CONFIG = BASE
