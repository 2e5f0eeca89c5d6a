"""Transposed contiguous copy of a 2-D 1-byte tensor (fp8 e4m3/e5m2, uint8, int8): R x C -> C x R.

Why: the fp8 GEMMs of FALQON's backward need W8^T (K x N, for dX) and dY8^T (N x M, for dB) contiguous.
torch's `x.t().contiguous()` on fp8 runs the generic elementwise copy kernel, which does not vectorise a
transposed 1-byte copy: ~290 GB/s on an H100 (0.117 ms for 4096 x 4096), against ~3 TB/s for a plain copy.
The Triton kernel loads a BLOCK_R x BLOCK_C tile with coalesced rows, transposes it in registers/shared
memory (tl.trans) and stores it with coalesced rows of the output. It only moves bytes (the host views fp8
as uint8), so the result is bit-identical to the reference for every fp8 value, NaN encodings included.
No host sync: capturable in a CUDA graph. Bytes moved: R x C read + R x C written.

`pad_to` (rows of the input, i.e. columns of the output) writes a C x R_pad result whose last R_pad - R
columns are zero, in the same pass: the fp8 GEMMs that reduce over the token dimension (FALQON's dB) need
that reduction length to be a multiple of 16, and zero columns add nothing to the dot products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
from falqon_core.kernels.quantize_configs import TileConfig, config_for

# the tile and warps come from quantize_configs (default 64 x 64 bytes, 4 warps: 32 bytes per thread)


def padded_length(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (>= 1)."""
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    return -(-n // multiple) * multiple


def transpose_fp8_reference(x: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    """Torch reference: x.t().contiguous() (C x R, same dtype), zero columns appended up to a multiple of pad_to."""
    n_rows = x.shape[0]
    rows_out = padded_length(n_rows, pad_to)
    if rows_out == n_rows:
        return x.t().contiguous()
    out = torch.zeros((x.shape[1], rows_out), device=x.device, dtype=torch.uint8)
    out[:, :n_rows] = x.view(torch.uint8).t()
    return out.view(x.dtype)


@triton.jit
def transpose_tile(
    x_ptr, out_ptr, n_rows, n_rows_out, n_cols, stride_r, stride_c, pid,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[c, r] = x[r, c] for tile `pid` of x (BLOCK_R x BLOCK_C); out is n_cols x n_rows_out, row-major, and its
    columns n_rows .. n_rows_out - 1 (the padding) are written as zeros. A jit helper, so that a launch doing
    other work too (kernels/grad_prepass.py) moves the same bytes.

    Tiles are numbered row-block-major: consecutive programs read neighbouring column blocks of the
    same input rows and write neighbouring row blocks of the output.
    """
    col_blocks = tl.cdiv(n_cols, BLOCK_C)
    pid_r = pid // col_blocks
    pid_c = pid % col_blocks
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0)
    tile_t = tl.trans(tile)  # BLOCK_C x BLOCK_R
    mask_t = (cols[:, None] < n_cols) & (rows[None, :] < n_rows_out)
    tl.store(out_ptr + cols[:, None] * n_rows_out + rows[None, :], tile_t, mask=mask_t)


@triton.jit
def _transpose_bytes_kernel(
    x_ptr, out_ptr, n_rows, n_rows_out, n_cols, stride_r, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per tile: transpose_tile."""
    transpose_tile(x_ptr, out_ptr, n_rows, n_rows_out, n_cols, stride_r, stride_c, tl.program_id(0), BLOCK_R, BLOCK_C)


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"transpose_fp8 needs a 2-D tensor, got shape {tuple(x.shape)}")
    if x.element_size() != 1:
        raise ValueError(f"transpose_fp8 needs a 1-byte dtype (fp8 e4m3/e5m2, uint8, int8), got {x.dtype}")


def launch_transpose_bytes(x: torch.Tensor, pad_to: int, cfg: TileConfig) -> torch.Tensor:
    """transpose_fp8_triton with an explicit tile config (the same bytes for every config). One program per tile:
    the kernel has no grid-stride loop, so cfg.programs_per_sm and cfg.num_stages must be None."""
    if cfg.programs_per_sm is not None or cfg.num_stages is not None:
        raise ValueError(f"transpose_bytes runs one program per tile: programs_per_sm and num_stages must be None, got {cfg}")
    _check_input(x)
    n_rows, n_cols = x.shape
    rows_out = padded_length(n_rows, pad_to)
    out = torch.empty((n_cols, rows_out), device=x.device, dtype=torch.uint8)
    if x.numel() > 0:
        xb = x.view(torch.uint8)
        grid = (cfg.tiles(rows_out, n_cols),)
        _transpose_bytes_kernel[grid](
            xb, out, n_rows, rows_out, n_cols, xb.stride(0), xb.stride(1),
            BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
        )
    return out.view(x.dtype)


@tc.opaque_to_compile
def transpose_fp8_triton(x: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    """The Triton kernel behind transpose_fp8; same contract as transpose_fp8_reference (any strides)."""
    _check_input(x)
    return launch_transpose_bytes(x, pad_to, config_for("transpose_bytes", x.shape[0], x.shape[1]))


def transpose_fp8(x: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    """x (R x C, 1-byte dtype) -> contiguous C x R_pad copy (R_pad = R rounded up to pad_to, zero columns);
    the Triton kernel on CUDA, the reference elsewhere."""
    if x.is_cuda and not tc.is_interpreter():
        return transpose_fp8_triton(x, pad_to)
    _check_input(x)
    return transpose_fp8_reference(x, pad_to)
