"""O_A's amax + cast-transpose (forward of falqon: M x r column slice of the melded GEMM's M x (N + r) output)."""
import itertools, torch
from triton.testing import do_bench_cudagraph
from falqon_core import fp8
from falqon_core.kernels.quantize_transpose import launch_cast_transpose, partial_amax_2d
from falqon_core.kernels.quantize_configs import TileConfig, config_for
N = 4096
GRID = list(itertools.product([32, 64, 128], [16, 32, 64], [1, 2, 4], [None, 4]))
for M in (2048, 4096):
    for r in (8, 16, 24, 64, 100):
        R = 8
        outs = [torch.randn(M, N + r, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
        oas = [o[:, N:] for o in outs]
        cur = config_for("cast_transpose", M, r)
        parts = [partial_amax_2d(o) for o in oas]
        ref = [launch_cast_transpose(o, p, fp8.E4M3, 16, False, None, cur)[1].view(torch.uint8) for o, p in zip(oas, parts)]
        t_amax = do_bench_cudagraph(lambda: [partial_amax_2d(o) for o in oas], rep=20) * 1000 / R
        def t_cast(cfg):
            return do_bench_cudagraph(lambda: [launch_cast_transpose(o, p, fp8.E4M3, 16, False, None, cfg) for o, p in zip(oas, parts)], rep=20) * 1000 / R
        t_cur = t_cast(cur)
        res = []
        for br, bc, w, pps in GRID:
            cfg = TileConfig(block_r=br, block_c=bc, num_warps=w, programs_per_sm=pps)
            same = all(torch.equal(launch_cast_transpose(o, p, fp8.E4M3, 16, False, None, cfg)[1].view(torch.uint8), rf)
                       for o, p, rf in zip(oas[:2], parts[:2], ref[:2]))
            res.append((t_cast(cfg), cfg, same))
        res.sort(key=lambda t: t[0])
        print(f"== M {M} r {r}: amax_2d {t_amax:.2f} us; cast_transpose current {cur} {t_cur:.2f} us")
        for t, cfg, same in res[:4]:
            print(f"    {t:6.2f} us  {cfg} same={same}")
        del outs, oas; torch.cuda.empty_cache()
