"""Fast paths for FALQON's hot spots. Each public function has a `*_reference` torch twin with the same
contract; on CUDA the Triton (or cuBLASLt) path runs, elsewhere the reference does.

Contracts (scale is always the dequantization scale, x ~= data * scale; see falqon_core.fp8):
  quantize_fp8(x, dtype, granularity) -> (data, scale)
  melded_matmul(x8, x_scale, w8_melded, w_scale, n_out) -> (out M x N, o_a M x r)
  proxy_update_(w8, a8, b, k) -> rows   (in place on w8 and b)
"""

from falqon_core.kernels.melded import melded_matmul, melded_matmul_reference
from falqon_core.kernels.proxy_update import proxy_update_, proxy_update_reference_
from falqon_core.kernels.quantize import quantize_fp8, quantize_fp8_reference

__all__ = [
    "melded_matmul",
    "melded_matmul_reference",
    "proxy_update_",
    "proxy_update_reference_",
    "quantize_fp8",
    "quantize_fp8_reference",
]
