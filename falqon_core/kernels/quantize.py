"""Fused amax + scale + cast to fp8 (tensorwise or rowwise).

The Triton path is bit-exact with the torch reference on the device it runs on:
- scale: amax / fp8_max clamped at fp8.MIN_SCALE, with torch's fp32 ops. torch computes
  `tensor / python_float` on CUDA as tensor * fp32(1 / fp8_max) (ATen's BinaryDivTrueKernel.cu turns a
  CPU-scalar divisor into a reciprocal multiply) and on CPU as a true division; the kernel does the same
  as torch on the tensor's device (`SCALE_BY_RECIPROCAL`).
- data: x times the correctly rounded fp32 reciprocal of the scale (inverse_scale: one IEEE division per
  program, tl.math.div_rn, as torch.reciprocal computes it; Triton's plain `/` is an approximate division on
  NVIDIA), clamp to +-fp8_max, round-to-nearest-even. A division per element made the cast compute-bound.

Tensorwise needs the global amax before any element can be cast, hence two launches: a grid-stride pass
writing one partial amax per program into an uninitialised buffer (no zeroing launch, no atomics,
deterministic), then a grid-stride cast whose programs each reduce those few hundred partials (from L2)
before casting; it walks the blocks in reverse, so its first reads find what launch 1 left in L2. Neither syncs with the host, so both can be captured in a CUDA graph.
Rowwise reads each row once: one program loads BLOCK_M whole rows, reduces, scales and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.fp8 import Granularity
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import inverse_scale, saturating_cast, scale_from_amax, scale_from_partials_of
from falqon_core.kernels.quantize_configs import FlatConfig, config_for

# rowwise: a row of up to this many elements is held in registers (one read); longer rows take two passes
_ROWWISE_MAX_ONE_PASS = 16384
_ROWWISE_CHUNK = 4096
_ROWWISE_TILE_ELEMENTS = 8192


def quantize_fp8_reference(
    x: torch.Tensor, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (data, dequant scale) exactly as falqon_core.fp8.quantize computes them."""
    return fp8.quantize(x, dtype, granularity)


