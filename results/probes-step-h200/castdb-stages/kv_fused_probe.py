"""kv layers: db_path auto (transposed) against fused with the current cast_db config; falqon step, 3 rounds."""
import statistics, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

for K, N, r, M in [(4096, 1024, 40, 2048), (4096, 1024, 64, 2048), (4096, 1024, 24, 3000), (4096, 1024, 8, 4096)]:
    res = defaultdict(list)
    for rnd in range(3):
        for path in ("auto", "fused"):
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={"db_path": path}), "cuda")
            res[path].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)) * 1e3)
            del w; torch.cuda.empty_cache()
    a, f = min(res["auto"]), min(res["fused"])
    print(f"kv K {K} N {N} r {r} M {M}: auto {a:.1f} fused {f:.1f} ({f/a:.3f})", flush=True)
