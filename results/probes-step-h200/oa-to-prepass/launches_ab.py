"""falqon step A/B, side by side in one process (run from the repo root, in a git clone):
  before    code c11ced4: O_A's amax and its e4m3 cast as two forward launches
  oa        this code: one forward launch (O_A's partial amax + a compact bf16 O_A^T), the cast in the backward's
            first launch (grad_prepass_oa)
  oa+norms  the chunked row select with the norms inside its first launch (norms-in-select.patch; not kept). Without
            the patch applied this setting runs the same code as "oa", which shows the rounds' spread.
CUDA-graph replay, 3 interleaved rounds, min of the rounds' medians (us). Usage: launches_ab.py [K,N,r,M ...]"""
import ast, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from _ab import old_module, old_source, run
from falqon_core.methods import falqon as fm
from falqon_core.kernels import proxy_update
from falqon_core.kernels.grad_prepass import launch_grad_prepass, prepass_configs
from falqon_core.kernels.quantize_transpose import quantize_transpose_fp8

BEFORE = "c11ced4"


def grad_prepass(dy, weight):  # the backward's first launch without O_A, as c11ced4 called it
    return launch_grad_prepass(dy, weight, *prepass_configs(dy, weight))[:2]


# the autograd.Function as it was, run against today's module namespace plus the two launchers it called
src = old_source(BEFORE, "falqon_core/methods/falqon.py")
cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "MeldedLinearFunction")
ns = dict(vars(fm), grad_prepass=grad_prepass, quantize_transpose_fp8=quantize_transpose_fp8)
exec(compile(ast.Module([cls], []), f"falqon_{BEFORE}.py", "exec"), ns)
OldFn, NewFn = ns["MeldedLinearFunction"], fm.MeldedLinearFunction
old_take = old_module(BEFORE, "falqon_core/kernels/row_select.py").take_top_rows_triton_
new_take = proxy_update.take_top_rows_triton_


def setting(fn, take):
    def apply():
        fm.MeldedLinearFunction, proxy_update.take_top_rows_triton_ = fn, take
    return apply


run({"before": setting(OldFn, old_take), "oa": setting(NewFn, old_take), "oa+norms": setting(NewFn, new_take)},
    [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 4096, 24, 3000), (4096, 4096, 48, 3000),
     (4096, 1024, 40, 2048), (4096, 1024, 64, 2048), (4096, 1024, 24, 3000), (4096, 11008, 64, 4096),
     (5120, 5120, 16, 3000), (4096, 1024, 64, 512), (4096, 4096, 8, 4096), (4096, 14336, 100, 2048)])
setting(NewFn, new_take)()