@triton.jit
def partial_amax_program(x_ptr, partial_ptr, n, pid, programs, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    """partial[pid] = max |x| over the blocks program `pid` of `programs` visits (grid-stride over n elements);
    a jit helper, so that a launch doing other work too (kernels/grad_prepass.py) runs the same pass."""
    step = programs.to(tl.int64) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(pid.to(tl.int64) * BLOCK, n, step, num_stages=NUM_STAGES):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    tl.store(partial_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def _partial_amax_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    """partial[pid] = max |x| over the blocks this program visits (grid-stride over n elements)."""
    partial_amax_program(x_ptr, partial_ptr, n, tl.program_id(0), tl.num_programs(0), BLOCK, NUM_STAGES)


@triton.jit
def _cast_tensorwise_kernel(
    x_ptr, partial_ptr, num_partials, out_ptr, scale_ptr, n,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Reduce the partial amaxes to the scale, then out = sat_cast(x / scale) over a grid-stride loop."""
    cast_tensorwise_program(x_ptr, partial_ptr, num_partials, out_ptr, scale_ptr, n, tl.program_id(0),
                            tl.num_programs(0), fp8_max, inv_max, min_scale, FP8_MAX, MANT_BITS, MIN_EXP,
                            SCALE_BY_RECIPROCAL, SOFTWARE_ROUND, PARTIALS_BLOCK, BLOCK, NUM_STAGES)


@triton.jit
def cast_tensorwise_program(
    x_ptr, partial_ptr, num_partials, out_ptr, scale_ptr, n, pid, programs,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The cast pass of program `pid` of `programs`: a jit helper, so that a launch doing other work too
    (kernels/grad_prepass.py casts O_A there) runs the same scale and cast, bit for bit."""
    scale = scale_from_partials_of(pid, partial_ptr, num_partials, scale_ptr, fp8_max, inv_max, min_scale,
                                   SCALE_BY_RECIPROCAL, PARTIALS_BLOCK)
    inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
    # blocks in the reverse of launch 1's order: the last blocks it read are the ones still in L2
    n_blocks = tl.cdiv(n, BLOCK)
    for i in tl.range(pid, n_blocks, programs, num_stages=NUM_STAGES):
        offs = (n_blocks - 1 - i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = x * inv
        q = saturating_cast(y, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, q, mask=mask)


@triton.jit
def _quantize_rowwise_kernel(
    x_ptr, out_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_out,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """BLOCK_M rows per program: row amax -> per-row scale -> sat_cast(x / scale). ONE_PASS: rows fit in BLOCK_K."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows[:, None] * stride_x
    out_rows = out_ptr + rows[:, None] * stride_out
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = scale_from_amax(amax, fp8_max, inv_max, min_scale, SCALE_BY_RECIPROCAL)
        inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
        y = x * inv[:, None]
        q = saturating_cast(y, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, out_ptr.dtype.element_ty)
        tl.store(out_rows + cols[None, :], q, mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=1)
        scale = scale_from_amax(amax, fp8_max, inv_max, min_scale, SCALE_BY_RECIPROCAL)
        inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = x * inv[:, None]
            q = saturating_cast(y, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, out_ptr.dtype.element_ty)
            tl.store(out_rows + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


def _scale_args(x: torch.Tensor, dtype: torch.dtype) -> dict:
    """The fp32 scalars and constexprs that make the kernel's scale and cast match torch's on x's device."""
    fp8_max, mant_bits, min_exp = tc.format_constants(dtype)
    return dict(
        fp8_max=fp8_max,
        inv_max=tc.fp32_reciprocal(fp8_max),
        min_scale=tc.fp32(fp8.MIN_SCALE),
        FP8_MAX=fp8_max,
        MANT_BITS=mant_bits,
        MIN_EXP=min_exp,
        SCALE_BY_RECIPROCAL=x.is_cuda,
    )


def _software_round(software_round: bool | None) -> bool:
    return tc.is_interpreter() if software_round is None else bool(software_round)


def tensorwise_grid(x: torch.Tensor, n: int) -> tuple[int, int]:
    """(programs, BLOCK) of the partial amax pass over n elements (its output has `programs` partials)."""
    cfg = config_for("partial_amax", 1, n, tc.is_interpreter())
    return cfg.programs(n, tc.num_sms(x)), cfg.block


def launch_partial_amax(x_flat: torch.Tensor, cfg: FlatConfig) -> torch.Tensor:
    """partial_amax with an explicit launch config (the tuner and the config tests call it; the max is the same
    for every config)."""
    n = x_flat.numel()
    programs = cfg.programs(n, tc.num_sms(x_flat))
    partials = torch.empty(programs, device=x_flat.device, dtype=torch.float32)
    _partial_amax_kernel[(programs,)](x_flat, partials, n, BLOCK=cfg.block, NUM_STAGES=cfg.num_stages,
                                      num_warps=cfg.num_warps)
    return partials


@tc.opaque_to_compile
def partial_amax(x_flat: torch.Tensor) -> torch.Tensor:
    """Launch 1 of tensorwise quantization: per-program max |x| of a contiguous tensor (fp32, programs,)."""
    return launch_partial_amax(x_flat, config_for("partial_amax", 1, x_flat.numel(), tc.is_interpreter()))


def launch_cast_tensorwise(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, software_round: bool | None, cfg: FlatConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """cast_tensorwise_from_partials with an explicit launch config (bit-identical output for every config)."""
    tc.check_fp8_dtype(dtype)
    x_flat = x.contiguous().view(-1)
    n = x_flat.numel()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    scale = torch.empty((), device=x.device, dtype=torch.float32)
    programs = cfg.programs(n, tc.num_sms(x_flat))
    _cast_tensorwise_kernel[(programs,)](
        x_flat, partials, partials.numel(), out, scale, n,
        **_scale_args(x, dtype),
        SOFTWARE_ROUND=_software_round(software_round),
        PARTIALS_BLOCK=triton.next_power_of_2(partials.numel()),
        BLOCK=cfg.block,
        NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    )
    return out, scale


@tc.opaque_to_compile
def cast_tensorwise_from_partials(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, software_round: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 2 of tensorwise quantization: scale from max(partials), cast x. Returns (data like x, 0-dim scale).

    Also used by the melded GEMM, whose epilogue writes the partial amaxes of o_a.
    """
    cfg = config_for("cast_tensorwise", 1, x.numel(), tc.is_interpreter())
    return launch_cast_tensorwise(x, partials, dtype, software_round, cfg)


def _quantize_tensorwise_triton(x: torch.Tensor, dtype: torch.dtype, software_round: bool | None):
    x = x.contiguous()
    return cast_tensorwise_from_partials(x, partial_amax(x.view(-1)), dtype, software_round)


def _rowwise_config(n_rows: int, n_cols: int) -> dict:
    """Block sizes and warps of the rowwise kernel: about 8K elements per program, whole rows when they fit."""
    block_k = triton.next_power_of_2(n_cols)
    one_pass = block_k <= _ROWWISE_MAX_ONE_PASS
    if not one_pass:
        block_k = _ROWWISE_CHUNK
    block_m = max(1, min(_ROWWISE_TILE_ELEMENTS // block_k, triton.next_power_of_2(n_rows), 64))
    tile = block_m * block_k
    num_warps = 16 if tile >= 16384 else 8 if tile >= 4096 else 4
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=num_warps)


@tc.opaque_to_compile
def _quantize_rowwise_triton(x: torch.Tensor, dtype: torch.dtype, software_round: bool | None):
    x2 = x.contiguous().view(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=dtype)
    scale = torch.empty((n_rows, 1), device=x.device, dtype=torch.float32)
    cfg = _rowwise_config(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]),)
    _quantize_rowwise_kernel[grid](
        x2, out, scale, n_rows, n_cols, x2.stride(0), out.stride(0),
        **_scale_args(x, dtype),
        SOFTWARE_ROUND=_software_round(software_round),
        **cfg,
    )
    return out.view(x.shape), scale.view(*x.shape[:-1], 1)


def quantize_fp8_triton(
    x: torch.Tensor,
    dtype: torch.dtype = fp8.E4M3,
    granularity: Granularity = "tensorwise",
    *,
    software_round: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels behind quantize_fp8; same contract as quantize_fp8_reference.

    software_round: round to the fp8 grid with fp32 adds before the cast (None: only under the
    interpreter, whose own cast does not round to nearest even; see _triton_common).
    """
    tc.check_fp8_dtype(dtype)
    if x.numel() == 0 or x.dim() == 0:
        raise ValueError(f"quantize_fp8 needs a non-empty tensor with at least 1 dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_fp8 needs a floating-point tensor, got {x.dtype}")
    x = x.detach()
    if granularity == "tensorwise":
        return _quantize_tensorwise_triton(x, dtype, software_round)
    if granularity == "rowwise":
        return _quantize_rowwise_triton(x, dtype, software_round)
    raise ValueError(f"granularity must be 'tensorwise' or 'rowwise', got {granularity!r}")


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x (2-D) to fp8; the fast path on CUDA, the reference elsewhere."""
    if tc.triton_fp8_ok(x):
        return quantize_fp8_triton(x, dtype, granularity)
    return quantize_fp8_reference(x, dtype, granularity)


def cast_from_partials(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(x, dtype, "tensorwise") when x's amax pass has already run (`partials`, whose max is max |x|):
    the cast launch alone on CUDA; the reference elsewhere, which takes its own amax (the same value)."""
    if tc.triton_fp8_ok(x):
        return cast_tensorwise_from_partials(x, partials, dtype)
    return quantize_fp8_reference(x, dtype, "tensorwise")
