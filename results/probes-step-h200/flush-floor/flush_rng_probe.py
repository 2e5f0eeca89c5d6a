"""What the flush's random bits cost (issue 12): the flush kernel with its pair hash (mode 0, = flush.py), a
cheaper generator (1: a strong hash per program, then per pair a Weyl step and one multiply-xorshift), constant
bits (2: no generator at all, the floor of any RNG) and round-to-nearest (3). Kernel alone, CUDA-graph replay.
GPU: PYTHONPATH=$PWD python probe/flush_rng_probe.py      CPU check of mode 0 vs flush.py: ... --check
"""
import sys
import torch, triton, triton.language as tl
from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
from falqon_core.kernels import flush as fl
from falqon_core.kernels.flush import _tile_and_delta, prepare_flush_inputs_
from falqon_core.kernels.proxy_update import _hash32, _round_to_fp8


@triton.jit
def _probe_kernel(w_ptr, a16_ptr, pieces_ptr, seed_ptr, n_rows, n_cols, rank, stride_w,
                  FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
                  MODE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr,
                  PIECES: tl.constexpr, DOT_F32: tl.constexpr):
    HALF: tl.constexpr = BLOCK_COLS // 2
    pid = tl.program_id(0)
    row0, col0, r_loc, h_loc, r_mask, w_l, w_r, mask_l, mask_r, old_l, old_r, acc_l, acc_r = _tile_and_delta(
        w_ptr, a16_ptr, pieces_ptr, pid, n_rows, n_cols, rank, stride_w, BLOCK_ROWS, BLOCK_COLS, BLOCK_RANK, PIECES,
        DOT_F32,
    )
    local = (r_loc[:, None] * HALF + h_loc[None, :]).to(tl.uint32)
    if MODE == 0:
        base = (row0.to(tl.int64) * n_cols + col0 // 2).to(tl.uint32)
        x = _hash32(tl.load(seed_ptr), base + (r_loc[:, None] * n_cols + h_loc[None, :]).to(tl.uint32))
    elif MODE == 1:  # strong hash per program, then a Weyl step and one xorshift-multiply-xorshift per pair
        h0 = _hash32(tl.load(seed_ptr), pid.to(tl.uint32))
        x = h0 + local * 0x9E3779B9
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
    elif MODE == 4:  # weakest: Weyl step, one multiply, one xorshift
        h0 = _hash32(tl.load(seed_ptr), pid.to(tl.uint32))
        x = (h0 + local * 0x9E3779B9) * 0x7FEB352D
        x = x ^ (x >> 15)
    else:
        x = local * 0 + 0x80008000
    bits_l = (x & 0xFFFF).to(tl.int32)
    bits_r = (x >> 16).to(tl.int32)
    out = w_ptr.dtype.element_ty
    STOCH: tl.constexpr = MODE != 3
    q_l = _round_to_fp8(old_l.to(tl.float32) + acc_l, bits_l, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, STOCH, out)
    q_r = _round_to_fp8(old_r.to(tl.float32) + acc_r, bits_r, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, STOCH, out)
    tl.store(w_l, q_l, mask=mask_l)
    tl.store(w_r, q_r, mask=mask_r)


def launch(w8, a16, pieces, seed, rank, mode, n_pieces=fl._PIECES):
    n, k = w8.shape
    fm, mb, me = tc.format_constants(w8.dtype)
    grid = (triton.cdiv(n, fl._BLOCK_ROWS) * triton.cdiv(k, fl._BLOCK_COLS),)
    soft = tc.is_interpreter()
    _probe_kernel[grid](w8, a16, pieces, seed, n, k, rank, w8.stride(0), FP8_MAX=fm, MANT_BITS=mb, MIN_EXP=me,
                        SOFTWARE_ROUND=soft, MODE=mode, BLOCK_ROWS=fl._BLOCK_ROWS, BLOCK_COLS=fl._BLOCK_COLS,
                        BLOCK_RANK=fl._block_rank(rank), PIECES=n_pieces, DOT_F32=soft,
                        num_warps=fl._NUM_WARPS, num_stages=fl._NUM_STAGES, maxnreg=fl._MAX_REGISTERS)


def inputs(n, k, r, device):
    w8 = (torch.randn(n, k, device=device) * 16).clamp(-448, 448).to(fp8.E4M3)
    a8 = (torch.randn(r, k, device=device) * 8).clamp(-448, 448).to(fp8.E4M3)
    b = torch.randn(n, r, device=device) * 1e-3
    return w8, a8, b


if "--check" in sys.argv:  # mode 0 must be flush.py's kernel, byte for byte
    w8, a8, b = inputs(130, 257, 5, "cpu")
    seed = torch.tensor(11)
    ref = w8.clone(); fl.flush_triton_(ref, a8, b.clone(), stochastic=True, seed=seed)
    pieces, a16 = prepare_flush_inputs_(b.clone(), a8)
    got = w8.clone(); launch(got, a16, pieces, seed, 5, 0)
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)); print("mode 0 == flush.py: ok")
    for mode in (1, 2, 3, 4):
        got = w8.clone(); launch(got, a16, pieces, seed, 5, mode); print(f"mode {mode} ran, differs from 0 in {(got.view(torch.uint8) != ref.view(torch.uint8)).sum().item()} bytes")
else:
    names = ["pair hash (now)", "weyl+xsmx", "constant bits", "nearest", "weyl+mul+xs"]
    combos = [(m, 2) for m in range(5)] + [(0, 1), (1, 1), (3, 1)]
    for (n, k, label) in ((4096, 4096, "attn"), (4096, 11008, "down (W8 4096 x 11008)")):
        for r in (16, 64):
            w8, a8, b = inputs(n, k, r, "cuda")
            pieces, a16 = prepare_flush_inputs_(b, a8)
            seed = torch.tensor(5, device="cuda")
            times = []
            for mode, npc in combos:
                times.append(triton.testing.do_bench_cudagraph(lambda: launch(w8, a16, pieces, seed, r, mode, npc), rep=200) * 1e3)
            copy = triton.testing.do_bench_cudagraph(lambda: w8.view(torch.uint8).add_(0), rep=200) * 1e3
            print(f"{label:<24} r {r:>3}: " + ", ".join(f"{names[m]}/p{npc} {t:.1f} us" for (m, npc), t in zip(combos, times)) + f"; in-place pass over W8 {copy:.1f} us")
