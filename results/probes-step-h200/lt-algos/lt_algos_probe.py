"""cuBLASLt's workspace-free algorithms beyond the heuristic's first, for the falqon step's fp8 GEMMs: each timed
by CUDA-graph replay (do_bench_cudagraph), 3 interleaved rounds, min; same output bits checked against algo 0."""
import ctypes, torch
from triton.testing import do_bench_cudagraph as bench
from falqon_core import cublaslt as lt

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
COUNT = 12
assert lt.available()

def plans_for(a, b, out_dtype, fast):
    m, k = a.shape; n = b.shape[0]
    out = torch.empty((m, n), device="cuda", dtype=out_dtype)
    aligns = tuple(lt.alignment(t.data_ptr()) for t in (b, a, out, out))
    key = (0, m, n, k, lt._CUDA_TYPES[a.dtype], lt._CUDA_TYPES[b.dtype], lt._CUDA_TYPES[out_dtype], aligns, fast)
    base = lt._make_plan(key)  # builds desc + layouts; now ask for COUNT algorithms
    lib = lt._lib
    pref = ctypes.c_void_p(); lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref))
    lt._set(lib.cublasLtMatmulPreferenceSetAttribute, pref, lt._PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(0))
    for attr, value in zip(lt._PREF_MIN_ALIGNMENT, aligns):
        lt._set(lib.cublasLtMatmulPreferenceSetAttribute, pref, attr, ctypes.c_uint32(value))
    res = (lt._HeuristicResult * COUNT)(); cnt = ctypes.c_int(0)
    st = lib.cublasLtMatmulAlgoGetHeuristic(lt._handle(0), base.desc, *base.layouts, base.layouts[2], pref,
                                            ctypes.c_int(COUNT), res, ctypes.byref(cnt))
    assert st == 0
    out = []
    for i in range(cnt.value):
        if res[i].state == 0 and res[i].workspace_size == 0:
            r = lt._HeuristicResult(); ctypes.memmove(ctypes.byref(r), ctypes.byref(res[i]), ctypes.sizeof(r))
            out.append((i, res[i].waves_count, lt._Plan(base.desc, base.layouts, r)))
    return key, out

def cell(name, m, k, n, at, bt, out_dtype, fast):
    a = (torch.randn(m, k, device="cuda") * 2).to(at); b = (torch.randn(n, k, device="cuda") * 2).to(bt)
    s1, s2 = torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda")
    key, plans = plans_for(a, b, out_dtype, fast)
    times = {i: [] for i, _, _ in plans}
    ref = None
    for rnd in range(3):
        for i, w, p in plans:
            lt._plans[key] = p
            o = lt._matmul(a, s1, b, s2, out_dtype, fast)
            if ref is None: ref = o.clone()
            times[i].append(bench(lambda: lt._matmul(a, s1, b, s2, out_dtype, fast), rep=60) * 1e3)
    lt._plans.pop(key, None)
    t0 = min(times[plans[0][0]])
    line = "  ".join(f"#{i} {min(times[i]):.1f}({min(times[i])/t0:.3f}, w{w:.2f})" for i, w, _ in plans)
    print(f"{name:28s} M{m} K{k} N{n}: {line}", flush=True)

for M in (2048, 3000, 4096):
    cell(f"attn fwd r48", M, 4096, 4144, E4, E4, torch.bfloat16, True)
    cell(f"attn dX", M, 4096, 4096, E5, E4, torch.bfloat16, False)
cell("attn fwd r64", 2048, 4096, 4160, E4, E4, torch.bfloat16, True)
cell("kv fwd r48", 2048, 4096, 1072, E4, E4, torch.bfloat16, True)
cell("kv dX", 2048, 1024, 4096, E5, E4, torch.bfloat16, False)
cell("kv dB", 1024, 2048, 48, E5, E4, torch.float32, False)
cell("up fwd r64", 2048, 4096, 11072, E4, E4, torch.bfloat16, True)
cell("up dX", 2048, 11008, 4096, E5, E4, torch.bfloat16, False)
cell("down fwd r64", 2048, 11008, 4160, E4, E4, torch.bfloat16, True)
cell("down dX", 2048, 4096, 11008, E5, E4, torch.bfloat16, False)
