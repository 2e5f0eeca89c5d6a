"""falqon step A/B side by side: x's quantize in two launches (RESIDENT False) vs one resident launch.
Needs resident-quantize.patch applied to c378abd; run from the repository root."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "oa-to-prepass"))  # its shared A/B loop
from _ab import run
from falqon_core.kernels import quantize as q

def use(flag):
    def apply():
        q.RESIDENT = flag
    return apply

run({"two": use(False), "one": use(True)},
    [(4096, 4096, 40, 2048), (4096, 4096, 64, 2048), (4096, 1024, 40, 2048), (4096, 1024, 64, 2048),
     (4096, 14336, 64, 2048), (4096, 4096, 16, 1024), (4096, 1024, 8, 512), (4096, 4096, 64, 4096)])
