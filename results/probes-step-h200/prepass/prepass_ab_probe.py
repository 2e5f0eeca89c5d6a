"""A/B of W8's transpose in dY's amax launch (kernels/grad_prepass; amax programs after or before the tiles)
against separate launches, side by side in one process, falqon layer step by CUDA-graph replay (min and median over 3 interleaved rounds). Then a kernel profile.
Usage: prepass_ab.py K,N,r,M ..."""
import dataclasses, statistics, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.kernels import cast_db, grad_prepass as gp
from falqon_core.kernels.transpose import transpose_fp8
from falqon_core.methods import falqon as fm

SETTINGS = {"base": (False, True), "amax_last": (True, True), "amax_first": (True, False)}


def apply(name):
    fm.PREPASS, gp.AMAX_LAST = SETTINGS[name]


for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    res = defaultdict(list)
    grads = {}
    for rnd in range(3):
        for name in SETTINGS:
            apply(name)
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w
            torch.cuda.empty_cache()
    line = "  ".join(f"{n} {min(v):7.1f} ({statistics.median(v):7.1f})" for n, v in res.items())
    print(f"K {K} N {N} r {r} M {M}: us min (median of 3 rounds): {line}  last/base {min(res['amax_last']) / min(res['base']):.3f} first/base {min(res['amax_first']) / min(res['base']):.3f}",
          flush=True)

for label in ("base", "amax_last", "amax_first"):
    apply(label)
    for spec in (sys.argv[1], sys.argv[5]):
        K, N, r, M = (int(v) for v in spec.split(","))
        w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
        for _ in range(5): w.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10): w.step()
            torch.cuda.synchronize()
        acc, calls = defaultdict(float), defaultdict(int)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                acc[e.name[:50]] += e.device_time / 10
                calls[e.name[:50]] += 1
        print(f"== profile {label} K {K} N {N} r {r} M {M} (eager): kernels {sum(acc.values()):.1f} us")
        for n, us in sorted(acc.items(), key=lambda t: -t[1]):
            if us >= 0.3: print(f"   {us:7.1f}  x{calls[n] // 10}  {n}")
