"""Fast paths for FALQON's hot spots. Each public function has a `*_reference` torch twin with the same
contract; on CUDA the Triton (or cuBLASLt) path runs, elsewhere the reference does. The `*_triton`
entry points run the Triton kernels directly (under TRITON_INTERPRET=1 on CPU, as the tests do).

Contracts (scale is always the dequantization scale, x ~= data * scale; see falqon_core.fp8):
  quantize_fp8(x, dtype, granularity) -> (data, scale)                      Triton on CUDA, bit-exact
  melded_matmul(x8, x_scale, w8_melded, w_scale, n_out, backend="cublas") -> (out M x N, o_a M x r)
  melded_matmul_quantized_oa(...same...) -> (out, o_a contiguous, o_a8 e4m3, o_a_scale)
  proxy_update_(w8, a8, b, k) -> rows   (in place on w8 and b)            Triton on CUDA
  transpose_fp8(x R x C, 1-byte dtype) -> contiguous C x R copy              Triton on CUDA, bit-exact
"""

from falqon_core.kernels.melded import (
    melded_matmul,
    melded_matmul_quantized_oa,
    melded_matmul_quantized_oa_reference,
    melded_matmul_quantized_oa_triton,
    melded_matmul_reference,
    melded_matmul_triton,
)
from falqon_core.kernels.proxy_update import proxy_update_, proxy_update_reference_, proxy_update_triton_
from falqon_core.kernels.quantize import quantize_fp8, quantize_fp8_reference, quantize_fp8_triton
from falqon_core.kernels.transpose import transpose_fp8, transpose_fp8_reference, transpose_fp8_triton
from falqon_core.kernels import compile_ops  # noqa: E402,F401  registers the falqon:: custom ops for torch.compile

__all__ = [
    "melded_matmul",
    "melded_matmul_quantized_oa",
    "melded_matmul_quantized_oa_reference",
    "melded_matmul_quantized_oa_triton",
    "melded_matmul_reference",
    "melded_matmul_triton",
    "proxy_update_",
    "proxy_update_reference_",
    "proxy_update_triton_",
    "quantize_fp8",
    "quantize_fp8_reference",
    "quantize_fp8_triton",
    "transpose_fp8",
    "transpose_fp8_reference",
    "transpose_fp8_triton",
]
