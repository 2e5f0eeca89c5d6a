"""Per-kernel device time inside one training step (torch.profiler over 10 eager steps after 5), for falqon option sets.

No argument: default, variant, default + cache_weight_t at llama-7b attn / up / down, r 16 / 64, 4096 tokens
(step_kernels.txt). Argument `vcache`: default, variant, variant + cache_weight_t (variant-cache-flush/step_kernels.txt).
Arguments `points K,N,r,M ...`: default falqon at those points, with each kernel's launches per step
(flush-floor/probe-output.txt)."""
import sys, torch
from collections import defaultdict
from falqon_bench.measure.workload import build_workload


def profile(K, N, rank, tokens, options, title, steps=10):
    w = build_workload(dict(K=K, N=N, rank=rank, tokens=tokens, method="falqon", options=options), "cuda")
    for _ in range(5): w.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps): w.step()
        torch.cuda.synchronize()
    acc, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name[:50]] += e.device_time / steps
            calls[e.name[:50]] += 1
    print(f"== {title}: kernels total {sum(acc.values()):.1f} us")
    for n, us in sorted(acc.items(), key=lambda t: -t[1]):
        if us >= 0.3: print(f"   {us:7.1f}  x{calls[n] // steps}  {n}")
    del w; torch.cuda.empty_cache()


if sys.argv[1:2] == ["points"]:
    for spec in sys.argv[2:]:
        K, N, r, M = (int(v) for v in spec.split(","))
        profile(K, N, r, M, {}, f"K {K} N {N} r {r} M {M}")
    sys.exit()
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
            profile(K, N, rank, 4096, o, f"{lname} r{rank} {oname}")
