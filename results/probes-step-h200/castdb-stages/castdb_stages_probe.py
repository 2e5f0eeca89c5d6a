"""cast_db's launch config: Triton pipelining depth (num_stages) and token block, standalone by CUDA-graph replay
(partials given, as in the falqon backward), then the falqon step A/B of the best against the default."""
import dataclasses, statistics, sys, torch
from collections import defaultdict
from triton.testing import do_bench_cudagraph as bench
from falqon_core import fp8
from falqon_core.kernels import cast_db
from falqon_core.kernels.cast_db import CastDbConfig, launch_quantize_db
from falqon_core.kernels.quantize import partial_amax
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

C = CastDbConfig
cfgs = [C(), C(num_stages=1), C(num_stages=2), C(num_stages=3), C(num_stages=4), C(block_m=64, num_stages=2),
        C(block_m=64, num_stages=3), C(block_m=16, num_stages=3), C(programs_per_sm=2, num_stages=3),
        C(programs_per_sm=8, num_stages=2), C(programs_per_sm=2, num_stages=4), C(block_m=64, programs_per_sm=2, num_stages=3),
        C(block_n=128, num_stages=3), C(block_n=128, block_m=64, num_stages=3), C(programs_per_sm=8), C(block_m=64)]
total = defaultdict(float)
for m, n, r in [(2048, 4096, 64), (2048, 4096, 40), (3000, 4096, 48), (4096, 4096, 64), (2048, 11008, 64), (4096, 14336, 8)]:
    r_pad, m_pad = -(-r // 16) * 16, -(-m // 16) * 16
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    oa = torch.zeros(r_pad, m_pad, device="cuda"); oa[:r, :m] = torch.randn(r, m, device="cuda") * 5
    oa8_t, oa_scale = oa.to(fp8.E4M3), torch.tensor(0.01, device="cuda")
    parts = partial_amax(g.view(-1))
    want = launch_quantize_db(g, oa8_t, oa_scale, r, fp8.E5M2, True, C(), partials=parts)
    line = []
    for i, c in enumerate(cfgs):
        got = launch_quantize_db(g, oa8_t, oa_scale, r, fp8.E5M2, True, c, partials=parts)
        same8 = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
        t = bench(lambda: launch_quantize_db(g, oa8_t, oa_scale, r, fp8.E5M2, True, c, partials=parts), rep=60) * 1e3
        total[i] += t / (m * n) * 2048 * 4096
        line.append(f"c{i} {t:5.1f}{'' if same8 else '!'}")
    print(f"M{m} N{n} r{r}: " + "  ".join(line), flush=True)
for i, c in enumerate(cfgs):
    print(f"c{i} {c}  size-normalised sum {total[i]:.1f}")
best = min(range(len(cfgs)), key=lambda i: total[i])
print("best", best, cfgs[best], flush=True)
for spec in sys.argv[1:]:
    K, N, r, M = (int(v) for v in spec.split(","))
    res = defaultdict(list)
    for rnd in range(3):
        for name, c in (("default", C()), ("best", cfgs[best])):
            cast_db.CAST_DB_CONFIG = c
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            s = time_cudagraph(w.step, device="cuda", warmup_ms=50, budget_ms=300)
            res[name].append(statistics.median(s) * 1e3)
            del w; torch.cuda.empty_cache()
    print(f"K {K} N {N} r {r} M {M}: default {min(res['default']):.1f} best {min(res['best']):.1f} ratio {min(res['best'])/min(res['default']):.3f}", flush=True)
cast_db.CAST_DB_CONFIG = C()
