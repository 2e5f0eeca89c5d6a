"""Block-Hadamard rotation, alone and fused with the fp8 cast: HALO's per-step operand transform.

H_K (K x K) is block-diagonal: K/b copies of the Sylvester Hadamard matrix H_b / sqrt(b), with H_b
(entries +-1) from scipy.linalg.hadamard. It is orthonormal and symmetric, so H_K H_K^T = H_K H_K = I:
rotating both operands of a GEMM leaves the product unchanged, x W^T = (x H_K)(W H_K)^T, while a large
value in one column of x is spread over the b columns of its block before quantization. Rotating the last
dim of an M x K tensor is a reshape to (M, K/b, b) and a matmul with H_b: 2*M*K*b FLOPs.

Block size (hadamard_block_size): the largest power of two dividing the dim, at most 128, at least 16.
A dim that is not a multiple of 128 gets a smaller block (K = 192 -> b = 64, K = 48 -> b = 16).

The Triton kernel (block_hadamard_quantize) fuses the rotation with the fp8 cast. A program loads a
BLOCK_M x b tile of x and multiplies it by the b x b +-1 matrix, loaded once per program and kept on chip,
with one tl.dot (fp32 accumulate; every product x * +-1 is exact, the 1/sqrt(b) factor is applied once
after the sum), then takes the amax and casts:
- tensorwise: two launches, like falqon_core.kernels.quantize: (1) grid-stride over tiles, rotate, write one
  partial amax per program into an uninitialised buffer (deterministic, no atomics, no zeroing launch);
  (2) every program reduces the partials to the scale, rotates its tiles again and casts. Recomputing the
  rotation (FLOPs are cheap: 2b per element) moves fewer bytes than writing an fp32 intermediate.
- rowwise: one launch; a program owns BLOCK_M whole rows, rotates them block by block for the row amax,
  then rotates again and casts.
Neither path syncs with the host, so both can be captured in a CUDA graph (the +-1 matrix is built once per
(block, dtype, device) on first use, so run one step before capturing).

Numerics, against block_hadamard_reference + fp8.quantize: the rotation differs only in fp32 summation
order (|diff| <= 2 * b * 2^-24 * sum_j |x_j| / sqrt(b) per element); the scale uses torch's fp32 ops on the
tensor's device; the cast is round-to-nearest-even with saturation. So fp8 codes are identical except where
that fp32 difference moves a value across the midpoint between two neighbouring fp8 values.
"""

from __future__ import annotations

import math

import scipy.linalg
import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.fp8 import Granularity
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import inverse_scale, saturating_cast, scale_from_amax, scale_from_partials

MAX_BLOCK = 128
MIN_BLOCK = 16
_KERNEL_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# tensorwise grid-stride kernels: programs per SM
_PROGRAMS_PER_SM = 4

# (block, dtype, device, normalized) -> H_b; a plain dict (not lru_cache) so torch.compile sees a constant
_HADAMARD_CACHE: dict[tuple[int, torch.dtype, torch.device, bool], torch.Tensor] = {}
# the same for the launch constants: (dtype, on_cuda, interpreter) -> scale args, block -> fp32(1/sqrt(block))
_SCALE_CONSTANTS_CACHE: dict[tuple[torch.dtype, bool, bool], tuple[tuple[str, object], ...]] = {}
_INV_SQRT_CACHE: dict[int, float] = {}


# ---------------------------------------------------------------------------------------------------------
# block size and the matrix


