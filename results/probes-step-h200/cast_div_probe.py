"""Is the tensorwise e4m3 cast (x / scale, clamp, cvt) compute-bound on the H200? Variants of the cast launch,
each timed alone by CUDA-graph replay with x resident in L2 (as after the amax pass), 2048 x 4096 and 4096 x 4096
bf16: the project's kernel (IEEE div_rn + NaN-propagating clamp + cvt.rn.satfinite), a reciprocal multiply, no
clamp (cvt.satfinite saturates by itself), both, and a bare convert (no scale) as the floor of the pass."""
import torch, triton, triton.language as tl
from falqon_core import fp8
from falqon_core.kernels import quantize as q
from falqon_core.kernels.quantize_configs import config_for


@triton.jit
def _cast_variant(x_ptr, inv_ptr, scale_ptr, out_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    inv = tl.load(inv_ptr)
    n_blocks = tl.cdiv(n, BLOCK)
    for i in tl.range(pid, n_blocks, tl.num_programs(0)):
        offs = (n_blocks - 1 - i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            y = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        elif MODE == 1:
            y = tl.clamp(x * inv, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        elif MODE == 2:
            y = tl.math.div_rn(x, scale)
        elif MODE == 3:
            y = x * inv
        else:
            y = x
        tl.store(out_ptr + offs, y.to(tl.float8e4nv), mask=m)


for M, K in ((2048, 4096), (4096, 4096), (4096, 11008)):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    n = x.numel()
    ref, scale = q.quantize_fp8_reference(x, fp8.E4M3)
    inv = (1.0 / scale).float().reshape(())
    parts = q.partial_amax(x.view(-1))
    cfg = config_for("cast_tensorwise", 1, n, False)
    t = triton.testing.do_bench_cudagraph(lambda: q.cast_tensorwise_from_partials(x, parts, fp8.E4M3), rep=200) * 1e3
    print(f"{M} x {K}: project cast launch {t:.2f} us (block {cfg.block}, warps {cfg.num_warps}, {cfg.programs_per_sm}/SM)")
    t = triton.testing.do_bench_cudagraph(lambda: q.partial_amax(x.view(-1)), rep=200) * 1e3
    print(f"{M} x {K}: project amax launch {t:.2f} us")
    out = torch.empty(M, K, device="cuda", dtype=fp8.E4M3)
    for block, warps, per_sm in ((cfg.block, cfg.num_warps, cfg.programs_per_sm), (4096, 8, 4), (8192, 8, 4)):
        progs = min(triton.cdiv(n, block), 132 * per_sm)
        for mode, name in enumerate(("div_rn+clamp", "mul+clamp", "div_rn", "mul", "convert only")):
            f = lambda: _cast_variant[(progs,)](x, inv, scale, out, n, MODE=mode, BLOCK=block, num_warps=warps)
            f(); torch.cuda.synchronize()
            same = "" if mode == 4 else f" same bytes as reference: {torch.equal(out.view(torch.uint8), ref.view(torch.uint8))}"
            t = triton.testing.do_bench_cudagraph(f, rep=200) * 1e3
            print(f"  block {block} w{warps} {per_sm}/SM {name:>13}: {t:6.2f} us ({3 * n / t / 1e6:.2f} TB/s){same}")
