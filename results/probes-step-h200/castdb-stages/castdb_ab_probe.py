"""falqon step A/B (CUDA-graph replay, 3 interleaved rounds, min of medians) over cast_db launch configs, many cells."""
import statistics, sys, torch
from collections import defaultdict
from falqon_core.kernels import cast_db
from falqon_core.kernels.cast_db import CastDbConfig as C
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

cfgs = {"default": C(), "bm64pps2s3": C(block_m=64, programs_per_sm=2, num_stages=3),
        "bm32pps2s3": C(programs_per_sm=2, num_stages=3), "bm64pps3s3": C(block_m=64, programs_per_sm=3, num_stages=3),
        "bm64pps2s4": C(block_m=64, programs_per_sm=2, num_stages=4)}
cells = [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 4096, 48, 3000), (4096, 4096, 8, 2048),
         (4096, 4096, 64, 4096), (4096, 4096, 64, 8192), (5120, 5120, 64, 2048), (5120, 5120, 16, 4096),
         (4096, 11008, 64, 2048), (4096, 14336, 24, 2048), (5120, 13824, 64, 3000), (11008, 4096, 64, 2048)]
for K, N, r, M in cells:
    res = defaultdict(list)
    for rnd in range(3):
        for name, c in cfgs.items():
            cast_db.CAST_DB_CONFIG = c
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)
            res[name].append(statistics.median(s) * 1e3)
            del w; torch.cuda.empty_cache()
    d = min(res["default"])
    print(f"K {K:5d} N {N:5d} r {r:3d} M {M:4d}: default {d:6.1f} | " +
          "  ".join(f"{k} {min(v):6.1f} ({min(v)/d:.3f})" for k, v in res.items() if k != "default"), flush=True)
cast_db.CAST_DB_CONFIG = C()
