"""Per-kernel device time inside one training step (torch.profiler), for falqon option sets.

No argument: default, variant, default + cache_weight_t (step_kernels.txt). Argument `vcache`: default, variant,
variant + cache_weight_t (variant-cache-flush/step_kernels.txt)."""
import json, sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload
VARIANT = {"a_scale": "kaiming", "rounding": "stochastic", "flush_every": 1}
opts = {"default": {}, "variant": VARIANT}
if sys.argv[1:] == ["vcache"]:
    opts["vcache"] = dict(VARIANT, cache_weight_t=True)
else:
    opts["cache"] = {"cache_weight_t": True}
layers = {"attn": (4096, 4096), "up": (4096, 11008), "down": (11008, 4096)}
for lname, (K, N) in layers.items():
    for rank in (16, 64):
        for oname, o in opts.items():
            w = build_workload(dict(K=K, N=N, rank=rank, tokens=4096, method="falqon", options=o), "cuda")
            for _ in range(5): w.step()
            torch.cuda.synchronize()
            steps = 10
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps): w.step()
                torch.cuda.synchronize()
            acc = defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    acc[e.name[:50]] += e.device_time / steps
            tot = sum(acc.values())
            print(f"== {lname} r{rank} {oname}: kernels total {tot:.1f} us")
            for n, us in sorted(acc.items(), key=lambda t: -t[1]):
                if us >= 0.5: print(f"   {us:7.1f}  {n}")
            del w; torch.cuda.empty_cache()
