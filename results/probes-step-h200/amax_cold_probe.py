"""partial_amax launch configs on cold inputs (rotating buffers > L2), as the layer step sees x and dY."""
import itertools, sys, torch, triton
from triton.testing import do_bench_cudagraph
from falqon_core.kernels.quantize import launch_partial_amax
from falqon_core.kernels.quantize_configs import FlatConfig, config_for
torch.manual_seed(0)
SHAPES = [(2048, 4096), (4096, 4096), (3000, 4096), (4096, 11008), (2048, 1024), (4096, 1024)]
GRID = list(itertools.product([4096, 8192, 16384], [4, 8, 16], [2, 4, 8, 16], [None, 3]))
def bench(fn, reps):
    return do_bench_cudagraph(fn, rep=25) * 1000 / reps  # us per launch
for shape in SHAPES:
    nbytes = shape[0] * shape[1] * 2
    R = max(4, -(-400_000_000 // nbytes))
    bufs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16).view(-1) for _ in range(R)]
    ref = [launch_partial_amax(b, FlatConfig()).max() for b in bufs]
    cur = config_for("partial_amax", 1, bufs[0].numel())
    t_cur = bench(lambda: [launch_partial_amax(b, cur) for b in bufs], R)
    t_warm = bench(lambda: [launch_partial_amax(bufs[0], cur) for _ in bufs], R)
    t_torch = bench(lambda: [torch.amax(b) for b in bufs], R)
    res = []
    for blk, w, pps, st in GRID:
        cfg = FlatConfig(block=blk, num_warps=w, programs_per_sm=pps, num_stages=st)
        try:
            ok = all(launch_partial_amax(b, cfg).max() == r for b, r in zip(bufs[:2], ref[:2]))
            t = bench(lambda: [launch_partial_amax(b, cfg) for b in bufs], R)
        except Exception as e:  # noqa
            print("  fail", cfg, type(e).__name__); continue
        res.append((t, cfg, ok))
    res.sort(key=lambda t: t[0])
    print(f"== {shape} {nbytes/1e6:.1f} MB, {R} buffers: current {cur} cold {t_cur:.2f} us ({nbytes/t_cur/1e6:.2f} TB/s), "
          f"warm {t_warm:.2f}, torch.amax cold {t_torch:.2f} ({nbytes/t_torch/1e6:.2f} TB/s)")
    for t, cfg, ok in res[:6]:
        print(f"   {t:7.2f} us {nbytes/t/1e6:5.2f} TB/s  block={cfg.block} warps={cfg.num_warps} pps={cfg.programs_per_sm} stages={cfg.num_stages} same={ok}")
    del bufs; torch.cuda.empty_cache()

print("\n# amax (current config) + cast_tensorwise config, cold rotating buffers: time of the pair, us")
from falqon_core.kernels.quantize import launch_cast_tensorwise
E4 = torch.float8_e4m3fn
CGRID = list(itertools.product([2048, 4096, 8192], [4, 8], [4, 8, 16], [None, 3]))
for shape in [(2048, 4096), (4096, 4096), (4096, 11008)]:
    nbytes = shape[0] * shape[1] * 2
    R = max(4, -(-400_000_000 // nbytes))
    bufs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
    acur = config_for("partial_amax", 1, bufs[0].numel()); ccur = config_for("cast_tensorwise", 1, bufs[0].numel())
    pair = lambda cc: [launch_cast_tensorwise(b, launch_partial_amax(b.view(-1), acur), E4, None, cc) for b in bufs]
    ref = [o[0].view(torch.uint8).clone() for o in pair(ccur)[:2]]
    t_cur = bench(lambda: pair(ccur), R)
    res = []
    for blk, w, pps, st in CGRID:
        cc = FlatConfig(block=blk, num_warps=w, programs_per_sm=pps, num_stages=st)
        outs = pair(cc)
        ok = all(torch.equal(o[0].view(torch.uint8), r) for o, r in zip(outs[:2], ref))
        res.append((bench(lambda: pair(cc), R), cc, ok))
    res.sort(key=lambda t: t[0])
    print(f"== {shape}: current cast {ccur}: pair {t_cur:.2f} us")
    for t, cc, ok in res[:5]:
        print(f"   {t:7.2f} us  block={cc.block} warps={cc.num_warps} pps={cc.programs_per_sm} stages={cc.num_stages} same={ok}")
    del bufs; torch.cuda.empty_cache()
