"""FP8 formats and scaling: the torch reference every kernel and method is checked against.

Convention (the one `torch._scaled_mm` takes): a quantized tensor is a pair (data, scale) with
    x  ~=  data.float() * scale
so `scale` is the *dequantization* scale, amax / fp8_max. e4m3 (float8_e4m3fn, max 448) holds
weights and activations; e5m2 (max 57344) holds gradients. Casts saturate: values beyond the format's
max are clamped, never turned into NaN.
"""

from __future__ import annotations

from typing import Literal

import torch

from falqon_core import cublaslt

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# fp8 tensor cores (Triton's fp8 casts and dots, cuBLASLt's fp8 GEMM) need this CUDA compute capability: Ada, Hopper
FP8_MIN_CAPABILITY = (8, 9)

Granularity = Literal["tensorwise", "rowwise"]

# largest finite value, mantissa bits, smallest normal exponent
_FORMAT = {
    E4M3: (448.0, 3, -6),
    E5M2: (57344.0, 2, -14),
}
# the smallest scale we allow, so an all-zero tensor quantizes to zeros instead of NaN
MIN_SCALE = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype."""
    return _FORMAT[dtype][0]


def tensorwise_scale(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """One fp32 dequant scale for the whole tensor: amax(|x|) / fp8_max (0-dim tensor)."""
    amax = x.detach().abs().amax().float()
    return torch.clamp(amax / fp8_max(dtype), min=MIN_SCALE)


def rowwise_scale(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """One fp32 dequant scale per row of a 2-D tensor (shape rows x 1)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    return torch.clamp(amax / fp8_max(dtype), min=MIN_SCALE)


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to the format's finite range, then round-to-nearest-even into fp8."""
    m = fp8_max(dtype)
    return torch.clamp(x, -m, m).to(dtype)