def hadamard_block_size(dim: int, max_block: int = MAX_BLOCK) -> int:
    """Block b of the rotation of a dim: the largest power of two dividing `dim`, capped at `max_block`.

    Raises ValueError when that is below 16 (tl.dot's smallest tile, and fp8 GEMMs need dims % 16 == 0).
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if max_block < MIN_BLOCK or max_block & (max_block - 1):
        raise ValueError(f"max_block must be a power of two >= {MIN_BLOCK}, got {max_block}")
    largest = dim & -dim
    if largest < MIN_BLOCK:
        raise ValueError(
            f"a block-Hadamard rotation of a dim of {dim} needs a power-of-two block >= {MIN_BLOCK} that "
            f"divides it, but the largest power of two dividing {dim} is {largest}; use dims that are "
            f"multiples of {MIN_BLOCK}"
        )
    return min(largest, max_block)


def hadamard_matrix(
    block: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", normalized: bool = True
) -> torch.Tensor:
    """H_b (b x b) from scipy.linalg.hadamard: entries +-1, or +-1/sqrt(b) when `normalized` (orthonormal).

    Cached per (block, dtype, device, normalized): treat the result as read-only.
    """
    _check_block(block, block)
    device = torch.device(device)
    key = (block, dtype, device, normalized)
    h = _HADAMARD_CACHE.get(key)
    if h is None:
        h = torch.from_numpy(scipy.linalg.hadamard(block)).to(torch.float64)
        if normalized:
            h = h / math.sqrt(block)
        h = h.to(device=device, dtype=dtype)
        _HADAMARD_CACHE[key] = h
    return h


def _check_block(dim: int, block: int) -> None:
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
    if dim % block:
        raise ValueError(
            f"Hadamard block {block} does not divide the last dim {dim}; "
            f"hadamard_block_size({dim}) gives the largest power of two that does"
        )


# ---------------------------------------------------------------------------------------------------------
# torch reference


def block_hadamard_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """x H_K over the last dim (K), H_K = blockdiag(H_b / sqrt(b)): reshape to (..., K/b, b) @ H_b.

    Computed in fp32 (fp64 for an fp64 input): the +-1 products are exact, the sum is rounded in fp32, then
    scaled once by 1/sqrt(b) (rounded to fp32, as torch and the kernel both do). Returns fp32 (fp64), x's shape.
    """
    k = x.shape[-1]
    _check_block(k, block)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(block, compute, x.device, normalized=False)
    blocks = x.to(compute).reshape(*x.shape[:-1], k // block, block)
    return (blocks @ h).mul_(block**-0.5).reshape(x.shape)


def hadamard_quantize_reference(
    x: torch.Tensor, block: int, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, dequant scale) of fp8.quantize(x H_K): x H_K ~= data * scale."""
    return fp8.quantize(block_hadamard_reference(x, block), dtype, granularity)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _load_hadamard(h_ptr, BLOCK: tl.constexpr):
    """The b x b +-1 matrix, loaded once per program and kept on chip for every tile it rotates."""
    r = tl.arange(0, BLOCK)
    return tl.load(h_ptr + r[:, None] * BLOCK + r[None, :])


@triton.jit
def _rotate_tile(x_ptr, stride_x, rows, row_mask, col0, h, inv_sqrt_b, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr):
    """fp32 (BLOCK_M x b) = x[rows, col0:col0+b] @ H_b * (1/sqrt(b)); masked rows read as 0.

    DOT_FP32: upcast x and use an IEEE fp32 dot (fp32 inputs, and the interpreter, whose bf16 dot is wrong);
    otherwise a bf16/fp16 tensor-core dot with fp32 accumulation: the same exact products, summed in fp32.
    inv_sqrt_b is cast to fp32: Triton types a Python float argument fp32, but inductor launches these kernels
    from torch.compile'd code with it as fp64, which made y fp64 ("Loop-carried variable acc has initial type
    fp32 but is re-assigned to fp64").
    """
    cols = col0 + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_mask[:, None], other=0.0)
    if DOT_FP32:
        y = tl.dot(x.to(tl.float32), h, input_precision="ieee")
    else:
        y = tl.dot(x, h)
    return y * tl.cast(inv_sqrt_b, tl.float32)


