"""A/B of the step's launch changes: programmatic dependent launch (FALQON_PDL) and the one-launch tensorwise
quantize (quantize.ONE_LAUNCH), side by side in one process, falqon layer step by CUDA-graph replay (median of
samples; the four settings interleaved over rounds). Then a kernel profile of the step with both on.
Usage: launch_ab.py K,N,r,M ..."""
import os, sys, statistics, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph
from falqon_core.kernels import quantize as q

SETTINGS = {"base": ("0", False), "pdl": ("1", False), "one": ("0", True), "both": ("1", True)}


def apply(name):
    pdl, one = SETTINGS[name]
    os.environ["FALQON_PDL"] = pdl
    q.ONE_LAUNCH = one




for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    res = defaultdict(list)
    for rnd in range(3):
        for name in SETTINGS:
            apply(name)
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w
            torch.cuda.empty_cache()
    line = "  ".join(f"{n} {min(v):7.1f} ({statistics.median(v):7.1f})" for n, v in res.items())
    print(f"K {K} N {N} r {r} M {M}: us min (median of 3 rounds): {line}  both/base {min(res['both']) / min(res['base']):.3f}",
          flush=True)

apply("both")
for spec in sys.argv[1:2]:
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
    print(f"== profile K {K} N {N} r {r} M {M} (pdl + one launch, eager): kernels {sum(acc.values()):.1f} us")
    for n, us in sorted(acc.items(), key=lambda t: -t[1]):
        if us >= 0.3: print(f"   {us:7.1f}  x{calls[n] // 10}  {n}")