def quantize(
    x: torch.Tensor,
    dtype: torch.dtype = E4M3,
    granularity: Granularity = "tensorwise",
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to fp8: returns (data, scale) with x ~= data.float() * scale.

    Pass `scale` to reuse a fixed scale (FALQON keeps its weight scale fixed after init).
    """
    if scale is None:
        scale = tensorwise_scale(x, dtype) if granularity == "tensorwise" else rowwise_scale(x, dtype)
    # times the correctly rounded fp32 reciprocal, not a division: what the Triton casts compute (a division per
    # element made them compute-bound; falqon_core.kernels._triton_common.inverse_scale)
    data = saturating_cast(x.float() * torch.reciprocal(torch.as_tensor(scale, device=x.device).float()), dtype)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to high precision: data * scale."""
    return (data.float() * scale).to(dtype)


def fake_quantize(x: torch.Tensor, dtype: torch.dtype = E4M3, granularity: Granularity = "tensorwise") -> torch.Tensor:
    """quantize then dequantize, in x's dtype: the value an fp8 GEMM actually sees."""
    data, scale = quantize(x, dtype, granularity)
    return dequantize(data, scale, x.dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of the fp8 grid at |x| (in the units of x, i.e. already-scaled fp8 values).

    Normal range: 2**(floor(log2|x|) - mantissa_bits); subnormals: 2**(min_exp - mantissa_bits).
    Tolerances in tests are stated as multiples of this. Exact on every device: the exponent comes from
    frexp and the power of two is assembled from its fp64 bits (CUDA's log2 and pow on doubles may be off
    by an ulp, e.g. a step of 2048 + 2^-41 next to an e5m2 value of 16384).
    """
    _, mbits, min_exp = _FORMAT[dtype]
    ax = x.detach().abs().double()
    _, e = torch.frexp(torch.clamp(ax, min=2.0**min_exp))  # ax = m 2^e with m in [0.5, 1): floor(log2) = e - 1
    exp = e.to(torch.int64) - 1 - mbits
    return torch.bitwise_left_shift(exp + 1023, 52).view(torch.float64)  # 2^exp, exactly


def relative_ulp(dtype: torch.dtype) -> float:
    """Worst-case relative rounding error of a normal fp8 value (half an ulp relative to 1.0): 2**-(mbits+1)."""
    return 2.0 ** -(_FORMAT[dtype][1] + 1)


# cuBLASLt's fp8 GEMM (torch._scaled_mm on CUDA) needs the reduction dim K and the output width N to be
# multiples of 16
SCALED_MM_MULTIPLE = 16
# torch.mm(..., out_dtype=torch.float32) on bf16 operands (CUDA only; "aten::mm.dtype", torch >= 2.8)
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def scaled_mm_fits(k: int, n: int) -> bool:
    """True when torch._scaled_mm's CUDA fp8 GEMM takes reduction length k and output width n."""
    return k % SCALED_MM_MULTIPLE == 0 and n % SCALED_MM_MULTIPLE == 0


def _row_col_scales(a_scale, b_scale, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scales as torch._scaled_mm takes them: both 0-dim (tensorwise), or a: m x 1 and b: 1 x n (rowwise)."""
    if a_scale.dim() == 0 and b_scale.dim() == 0:
        return a_scale.float(), b_scale.float()
    sa = a_scale.float().reshape(-1, 1).expand(m, 1).contiguous()
    sb = b_scale.float().reshape(1, -1).expand(1, n).contiguous()
    return sa, sb


def upcast_scaled_mm(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """scaled_mm without fp8 tensor cores, for shapes cuBLASLt's fp8 GEMM refuses: same contract and inputs.

    Every e4m3/e5m2 value is exactly a bf16 (and fp32) value, so upcasting loses nothing. On CUDA: a bf16
    GEMM with an fp32 output (fp32 accumulation, no bf16 rounding of the product); elsewhere, or on a torch
    without mm's out_dtype, an fp32 GEMM of the same exact values. Then the dequant scales in fp32 and one
    cast to out_dtype.
    """
    m, n = a_data.shape[0], b_data.shape[0]
    if a_data.is_cuda and _MM_HAS_OUT_DTYPE:
        product = torch.mm(a_data.to(torch.bfloat16), b_data.to(torch.bfloat16).t(), out_dtype=torch.float32)
    else:
        product = a_data.float() @ b_data.float().t()
    sa, sb = _row_col_scales(a_scale, b_scale, m, n)
    return (product * sa * sb).to(out_dtype)


# CUDA calls of scaled_mm with tensorwise scales take cuBLASLt with no workspace (falqon_core/cublaslt.py: no
# stream-K memset before the GEMM); False: torch._scaled_mm, whose heuristic may pick a kernel that needs one
WORKSPACE_FREE_GEMM = True

# CPU calls of scaled_mm take upcast_scaled_mm (see scaled_mm); tests that check which GEMM a CUDA step would
# reach set this False to run torch._scaled_mm on the CPU.
CPU_UPCAST = True


def scaled_mm(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    fallback: bool | None = None,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """a (M x K, fp8) @ b (N x K, fp8)^T -> M x N in out_dtype, with dequant scales applied.

    Scales: tensorwise (0-dim) or rowwise (a: M x 1, b: N x 1). Uses torch._scaled_mm (cuBLASLt on
    GPU); tensorwise CUDA calls take cublaslt.scaled_mm (a workspace-free algorithm) while
    WORKSPACE_FREE_GEMM. cuBLASLt needs K and N multiples of 16: on CUDA other shapes go to upcast_scaled_mm (fp32
    accumulation); so does every CPU call: torch._scaled_mm's CPU kernel is a slow reference on some CPUs
    (Intel Xeon with AMX, torch 2.14: 70 ms for a 256 x 64 x 192 product, 0.26 ms upcast, same values), which
    made the CPU accuracy suite take minutes per point. fallback: True forces upcast_scaled_mm, False forces
    torch._scaled_mm, None decides as just said. use_fast_accum: torch._scaled_mm's flag (on Hopper the fp8
    MMA keeps the whole K reduction in its reduced-precision accumulator; ignored by the upcast GEMM and on CPU).
    """
    if fallback is None:
        fallback = CPU_UPCAST if not a_data.is_cuda else not scaled_mm_fits(a_data.shape[1], b_data.shape[0])
    if fallback:
        return upcast_scaled_mm(a_data, a_scale, b_data, b_scale, out_dtype)
    sa, sb = _row_col_scales(a_scale, b_scale, a_data.shape[0], b_data.shape[0])
    if WORKSPACE_FREE_GEMM and a_data.is_cuda:
        out = cublaslt.scaled_mm(a_data, sa, b_data, sb, out_dtype, use_fast_accum)
        if out is not None:
            return out
    return torch._scaled_mm(
        a_data, b_data.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=use_fast_accum
    )
