"""The one accumulation-error model every GEMM test bound uses: unit roundoff per addition of a K-long dot product.

A GEMM's accumulation over K products errs by at most K * u * sum_k |a_k| |b_k| (recursive summation: each of
the K additions rounds with relative error <= u of a partial sum, itself <= sum |a||b|), where u depends on
the hardware that accumulates:

- fp32 accumulation, u = 2^-24: every GEMM on CPU; on CUDA, fp32 GEMMs, bf16 GEMMs with reduced-precision
  reduction disabled (torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False), and the
  bf16 fallback of falqon_core.fp8.scaled_mm (fp32 output, so no bf16 split-K reduction).
- fp8 tensor-core GEMMs on CUDA (Hopper WGMMA, via cuBLASLt's torch._scaled_mm or Triton's fp8 tl.dot),
  u = 2^-13: the fp8 MMA does not accumulate in full fp32. DeepSeek-V3 technical report (arXiv 2412.19437),
  section 3.3.2: on H800 the fp8 GEMM accumulation is "limited to retaining around 14 bits", far below
  fp32's 24; cuBLAS (without fast accumulation) promotes partial sums to fp32 registers at intervals, which
  only shortens the runs that see the 14-bit accumulator. 14 retained bits (truncated) err by < 2^-13
  relative per addition, hence u = 2^-13. Measured on an H100 (tests/test_fp8.py, K = 64): errors up to 50x
  K 2^-24 sum|a||b|, i.e. about 2^-12.3 sum|a||b|, well inside K 2^-13 sum|a||b| = 2^-7 sum|a||b|.
"""

from __future__ import annotations

import torch

U_FP32 = 2.0**-24
U_FP8_TENSOR_CORE = 2.0**-13
_OUT_UNIT = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def gemm_accum_unit(device: str | torch.device, fp8: bool) -> float:
    """Unit roundoff of one addition in a GEMM's accumulation: 2^-13 for fp8 tensor cores on CUDA, else 2^-24."""
    return U_FP8_TENSOR_CORE if fp8 and torch.device(device).type == "cuda" else U_FP32


def accumulation_bound(abs_a_at_abs_b: torch.Tensor, K: int, device: str | torch.device, fp8: bool) -> torch.Tensor:
    """K * u * (|a| @ |b|): the worst-case accumulation error of each element of a @ b (fp64 in, fp64 out)."""
    return K * gemm_accum_unit(device, fp8) * abs_a_at_abs_b


def gemm_bound(
    abs_a_at_abs_b: torch.Tensor,
    abs_ref: torch.Tensor,
    K: int,
    device: str | torch.device,
    fp8: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """|computed - exact product of the same operands| for one GEMM written in out_dtype.

    Accumulation (K u |a|.|b|) then one rounding to out_dtype (2^-8 for bf16, 0 for fp32/fp64) of the
    accumulated value, which is at most |ref| + the accumulation error.
    """
    acc = accumulation_bound(abs_a_at_abs_b, K, device, fp8)
    out_u = _OUT_UNIT[out_dtype]
    return acc + out_u * (abs_ref + acc)
