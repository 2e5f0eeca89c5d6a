"""falqon step A/B at the cells a sweep flagged: the previous cast_db default (32-token tiles, 4 programs per SM,
Triton's default stages) against the current one; CUDA-graph replay, 3 interleaved rounds, min of medians."""
import statistics, torch
from collections import defaultdict
from falqon_core.kernels import cast_db
from falqon_core.kernels.cast_db import CastDbConfig as C
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

cfgs = {"previous": C(block_m=32, programs_per_sm=4, num_stages=None), "current": C()}
cells = [(5120, 13824, 24, 3000), (5120, 5120, 24, 3000), (4096, 11008, 24, 3000), (4096, 11008, 64, 4096),
         (4096, 14336, 24, 3000), (4096, 4096, 24, 3000)]
for K, N, r, M in cells:
    res = defaultdict(list)
    for rnd in range(3):
        for name, c in cfgs.items():
            cast_db.CAST_DB_CONFIG = c
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            res[name].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)) * 1e3)
            del w; torch.cuda.empty_cache()
    a, b = min(res["previous"]), min(res["current"])
    print(f"K {K:5d} N {N:5d} r {r:3d} M {M:5d}: previous {a:7.1f} current {b:7.1f} ({b/a:.3f})", flush=True)
