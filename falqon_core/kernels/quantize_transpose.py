"""Tensorwise fp8 quantization that also writes the transposed copy, in the cast pass itself.

Why: FALQON's dB GEMM reduces over the tokens, so it needs dY8^T (N x M_pad) and O_A8^T (r_pad x M_pad)
M-contiguous. Quantizing and then transposing (quantize_fp8 + transpose_fp8) reads the fp8 result back
and costs a launch; for O_A, whose M x r_pad block is a column slice of the melded GEMM's output, it also
cost a `.contiguous()` copy before the amax. Here:
  launch 1  per-program max |x| over 2-D tiles of x as it is (any strides: the O_A slice is read in place);
  launch 2  each program reduces the partials to the scale (as quantize's cast does), casts its tiles and
            writes them to x8^T (zero columns from M up to M_pad, the fp8 GEMM's multiple of 16) and, when
            asked, also to x8 (M x C, row-major).
Bytes per element of an M x C bf16 x: read 2 + 2, write 1 (+ 1 with x8), against 2 + 2 + 1 read and
1 + 1 written (+ the copy for a strided x) by quantize then transpose; one launch fewer.

Numerics: the same scale (amax is a max, exact in any order; the scale is computed as quantize computes it)
and the same round-to-nearest-even cast, so x8 and x8^T are bit-identical to quantize_fp8 then
transpose_fp8 (the reference, and what FALQON ran before).

amax_copy_transpose is launch 1 with the cast left for later: it writes x^T unscaled (in x's dtype) with the partial
amaxes, so another launch can cast it (FALQON's O_A: the backward's first launch, kernels/grad_prepass.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import inverse_scale, saturating_cast, scale_from_partials
from falqon_core.kernels.quantize import _scale_args, _software_round, partial_amax, quantize_fp8_reference
from falqon_core.kernels.quantize_configs import TileConfig, config_for
from falqon_core.kernels.transpose import padded_length, transpose_fp8_reference

# the 2-D amax pass (strided x only): tiles of x per program step (elements), programs per SM.
# The cast pass takes its launch config from quantize_configs (default: these same values).
_BLOCK_R = 64
_BLOCK_C = 64
_PROGRAMS_PER_SM = 4


def quantize_transpose_fp8_reference(
    x: torch.Tensor, dtype: torch.dtype, pad_to: int = 1, keep_rows: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Torch reference: (x8 M x C or None, x8^T C x M_pad with zero columns past M, 0-dim dequant scale)."""
    x8, scale = quantize_fp8_reference(x.contiguous(), dtype, "tensorwise")
    return (x8 if keep_rows else None), transpose_fp8_reference(x8, pad_to), scale


