"""FALQON's melded forward GEMM: x (M x K) against the melded [W; A] (N+r x K) fp8 matrix in one pass.

Two backends, chosen by `backend=`:
- "cublas": fp8.scaled_mm (torch._scaled_mm, cuBLASLt; its fp32-accumulating upcast GEMM on CUDA when K or
  N+r is not a multiple of 16) into one M x (N+r) buffer; out and o_a are column slices of it, so both are
  non-contiguous views (row stride N+r). This is the reference.
- "triton": a persistent fp8 GEMM (tl.dot on e4m3, fp32 accumulate, dequant scales in the epilogue)
  that writes out (M x N) and o_a (M x r) into two separate contiguous buffers: no slicing copy when the
  caller needs o_a contiguous (the dB GEMM does). `melded_matmul_quantized_oa` also writes, per program,
  the max |o_a| of the tiles it stored, so quantizing o_a to e4m3 for the backward needs only the cast
  launch (quantize.cast_tensorwise_from_partials), not another amax pass over o_a.
"auto" picks AUTO_BACKEND, "cublas": both were measured on an H100 (results/kernels-h100), cuBLASLt at
1163-1264 TFLOP/s against 675-812 for this Triton GEMM. falqon's forward runs cuBLASLt with fast accumulation
(results/fast-accum-h200: the step is 1.8-4.5% faster with it on llama-7b attn/up/down, r 64, 4096 tokens).

The autotuned Triton kernel benchmarks its configs on the first call for each (M, N+r, K): call it
once before capturing it in a CUDA graph.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import cast_bf16
from falqon_core.kernels.quantize import cast_tensorwise_from_partials, quantize_fp8_reference

Backend = Literal["auto", "cublas", "triton"]
BACKENDS = ("auto", "cublas", "triton")
AUTO_BACKEND: Literal["cublas", "triton"] = "cublas"

# Hopper fp8 configs: 128-wide tiles, BLOCK_K 128 (128 bytes of e4m3 per row of a tile), 3-4 stages
_HOPPER_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# the interpreter runs one fixed small config (autotuning there would only cost time)
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def melded_matmul_reference(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int,
    fast_accum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp8 GEMM giving M x (N+r); returns (out = first N columns, o_a = last r columns), bf16.

    fast_accum: cuBLASLt's use_fast_accum (the FALQON reference's forward GEMM runs with it).
    """
    full = fp8.scaled_mm(x8, x_scale, w8_melded, w_scale, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return full[:, :n_out], full[:, n_out:]


def melded_matmul_quantized_oa_reference(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """melded_matmul_reference, then o_a made contiguous and quantized to e4m3 tensorwise.

    Returns (out M x N bf16 view, o_a M x r bf16 contiguous, o_a8 M x r e4m3, o_a_scale 0-dim fp32).
    """
    out, o_a = melded_matmul_reference(x8, x_scale, w8_melded, w_scale, n_out)
    o_a = o_a.contiguous()
    o_a8, o_a_scale = quantize_fp8_reference(o_a, fp8.E4M3, "tensorwise")
    return out, o_a, o_a8, o_a_scale


@triton.jit
def _melded_gemm_kernel(
    x_ptr, w_ptr, out_ptr, oa_ptr, x_scale_ptr, w_scale_ptr, oa_partial_ptr,
    M, N_TOTAL, K, n_out,
    stride_xm, stride_wn, stride_om, stride_oam,
    NUM_PROGRAMS,
    X_ROWWISE: tl.constexpr, W_ROWWISE: tl.constexpr, OA_AMAX: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    FAST_ACCUM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Persistent: program pid computes tiles pid, pid+P, ... of x @ w^T (grouped order for L2 reuse).

    Columns < n_out go to out (M x n_out), the rest to oa (M x N_TOTAL-n_out); both bf16, contiguous rows.
    OA_AMAX: also store max |bf16 o_a| over this program's tiles at oa_partial_ptr[pid] (0 if none).
    FAST_ACCUM False: on sm_90 the fp8 MMA's reduced-precision accumulator is added into the fp32
    accumulator after every BLOCK_K products (max_num_imprecise_acc), like cuBLASLt without fast accum.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_TOTAL, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    if not X_ROWWISE:
        x_scale = tl.load(x_scale_ptr)
    if not W_ROWWISE:
        w_scale = tl.load(w_scale_ptr)
    oa_max = tl.max(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    for tile in range(pid, num_tiles, NUM_PROGRAMS):
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows/cols past the edge read row 0 (discarded by the store masks): no mask on the hot loads
        safe_m = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        safe_n = tl.where(offs_n < N_TOTAL, offs_n, 0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + safe_n[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_mask = offs_k < K - k0
                a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            if FAST_ACCUM:
                acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        if X_ROWWISE:
            acc = acc * tl.load(x_scale_ptr + safe_m)[:, None]
        else:
            acc = acc * x_scale
        if W_ROWWISE:
            acc = acc * tl.load(w_scale_ptr + safe_n)[None, :]
        else:
            acc = acc * w_scale
        c = cast_bf16(acc, SOFTWARE_ROUND)

        m_mask = (offs_m < M)[:, None]
        if pid_n * BLOCK_N < n_out:
            out_mask = m_mask & (offs_n < n_out)[None, :]
            tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], c, mask=out_mask)
        if pid_n * BLOCK_N + BLOCK_N > n_out:
            oa_cols = tl.maximum(offs_n - n_out, 0)
            oa_mask = m_mask & ((offs_n >= n_out) & (offs_n < N_TOTAL))[None, :]
            tl.store(oa_ptr + offs_m.to(tl.int64)[:, None] * stride_oam + oa_cols[None, :], c, mask=oa_mask)
            if OA_AMAX:
                tile_max = tl.max(tl.max(tl.where(oa_mask, tl.abs(c.to(tl.float32)), 0.0), axis=1), axis=0)
                oa_max = tl.maximum(oa_max, tile_max)
    if OA_AMAX:
        tl.store(oa_partial_ptr + pid, oa_max)


_melded_gemm_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_melded_gemm_kernel)
_melded_gemm_autotuned = triton.autotune(
    configs=_HOPPER_CONFIGS, key=["M", "N_TOTAL", "K", "X_ROWWISE", "W_ROWWISE", "FAST_ACCUM"]
)(_melded_gemm_even_k)


def _check_inputs(x8, x_scale, w8_melded, w_scale, n_out) -> None:
    if x8.dim() != 2 or w8_melded.dim() != 2 or x8.shape[1] != w8_melded.shape[1]:
        raise ValueError(
            f"melded_matmul needs x8 M x K and w8_melded (N+r) x K, got {tuple(x8.shape)} and {tuple(w8_melded.shape)}"
        )
    if x8.dtype not in tc.FP8_DTYPES or w8_melded.dtype not in tc.FP8_DTYPES:
        raise ValueError(f"melded_matmul needs fp8 operands, got {x8.dtype} and {w8_melded.dtype}")
    if not 0 < n_out < w8_melded.shape[0]:
        raise ValueError(f"n_out must be in (0, {w8_melded.shape[0]}) (the backbone rows), got {n_out}")
    for name, s, rows in (("x_scale", x_scale, x8.shape[0]), ("w_scale", w_scale, w8_melded.shape[0])):
        if s.numel() not in (1, rows):
            raise ValueError(
                f"{name} must be tensorwise (1 value) or rowwise ({rows} values), got shape {tuple(s.shape)}"
            )


@tc.opaque_to_compile
def _melded_triton(
    x8, x_scale, w8_melded, w_scale, n_out, oa_amax: bool, software_round: bool | None, fast_accum: bool
):
    """Launch the persistent GEMM. Returns (out, o_a, oa_partials or None)."""
    _check_inputs(x8, x_scale, w8_melded, w_scale, n_out)
    x8 = x8 if x8.stride(1) == 1 else x8.contiguous()
    w8_melded = w8_melded if w8_melded.stride(1) == 1 else w8_melded.contiguous()
    m, k = x8.shape
    n_total = w8_melded.shape[0]
    device = x8.device
    out = torch.empty((m, n_out), device=device, dtype=torch.bfloat16)
    o_a = torch.empty((m, n_total - n_out), device=device, dtype=torch.bfloat16)
    programs = tc.num_sms(x8)
    partials = torch.empty(programs, device=device, dtype=torch.float32) if oa_amax else out
    x_scale_f = x_scale.float().contiguous().view(-1)
    w_scale_f = w_scale.float().contiguous().view(-1)
    args = (
        x8, w8_melded, out, o_a, x_scale_f, w_scale_f, partials,
        m, n_total, k, n_out,
        x8.stride(0), w8_melded.stride(0), out.stride(0), o_a.stride(0),
        programs,
    )
    flags = dict(
        X_ROWWISE=x_scale_f.numel() != 1,
        W_ROWWISE=w_scale_f.numel() != 1,
        OA_AMAX=oa_amax,
        SOFTWARE_ROUND=tc.is_interpreter() if software_round is None else bool(software_round),
        FAST_ACCUM=bool(fast_accum),
    )
    if tc.is_interpreter():
        _melded_gemm_even_k[(programs,)](*args, **flags, **_INTERPRETER_CONFIG)
    else:
        _melded_gemm_autotuned[(programs,)](*args, **flags)
    return out, o_a, (partials if oa_amax else None)


def melded_matmul_triton(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int,
    *, software_round: bool | None = None, fast_accum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton GEMM: (out M x N, o_a M x r), bf16, each its own contiguous buffer.

    Scales: tensorwise (1 value) or rowwise (x: M values, w: N+r values), x ~= x8 * x_scale.
    software_round: round to bf16 with fp32 adds before the store (None: only under the interpreter).
    fast_accum: let Hopper's fp8 MMA keep the whole K reduction in its reduced-precision accumulator
    (faster, less accurate; cuBLASLt's use_fast_accum). Default False, matching torch._scaled_mm's default.
    """
    out, o_a, _ = _melded_triton(x8, x_scale, w8_melded, w_scale, n_out, False, software_round, fast_accum)
    return out, o_a


def melded_matmul_quantized_oa_triton(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int,
    *, software_round: bool | None = None, fast_accum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton GEMM with o_a's amax fused into its epilogue, then one cast launch for o_a -> e4m3.

    Same contract as melded_matmul_quantized_oa_reference; o_a8 and its scale are bit-exact with
    quantizing this o_a with quantize_fp8_reference(o_a, e4m3, "tensorwise").
    """
    out, o_a, partials = _melded_triton(x8, x_scale, w8_melded, w_scale, n_out, True, software_round, fast_accum)
    o_a8, o_a_scale = cast_tensorwise_from_partials(o_a, partials, fp8.E4M3, software_round)
    return out, o_a, o_a8, o_a_scale


def _resolve_backend(backend: Backend, x8: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chosen = AUTO_BACKEND if backend == "auto" else backend
    # off CUDA (or on a GPU without fp8 Triton support) only the reference runs
    return chosen if tc.triton_fp8_ok(x8) else "cublas"


def melded_matmul(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int,
    backend: Backend = "cublas", fast_accum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out M x N, o_a M x r) bf16. "cublas": views of one buffer (o_a non-contiguous); "triton": two buffers.

    Off CUDA the reference runs whatever the backend (the CPU has no fast-accumulation mode: fast_accum is
    then only passed through).
    """
    if _resolve_backend(backend, x8) == "triton":
        return melded_matmul_triton(x8, x_scale, w8_melded, w_scale, n_out, fast_accum=fast_accum)
    return melded_matmul_reference(x8, x_scale, w8_melded, w_scale, n_out, fast_accum)


def melded_matmul_quantized_oa(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int,
    backend: Backend = "cublas",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, o_a contiguous, o_a8 e4m3, o_a_scale): the forward GEMM plus o_a quantized for the dB GEMM."""
    if _resolve_backend(backend, x8) == "triton":
        return melded_matmul_quantized_oa_triton(x8, x_scale, w8_melded, w_scale, n_out)
    return melded_matmul_quantized_oa_reference(x8, x_scale, w8_melded, w_scale, n_out)
