"""Instruction mix of the flush kernel (stochastic, r 16 / 64, with / without W8^T): PTX (and SASS if nvdisasm)."""
import collections, re, sys, torch, triton
from falqon_core import fp8
from falqon_core.kernels import flush as fl
from falqon_core.kernels import _triton_common as tc
out = sys.argv[1]
N, K = 4096, 11008
for r in (16, 64):
    for write_t in (False, True):
        w8 = (torch.randn(N, K, device="cuda") * 8).to(fp8.E4M3)
        a8 = (torch.randn(r, K, device="cuda") * 8).to(fp8.E4M3)
        b = torch.randn(N, r, device="cuda") * 1e-3
        wt = torch.empty(K, N, dtype=w8.dtype, device="cuda")
        pieces, a16 = fl.prepare_flush_inputs_(b, a8)
        seed = torch.tensor(3, device="cuda")
        fm, mb, me = tc.format_constants(w8.dtype)
        grid = (triton.cdiv(N, fl._BLOCK_ROWS) * triton.cdiv(K, fl._BLOCK_COLS),)
        k = fl._flush_kernel[grid](w8, a16, pieces, seed, wt, N, K, r, w8.stride(0), FP8_MAX=fm, MANT_BITS=mb,
            MIN_EXP=me, SOFTWARE_ROUND=False, STOCHASTIC=True, WRITE_T=write_t, BLOCK_ROWS=fl._BLOCK_ROWS,
            BLOCK_COLS=fl._BLOCK_COLS, BLOCK_RANK=fl._block_rank(r), PIECES=fl._PIECES, DOT_F32=False,
            num_warps=fl._NUM_WARPS, num_stages=fl._NUM_STAGES, maxnreg=fl._MAX_REGISTERS)
        tag = f"r{r}-t{int(write_t)}"
        for kind in ("ttgir", "ptx", "sass"):
            try:
                text = k.asm[kind]
            except Exception as e:
                print(tag, kind, "unavailable:", type(e).__name__, e); continue
            open(f"{out}/flush-{tag}.{kind}", "w").write(text)
            if kind in ("ptx", "sass"):
                ops = collections.Counter()
                for line in text.splitlines():
                    line = line.strip()
                    if kind == "sass":
                        m = re.match(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
                    else:
                        m = re.match(r"(?:@%p\d+\s+)?([a-z][a-z0-9_.]*)", line)
                    if m and not line.startswith(("//", ".", "$")):
                        ops[m.group(1).split(".")[0]] += 1
                print(f"== {tag} {kind}: {sum(ops.values())} instructions; regs/spills: {getattr(k, 'n_regs', '?')}/{getattr(k, 'n_spills', '?')}")
                print("   " + ", ".join(f"{o} {n}" for o, n in ops.most_common(30)))
