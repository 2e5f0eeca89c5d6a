"""falqon step A/B side by side: O_A's cast programs before the W8^T tiles in the backward's first launch (3411dd1)
against after them (the code after it; run from the root of a git clone at that code). 3 interleaved rounds, min of medians, us."""
import importlib.util, statistics, subprocess, sys, tempfile, torch
from collections import defaultdict
from pathlib import Path
from falqon_core.methods import falqon as fm
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph

# the launch as committed at 3411dd1, from a file (Triton's jit reads its kernels' source from one)
path = Path(tempfile.mkdtemp()) / "grad_prepass_3411dd1.py"
path.write_text(subprocess.run(["git", "show", "3411dd1:falqon_core/kernels/grad_prepass.py"], check=True,
                               capture_output=True, text=True).stdout)
spec = importlib.util.spec_from_file_location(path.stem, path)
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
settings = {"oa-first": old.grad_prepass_oa, "oa-last": fm.grad_prepass_oa}
cells = [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 4096, 24, 3000), (4096, 4096, 48, 3000),
         (4096, 1024, 40, 2048), (4096, 1024, 64, 2048), (4096, 1024, 24, 3000), (4096, 11008, 64, 4096),
         (11008, 4096, 64, 4096), (5120, 5120, 16, 3000), (4096, 1024, 64, 512), (4096, 4096, 256, 9999)]
if len(sys.argv) > 1:
    cells = [tuple(int(v) for v in c.split(",")) for c in sys.argv[1:]]
for K, N, r, M in cells:
    res = defaultdict(list)
    for rnd in range(3):
        for name, fn in settings.items():
            fm.grad_prepass_oa = fn
            w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
            res[name].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)) * 1e3)
            del w; torch.cuda.empty_cache()
    base = min(res["oa-first"])
    print(f"K {K:5d} N {N:5d} r {r:3d} M {M:5d}: " + " ".join(f"{n} {min(v):7.1f} ({min(v)/base:.3f})" for n, v in res.items()), flush=True)