@triton.jit
def _rotate_kernel(
    x_ptr, h_ptr, out_ptr, n_rows, stride_x, stride_out, tiles_per_row, inv_sqrt_b,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out (fp32) = x H_K, one BLOCK_M x b tile per program."""
    t = tl.program_id(0)
    h = _load_hadamard(h_ptr, BLOCK)
    rows = (t // tiles_per_row).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = (t % tiles_per_row) * BLOCK
    row_mask = rows < n_rows
    y = _rotate_tile(x_ptr, stride_x, rows, row_mask, col0, h, inv_sqrt_b, BLOCK, DOT_FP32)
    cols = col0 + tl.arange(0, BLOCK)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=row_mask[:, None])


@triton.jit
def _rotated_partial_amax_kernel(
    x_ptr, h_ptr, partial_ptr, n_rows, stride_x, n_tiles, tiles_per_row, inv_sqrt_b,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Launch 1 (tensorwise): partial[pid] = max |x H_K| over the tiles this program visits (grid-stride)."""
    pid = tl.program_id(0)
    h = _load_hadamard(h_ptr, BLOCK)
    acc = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows = (t // tiles_per_row).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        y = _rotate_tile(x_ptr, stride_x, rows, rows < n_rows, (t % tiles_per_row) * BLOCK, h, inv_sqrt_b,
                         BLOCK, DOT_FP32)
        acc = tl.maximum(acc, tl.abs(y))
    tl.store(partial_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _rotate_cast_tensorwise_kernel(
    x_ptr, h_ptr, partial_ptr, num_partials, out_ptr, scale_ptr,
    n_rows, stride_x, stride_out, n_tiles, tiles_per_row, inv_sqrt_b,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Launch 2 (tensorwise): scale from max(partials); out = sat_cast(x H_K / scale), grid-stride over tiles."""
    pid = tl.program_id(0)
    scale = scale_from_partials(partial_ptr, num_partials, scale_ptr, fp8_max, inv_max, min_scale,
                                SCALE_BY_RECIPROCAL, PARTIALS_BLOCK)
    inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
    h = _load_hadamard(h_ptr, BLOCK)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows = (t // tiles_per_row).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        col0 = (t % tiles_per_row) * BLOCK
        y = _rotate_tile(x_ptr, stride_x, rows, row_mask, col0, h, inv_sqrt_b, BLOCK, DOT_FP32)
        q = saturating_cast(y * inv, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND,
                               out_ptr.dtype.element_ty)
        cols = col0 + tl.arange(0, BLOCK)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], q, mask=row_mask[:, None])


@triton.jit
def _rotate_cast_rowwise_kernel(
    x_ptr, h_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_out, inv_sqrt_b,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One launch (rowwise): BLOCK_M whole rows per program; rotate for the row amax, rotate again and cast."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    h = _load_hadamard(h_ptr, BLOCK)
    acc = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK):
        y = _rotate_tile(x_ptr, stride_x, rows, row_mask, col0, h, inv_sqrt_b, BLOCK, DOT_FP32)
        acc = tl.maximum(acc, tl.abs(y))
    scale = scale_from_amax(tl.max(acc, axis=1), fp8_max, inv_max, min_scale, SCALE_BY_RECIPROCAL)
    inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
    for col0 in range(0, n_cols, BLOCK):
        y = _rotate_tile(x_ptr, stride_x, rows, row_mask, col0, h, inv_sqrt_b, BLOCK, DOT_FP32)
        q = saturating_cast(y * inv[:, None], FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND,
                               out_ptr.dtype.element_ty)
        cols = col0 + tl.arange(0, BLOCK)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], q, mask=row_mask[:, None])
    tl.store(scale_ptr + rows, scale, mask=row_mask)


# ---------------------------------------------------------------------------------------------------------
# launchers


def _as_rows(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    """x as a contiguous (rows x K) view after checking what the kernels accept."""
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{what} needs a non-empty tensor with at least 1 dim, got shape {tuple(x.shape)}")
    if x.dtype not in _KERNEL_INPUT_DTYPES:
        raise ValueError(f"{what} takes bfloat16, float16 or float32 input, got {x.dtype}")
    if not MIN_BLOCK <= block <= MAX_BLOCK:
        raise ValueError(f"{what} supports blocks {MIN_BLOCK}..{MAX_BLOCK}, got {block}")
    _check_block(x.shape[-1], block)
    return x.detach().contiguous().view(-1, x.shape[-1])


def _tile_config(n_rows: int, block: int) -> dict:
    """Rows per tile (>= 16, tl.dot's minimum) and warps: about 8K elements per tile."""
    block_m = max(16, min(64, triton.next_power_of_2(n_rows)))
    return dict(BLOCK_M=block_m, BLOCK=block, num_warps=8 if block_m * block >= 8192 else 4)


def _dot_args(x: torch.Tensor, block: int) -> tuple[torch.Tensor, bool]:
    """The +-1 matrix in the dot's operand dtype, and whether the dot runs in fp32 (see _rotate_tile)."""
    dot_fp32 = x.dtype == torch.float32 or tc.is_interpreter()
    h = hadamard_matrix(block, torch.float32 if dot_fp32 else x.dtype, x.device, normalized=False)
    return h, dot_fp32


def _scale_args(x: torch.Tensor, dtype: torch.dtype) -> dict:
    """fp32 scalars and constexprs that make the kernel's scale and cast match fp8.quantize on x's device."""
    return dict(_scale_constants(dtype, x.is_cuda, tc.is_interpreter()))


def _scale_constants(dtype: torch.dtype, on_cuda: bool, interpreter: bool) -> tuple[tuple[str, object], ...]:
    """Cached in a plain dict (Dynamo traces through lru_cache wrappers, ignoring the cache, and warns)."""
    key = (dtype, on_cuda, interpreter)
    if key not in _SCALE_CONSTANTS_CACHE:
        fp8_max, mant_bits, min_exp = tc.format_constants(dtype)
        _SCALE_CONSTANTS_CACHE[key] = (
            ("fp8_max", fp8_max),
            ("inv_max", tc.fp32_reciprocal(fp8_max)),
            ("min_scale", tc.fp32(fp8.MIN_SCALE)),
            ("FP8_MAX", fp8_max),
            ("MANT_BITS", mant_bits),
            ("MIN_EXP", min_exp),
            ("SCALE_BY_RECIPROCAL", on_cuda),
            ("SOFTWARE_ROUND", interpreter),
        )
    return _SCALE_CONSTANTS_CACHE[key]


def _inv_sqrt(block: int) -> float:
    """1/sqrt(b) rounded to fp32, the factor torch applies when it scales an fp32 tensor by block**-0.5."""
    if block not in _INV_SQRT_CACHE:
        _INV_SQRT_CACHE[block] = tc.fp32(block**-0.5)
    return _INV_SQRT_CACHE[block]


@tc.opaque_to_compile
def block_hadamard_triton(x: torch.Tensor, block: int) -> torch.Tensor:
    """Triton twin of block_hadamard_reference for bf16/fp16/fp32 x: x H_K in fp32, x's shape."""
    rows = _as_rows(x, block, "block_hadamard_triton")
    n_rows, k = rows.shape
    out = torch.empty((n_rows, k), device=x.device, dtype=torch.float32)
    cfg = _tile_config(n_rows, block)
    h, dot_fp32 = _dot_args(x, block)
    tiles_per_row = k // block
    n_tiles = triton.cdiv(n_rows, cfg["BLOCK_M"]) * tiles_per_row
    _rotate_kernel[(n_tiles,)](
        rows, h, out, n_rows, rows.stride(0), out.stride(0), tiles_per_row, _inv_sqrt(block),
        DOT_FP32=dot_fp32, **cfg,
    )
    return out.view(x.shape)


@tc.opaque_to_compile
def _tensorwise(rows: torch.Tensor, block: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, k = rows.shape
    cfg = _tile_config(n_rows, block)
    h, dot_fp32 = _dot_args(rows, block)
    tiles_per_row = k // block
    n_tiles = triton.cdiv(n_rows, cfg["BLOCK_M"]) * tiles_per_row
    programs = max(1, min(n_tiles, tc.num_sms(rows) * _PROGRAMS_PER_SM))
    inv_sqrt_b = _inv_sqrt(block)
    partials = torch.empty(programs, device=rows.device, dtype=torch.float32)
    _rotated_partial_amax_kernel[(programs,)](
        rows, h, partials, n_rows, rows.stride(0), n_tiles, tiles_per_row, inv_sqrt_b, DOT_FP32=dot_fp32, **cfg,
    )
    out = torch.empty((n_rows, k), device=rows.device, dtype=dtype)
    scale = torch.empty((), device=rows.device, dtype=torch.float32)
    _rotate_cast_tensorwise_kernel[(programs,)](
        rows, h, partials, programs, out, scale,
        n_rows, rows.stride(0), out.stride(0), n_tiles, tiles_per_row, inv_sqrt_b,
        **_scale_args(rows, dtype),
        PARTIALS_BLOCK=triton.next_power_of_2(programs), DOT_FP32=dot_fp32, **cfg,
    )
    return out, scale


@tc.opaque_to_compile
def _rowwise(rows: torch.Tensor, block: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, k = rows.shape
    cfg = _tile_config(n_rows, block)
    h, dot_fp32 = _dot_args(rows, block)
    out = torch.empty((n_rows, k), device=rows.device, dtype=dtype)
    scale = torch.empty((n_rows, 1), device=rows.device, dtype=torch.float32)
    _rotate_cast_rowwise_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
        rows, h, out, scale, n_rows, k, rows.stride(0), out.stride(0), _inv_sqrt(block),
        **_scale_args(rows, dtype), DOT_FP32=dot_fp32, **cfg,
    )
    return out, scale


def block_hadamard_quantize(
    x: torch.Tensor, block: int, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: (data, dequant scale) of fp8-quantized x H_K, fused; same contract as hadamard_quantize_reference.

    x: (..., K) bf16/fp16/fp32 with block | K and 16 <= block <= 128. data has x's shape; scale is 0-dim
    (tensorwise) or (..., 1) (rowwise), fp32.
    """
    tc.check_fp8_dtype(dtype)
    rows = _as_rows(x, block, "block_hadamard_quantize")
    if granularity == "tensorwise":
        data, scale = _tensorwise(rows, block, dtype)
        return data.view(x.shape), scale
    if granularity == "rowwise":
        data, scale = _rowwise(rows, block, dtype)
        return data.view(x.shape), scale.view(*x.shape[:-1], 1)
    raise ValueError(f"granularity must be 'tensorwise' or 'rowwise', got {granularity!r}")


def hadamard_quantize(
    x: torch.Tensor, block: int, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.quantize(x H_K) -> (data, scale): the Triton kernel on an fp8-capable GPU, the torch reference elsewhere."""
    if tc.triton_fp8_ok(x) and x.dtype in _KERNEL_INPUT_DTYPES and MIN_BLOCK <= block <= MAX_BLOCK:
        return block_hadamard_quantize(x, block, dtype, granularity)
    return hadamard_quantize_reference(x, block, dtype, granularity)
