"""The side-by-side loop both probes here share: per cell, 3 interleaved rounds of every setting (each a function
that patches the code in place), a falqon layer step timed by CUDA-graph replay; prints the min of the rounds'
medians (us) and its ratio to the first setting. Also: an older commit's module, loaded from a file."""
import importlib.util, statistics, subprocess, sys, tempfile, torch
from collections import defaultdict
from pathlib import Path
from falqon_bench.measure.workload import build_workload
from falqon_bench.measure.timing import time_cudagraph


def old_source(commit: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout


def old_module(commit: str, path: str):
    """The module at `path` as of `commit`, imported from a temporary file (Triton's jit reads kernel source from one)."""
    file = Path(tempfile.mkdtemp()) / f"{Path(path).stem}_{commit}.py"
    file.write_text(old_source(commit, path))
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


def run(settings: dict, cells: list) -> None:
    if len(sys.argv) > 1:
        cells = [tuple(int(v) for v in c.split(",")) for c in sys.argv[1:]]
    for K, N, r, M in cells:
        res = defaultdict(list)
        for _ in range(3):
            for name, apply in settings.items():
                apply()
                w = build_workload(dict(K=K, N=N, rank=r, tokens=M, method="falqon", options={}), "cuda")
                res[name].append(statistics.median(time_cudagraph(w.step, device="cuda", warmup_ms=40, budget_ms=250)) * 1e3)
                del w; torch.cuda.empty_cache()
        base = min(next(iter(res.values())))
        line = " ".join(f"{n} {min(v):7.1f} ({min(v)/base:.3f})" for n, v in res.items())
        print(f"K {K:5d} N {N:5d} r {r:3d} M {M:5d}: {line}", flush=True)
