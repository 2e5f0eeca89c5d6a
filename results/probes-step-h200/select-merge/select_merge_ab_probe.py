"""A/B of proxy_update.SELECT_MERGE (the chunked select's last launch and the merge as one launch,
falqon_core/kernels/select_merge.py) against the separate launches, falqon layer step by CUDA-graph replay, min
and median of 3 interleaved rounds; then the select + merge kernel's column block (128 vs 64 vs 256) at two points.
Usage: select_merge_ab.py K,N,r,M ..."""
import statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.kernels import proxy_update as pu, select_merge as sm


def step_us(K, N, r, M):
    w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
    s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
    del w
    torch.cuda.empty_cache()
    return statistics.median(s) * 1e3


def ab(spec, variants):
    K, N, r, M = (int(v) for v in spec.split(","))
    res = defaultdict(list)
    for _ in range(3):
        for name, apply in variants.items():
            apply()
            res[name].append(step_us(K, N, r, M))
    base = min(next(iter(res.values())))
    line = "  ".join(f"{n} {min(t):7.1f} ({statistics.median(t):7.1f}) {min(t) / base:.3f}" for n, t in res.items())
    print(f"K {K} N {N} r {r} M {M}: us min (median) ratio-to-first: {line}", flush=True)


def setting(on, cols=128):
    def apply():
        pu.SELECT_MERGE = on
        sm._BLOCK_COLS = cols
    return apply


for spec in sys.argv[1:]:
    ab(spec, {"separate": setting(False), "select+merge": setting(True)})
print("== column block of the select + merge kernel")
for spec in ("4096,4096,64,2048", "4096,11008,64,4096"):
    ab(spec, {"cols128": setting(True, 128), "cols64": setting(True, 64), "cols256": setting(True, 256)})