@triton.jit
def _partial_amax_2d_kernel(x_ptr, partial_ptr, n_rows, n_cols, stride_r, stride_c,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[pid] = max |x| over the tiles this program visits (grid-stride over the tiles of x)."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(n_cols, BLOCK_C)
    n_tiles = tl.cdiv(n_rows, BLOCK_R) * col_blocks
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows = (t // col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (t % col_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    tl.store(partial_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _cast_transpose_kernel(
    x_ptr, partial_ptr, num_partials, out_ptr, out_t_ptr, scale_ptr,
    n_rows, n_rows_out, n_cols, stride_r, stride_c,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr, OUT_DTYPE: tl.constexpr,
    WRITE_ROWS: tl.constexpr, TRANSPOSED_LOAD: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Scale from max(partials); per tile q = sat_cast(x / scale), stored to out_t (n_cols x n_rows_out, bytes,
    columns past n_rows zero) and, with WRITE_ROWS, to out (n_rows x n_cols, bytes). Tiles are walked in the
    reverse of launch 1's order, so the first ones read are those launch 1 left in L2.

    TRANSPOSED_LOAD: out_t's tile is cast from a second load of the tile in transposed order instead of
    tl.trans(q). Needed for 4-byte x with WRITE_ROWS: there Triton 3.6 on sm_90 miscompiles storing q and
    tl.trans(q) from one tile (out_t wrong from its second row, NaN bytes included; bf16 x, and fp32 x without
    WRITE_ROWS, were bit-exact on an H200). The second load hits L1/L2 (~15% more time for fp32 x)."""
    pid = tl.program_id(0)
    scale = scale_from_partials(partial_ptr, num_partials, scale_ptr, fp8_max, inv_max, min_scale,
                                SCALE_BY_RECIPROCAL, PARTIALS_BLOCK)
    inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
    col_blocks = tl.cdiv(n_cols, BLOCK_C)
    n_tiles = tl.cdiv(n_rows_out, BLOCK_R) * col_blocks
    for i in tl.range(pid, n_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        t = n_tiles - 1 - i
        rows = (t // col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (t % col_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        y = x.to(tl.float32) * inv  # padding rows: 0 x inv = +0, the zero byte
        q = saturating_cast(y, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, OUT_DTYPE).to(tl.uint8, bitcast=True)
        if WRITE_ROWS:
            tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], q, mask=mask)
        mask_t = (cols[:, None] < n_cols) & (rows[None, :] < n_rows_out)
        if TRANSPOSED_LOAD:
            x_t = tl.load(x_ptr + rows[None, :] * stride_r + cols[:, None] * stride_c, mask=tl.trans(mask), other=0.0)
            y_t = x_t.to(tl.float32) * inv
            q_t = saturating_cast(y_t, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, OUT_DTYPE).to(tl.uint8, bitcast=True)
        else:
            q_t = tl.trans(q)
        tl.store(out_t_ptr + cols[:, None] * n_rows_out + rows[None, :], q_t, mask=mask_t)


@triton.jit
def _amax_copy_t_kernel(x_ptr, partial_ptr, out_t_ptr, n_rows, n_rows_out, n_cols, stride_r, stride_c,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    """partial[pid] = max |x| over this program's tiles, which it also stores transposed, unscaled, to out_t
    (n_cols x n_rows_out, x's dtype, zero columns past n_rows): launch 1 of a quantization whose cast comes later
    (amax_copy_transpose)."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(n_cols, BLOCK_C)
    n_tiles = tl.cdiv(n_rows_out, BLOCK_R) * col_blocks
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for t in tl.range(pid, n_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = (t // col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (t % col_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        mask_t = (cols[:, None] < n_cols) & (rows[None, :] < n_rows_out)
        tl.store(out_t_ptr + cols[:, None] * n_rows_out + rows[None, :], tl.trans(x), mask=mask_t)
    tl.store(partial_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


def _grid(x: torch.Tensor, n_rows: int, n_cols: int) -> int:
    tiles = triton.cdiv(n_rows, _BLOCK_R) * triton.cdiv(n_cols, _BLOCK_C)
    return max(1, min(tiles, tc.num_sms(x) * _PROGRAMS_PER_SM))


@tc.opaque_to_compile
def partial_amax_2d(x: torch.Tensor) -> torch.Tensor:
    """Launch 1: per-program max |x| of a 2-D tensor of any strides (fp32, (programs,))."""
    n_rows, n_cols = x.shape
    programs = _grid(x, n_rows, n_cols)
    partials = torch.empty(programs, device=x.device, dtype=torch.float32)
    _partial_amax_2d_kernel[(programs,)](
        x, partials, n_rows, n_cols, x.stride(0), x.stride(1), BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4,
    )
    return partials


def launch_cast_transpose(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, pad_to: int, keep_rows: bool,
    software_round: bool | None, cfg: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cast_transpose_from_partials with an explicit launch config (bit-identical output for every config)."""
    n_rows, n_cols = x.shape
    rows_out = padded_length(n_rows, pad_to)
    out = torch.empty((n_rows, n_cols) if keep_rows else (0,), device=x.device, dtype=dtype)
    out_t = torch.empty((n_cols, rows_out), device=x.device, dtype=dtype)
    scale = torch.empty((), device=x.device, dtype=torch.float32)
    programs = cfg.programs(rows_out, n_cols, tc.num_sms(x))
    _cast_transpose_kernel[(programs,)](
        x, partials, partials.numel(), out.view(torch.uint8), out_t.view(torch.uint8), scale,
        n_rows, rows_out, n_cols, x.stride(0), x.stride(1),
        **_scale_args(x, dtype),
        SOFTWARE_ROUND=_software_round(software_round), OUT_DTYPE=tc.triton_fp8_dtype(dtype),
        WRITE_ROWS=bool(keep_rows), TRANSPOSED_LOAD=bool(keep_rows) and x.element_size() == 4, PARTIALS_BLOCK=triton.next_power_of_2(partials.numel()),
        BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
    return out, out_t, scale


@tc.opaque_to_compile
def cast_transpose_from_partials(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, pad_to: int, keep_rows: bool,
    software_round: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 2: (x8 M x C, or an empty tensor without keep_rows; x8^T C x M_pad; 0-dim scale)."""
    cfg = config_for("cast_transpose", x.shape[0], x.shape[1])
    return launch_cast_transpose(x, partials, dtype, pad_to, keep_rows, software_round, cfg)


def amax_copy_transpose_reference(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (x^T padded, C x M_pad in x's dtype with zero columns past M; max |x| as a (1,) fp32)."""
    out_t = x.new_zeros((x.shape[1], padded_length(x.shape[0], pad_to)))
    out_t[:, : x.shape[0]] = x.t()
    return out_t, x.detach().abs().amax().float().reshape(1)


def launch_amax_copy_transpose(x: torch.Tensor, pad_to: int, cfg: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """amax_copy_transpose_triton with an explicit launch config (same copy and max for every config)."""
    n_rows, n_cols = x.shape
    rows_out = padded_length(n_rows, pad_to)
    out_t = torch.empty((n_cols, rows_out), device=x.device, dtype=x.dtype)
    programs = cfg.programs(rows_out, n_cols, tc.num_sms(x))
    partials = torch.empty(programs, device=x.device, dtype=torch.float32)
    _amax_copy_t_kernel[(programs,)](
        x, partials, out_t, n_rows, rows_out, n_cols, x.stride(0), x.stride(1),
        BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
    return out_t, partials


@tc.opaque_to_compile
def amax_copy_transpose_triton(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: (x^T padded, C x M_pad contiguous in x's dtype; x's partial amaxes, fp32 (programs,)). The
    tiles are those of the transposed cast this replaces (quantize_configs' "cast_transpose")."""
    return launch_amax_copy_transpose(x, pad_to, config_for("cast_transpose", x.shape[0], x.shape[1]))


def amax_copy_transpose(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M x C, any strides, e.g. FALQON's O_A columns of the melded GEMM's output) -> (x^T, C x M_pad
    contiguous in x's dtype with zero columns past M; partial amaxes, fp32, whose max is max |x|).

    Why: launch 1 of quantize_transpose_fp8 with the cast left for later. The cast of x^T is then a flat pass over
    a contiguous buffer (quantize.cast_from_partials, or extra programs of another launch, as in
    FALQON's backward: kernels/grad_prepass.py), bit-identical to quantize_transpose_fp8's x8^T (same scale from
    the same max, same elementwise cast; padding 0 casts to the zero byte). Triton on CUDA, the reference elsewhere.
    """
    if x.dim() != 2 or x.numel() == 0 or not x.is_floating_point():
        raise ValueError(f"amax_copy_transpose needs a non-empty 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    if tc.triton_fp8_ok(x):
        return amax_copy_transpose_triton(x.detach(), pad_to)
    return amax_copy_transpose_reference(x, pad_to)


def _check(x: torch.Tensor, dtype: torch.dtype) -> None:
    tc.check_fp8_dtype(dtype)
    if x.dim() != 2 or x.numel() == 0 or not x.is_floating_point():
        raise ValueError(f"quantize_transpose_fp8 needs a non-empty 2-D float tensor, got {tuple(x.shape)} {x.dtype}")


def quantize_transpose_fp8_triton(
    x: torch.Tensor, dtype: torch.dtype, pad_to: int = 1, keep_rows: bool = True, *, software_round: bool | None = None,
    partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The two Triton launches behind quantize_transpose_fp8 (same contract as the reference); with `partials`
    (x's partial amaxes from another launch, kernels/grad_prepass.py) only the second."""
    _check(x, dtype)
    x = x.detach()
    # a contiguous x (dY in FALQON's backward) takes the flat amax pass: on the H200 the 2-D tiled one read dY at
    # ~1.9 TB/s against ~2.7 for the flat one (results/shapes-levers-h200); the max is the same either way
    if partials is None:
        partials = partial_amax(x.view(-1)) if x.is_contiguous() else partial_amax_2d(x)
    out, out_t, scale = cast_transpose_from_partials(x, partials, dtype, pad_to, keep_rows, software_round)
    return (out if keep_rows else None), out_t, scale


def quantize_transpose_fp8(
    x: torch.Tensor, dtype: torch.dtype = fp8.E4M3, pad_to: int = 1, keep_rows: bool = True,
    partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """x (M x C, any strides) -> (x8 M x C or None without keep_rows, x8^T C x M_pad, tensorwise dequant scale).

    M_pad = M rounded up to pad_to; x8^T's columns past M are zero. Triton on CUDA, the reference elsewhere
    (which ignores `partials`, x's partial amaxes from grad_prepass).
    """
    if tc.triton_fp8_ok(x):
        return quantize_transpose_fp8_triton(x, dtype, pad_to, keep_rows, partials=partials)
    _check(x, dtype)
    return quantize_transpose_fp8_reference(x, dtype, pad_to, keep_rows)
