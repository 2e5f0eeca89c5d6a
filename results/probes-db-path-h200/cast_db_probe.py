"""Probe (H200 runs cast-db-run2/3.txt; run it as PYTHONPATH=$PWD python results/probes-db-path-h200/cast_db_probe.py): old (amax + cast+transpose + cuBLAS dB) vs fused (amax + cast rows + dB). H200, CUDA graphs."""
import torch
from triton.testing import do_bench_cudagraph as bench
from falqon_core import fp8
from falqon_core.kernels.cast_db import CastDbConfig, launch_quantize_db, quantize_db_reference, db_gemm_reference
from falqon_core.kernels.quantize import quantize_fp8
from falqon_core.kernels.quantize_transpose import quantize_transpose_fp8
from falqon_core.methods.falqon import fp8_matmul_nt

shapes = [(4096, 4096, 64), (2048, 4096, 64), (3000, 4096, 24), (4096, 11008, 64), (4096, 1024, 64), (2048, 1024, 40),
          (4096, 4096, 256), (9999, 4096, 16), (16384, 1024, 64), (512, 4096, 64), (4096, 14336, 8), (4096, 4096, 8)]
C = CastDbConfig
cfgs = [C(), C(programs_per_sm=2), C(block_m=64), C(block_m=64, programs_per_sm=2), C(block_m=128), C(block_n=128),
        C(block_n=128, programs_per_sm=2), C(block_n=128, block_m=64), C(block_n=256, warps_small_r=8, warps_large_r=8),
        C(warps_small_r=8), C(max_block_r=64), C(max_block_r=128)]
for m, n, r in shapes:
    r_pad, m_pad = -(-r // 16) * 16, -(-m // 16) * 16
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    oa = torch.zeros(r_pad, m_pad, device="cuda")
    oa[:r, :m] = torch.randn(r, m, device="cuda") * 5
    oa8_t = oa.to(fp8.E4M3)
    oa_scale = torch.tensor(0.01, device="cuda")
    def old():
        dy8, dy8_t, s = quantize_transpose_fp8(g, fp8.E5M2, 16, keep_rows=True)
        return fp8_matmul_nt(dy8_t, s, oa8_t, oa_scale, torch.float32)[:, :r]
    want = old()
    t_old = bench(old, rep=100)
    t_cast = bench(lambda: quantize_fp8(g, fp8.E5M2, "tensorwise"), rep=100)
    print(f"M{m} N{n} r{r}: old {t_old*1e3:.1f} us; quantize rows only {t_cast*1e3:.1f}")
    best = None
    for c in cfgs:
        try:
            dy8, s, db = launch_quantize_db(g, oa8_t, oa_scale, r, fp8.E5M2, True, c)
            ref = db_gemm_reference(dy8, s, oa8_t, oa_scale, r)
            err = float(((db - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max())
            errc = float(((want - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max())
            t = bench(lambda: launch_quantize_db(g, oa8_t, oa_scale, r, fp8.E5M2, True, c), rep=100)
            best = min(best or 1e9, t)
            print(f"   {c}: {t*1e3:.1f} us, rel err vs fp32 ref {err:.1e} (cuBLAS {errc:.1e})")
        except Exception as e:
            print(f"   {c}: FAILED {type(e).__name__}: {str(e)[:300]}")
    print(f"  => best fused {best*1e3:.1f} vs old {t_old*1e3:.1f} us")
