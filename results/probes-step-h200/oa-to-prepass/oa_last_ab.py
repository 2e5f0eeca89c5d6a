"""falqon step A/B side by side: O_A's cast programs before the W8^T tiles in the backward's first launch (3411dd1)
against after them (the code after it; run from the root of a git clone at that code). 3 interleaved rounds, min
of medians, us. Usage: oa_last_ab.py [K,N,r,M ...]"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from _ab import old_module, run
from falqon_core.methods import falqon as fm

old = old_module("3411dd1", "falqon_core/kernels/grad_prepass.py").grad_prepass_oa
new = fm.grad_prepass_oa


def use(fn):
    def apply():
        fm.grad_prepass_oa = fn
    return apply


run({"oa-first": use(old), "oa-last": use(new)},
    [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 4096, 24, 3000), (4096, 4096, 48, 3000),
     (4096, 1024, 40, 2048), (4096, 1024, 64, 2048), (4096, 1024, 24, 3000), (4096, 11008, 64, 4096),
     (11008, 4096, 64, 4096), (5120, 5120, 16, 3000), (4096, 1024, 64, 512), (4096, 4096, 256, 9999)])
