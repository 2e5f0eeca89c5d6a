"""falqon step A/B, side by side in one process (run from the repo root, in a git clone):
  before    code c11ced4: O_A's amax and its e4m3 cast as two forward launches
  oa        this code: one forward launch (O_A's partial amax + a compact bf16 O_A^T), the cast in the backward's
            first launch (grad_prepass_oa)
  oa+norms  the chunked row select with the norms inside its first launch (norms-in-select.patch; not kept). Without
            the patch applied this setting runs the same code as "oa", which shows the rounds' spread.
CUDA-graph replay, 3 interleaved rounds, min of the rounds' medians (us). Usage: launches_ab.py [K,N,r,M ...]"""
import ast, importlib.util, statistics, subprocess, sys, tempfile, torch
from pathlib import Path
from collections import defaultdict
from falqon_core.methods import falqon as fm
from falqon_core.kernels import proxy_update
from falqon_core.kernels.grad_prepass import grad_prepass
from falqon_core.kernels.quantize_transpose import quantize_transpose_fp8
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

BEFORE = "c11ced4"


def old_source(path: str) -> str:
    return subprocess.run(["git", "show", f"{BEFORE}:{path}"], check=True, capture_output=True, text=True).stdout


# the autograd.Function as it was, run against today's module namespace plus the two launchers it called
src = old_source("falqon_core/methods/falqon.py")
cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "MeldedLinearFunction")
ns = dict(vars(fm), grad_prepass=grad_prepass, quantize_transpose_fp8=quantize_transpose_fp8)
exec(compile(ast.Module([cls], []), f"falqon_{BEFORE}.py", "exec"), ns)
OldFn, NewFn = ns["MeldedLinearFunction"], fm.MeldedLinearFunction
# the row select module as it was, from a file (Triton's jit reads its kernels' source from one)
old_rs_path = Path(tempfile.mkdtemp()) / f"row_select_{BEFORE}.py"
old_rs_path.write_text(old_source("falqon_core/kernels/row_select.py"))
spec = importlib.util.spec_from_file_location(old_rs_path.stem, old_rs_path)
old_rs = importlib.util.module_from_spec(spec); spec.loader.exec_module(old_rs)
old_take, new_take = old_rs.take_top_rows_triton_, proxy_update.take_top_rows_triton_

settings = {"before": (OldFn, old_take), "oa": (NewFn, old_take), "oa+norms": (NewFn, new_take)}
cells = [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 4096, 24, 3000), (4096, 4096, 48, 3000),
         (4096, 1024, 40, 2048), (4096, 1024, 64, 2048), (4096, 1024, 24, 3000), (4096, 11008, 64, 4096),
         (5120, 5120, 16, 3000), (4096, 1024, 64, 512), (4096, 4096, 8, 4096), (4096, 14336, 100, 2048)]
if len(sys.argv) > 1:
    cells = [tuple(int(v) for v in c.split(",")) for c in sys.argv[1:]]
for K, N, r, M in cells:
    res = defaultdict(list)
    for rnd in range(3):
        for name, (fn, take) in settings.items():
            fm.MeldedLinearFunction, proxy_update.take_top_rows_triton_ = fn, take
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            res[name].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)) * 1e3)
            del w; torch.cuda.empty_cache()
    base = min(res["before"])
    line = " ".join(f"{n} {min(v):7.1f} ({min(v)/base:.3f})" for n, v in res.items())
    print(f"K {K:5d} N {N:5d} r {r:3d} M {M:5d}: {line}", flush=True)
fm.MeldedLinearFunction, proxy_update.take_top_rows_triton_ = NewFn, new_take
