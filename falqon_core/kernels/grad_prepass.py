"""FALQON's first backward launch: dY's partial amax and W8's transposed copy for the dX GEMM, in one launch, and
(grad_prepass_oa) the e4m3 cast of O_A for the dB product.

Why: the two are independent of each other and of everything else in the backward, and each alone is a short
memory pass: on an H200, at a llama-7b attention layer and 2048 tokens, dY's amax (16 MB read) took 7.6 us and
W8's transpose (16 MB read + 16 MB written) 9.0, each spending ~2 us of it in its ramp and tail, plus the gap
between launches (docs/perf-notes.md). One launch streams the same bytes with one ramp and one tail: 14.2 us for
the two there.

Layout of the grid: the amax programs first (a grid-stride pass, as quantize's), then the transpose tiles (one
program per tile). Measured on an H200 against the separate launches (falqon layer step, CUDA-graph replay,
side by side; results/probes-step-h200/prepass/prepass-ab.txt): 1.0-1.3% faster at 2048 tokens on llama-7b
attention, 1.8-2.1% on the GQA kv projections, even (0.999-1.002) at llama-7b up and down and at 4096 tokens.
The other order (tiles first, so that dY is read last and stays in L2 for the cast) was 2.3% slower at llama-7b
up: W8 (45 MB there) and dY compete for L2.

O_A: the forward takes O_A's partial amax and a compact transposed bf16 copy of it in one launch
(quantize_transpose.amax_copy_transpose) and leaves the cast to extra programs of this launch, which nothing else
in the backward has to wait for: the forward's second O_A launch (the cast, ~1.9 us plus a ~0.4 us gap on an H200
at 2048 tokens) goes away. Its programs come last in the grid, where they fill the SMs the transpose's tail leaves
idle: 0.980-1.005x per step against placing them between the amax and the tiles
(results/probes-step-h200/oa-to-prepass/oa-last-ab.txt).

Numerics: none of its own. The partial amaxes are the same per-program maxima quantize's pass writes (the max
is exact in any order: the scale and every cast after it are bit-identical), and the transpose moves bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels.quantize import _scale_args, _software_round, cast_tensorwise_program, partial_amax_program
from falqon_core.kernels.quantize_configs import FlatConfig, TileConfig, config_for
from falqon_core.kernels.transpose import transpose_tile

_OA_BLOCK = 1024  # O_A^T elements per cast program (r_pad x M_pad: 48 x 2048 is 96 programs)


@triton.jit(do_not_specialize=["amax_programs", "w_tiles", "oa_programs"])  # 1 at small shapes: a constexpr would break .to()
def _amax_transpose_prepass_kernel(
    x_ptr, partial_ptr, n, amax_programs,
    w_ptr, wt_ptr, w_rows, w_cols, stride_wr, stride_wc, w_tiles,
    oa_ptr, oa_partial_ptr, oa_num_partials, oa8_ptr, oa_scale_ptr, oa_n, oa_programs,
    fp8_max, inv_max, min_scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr, OA_PARTIALS_BLOCK: tl.constexpr,
    CAST_OA: tl.constexpr, OA_BLOCK: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs [0, amax_programs): the amax pass's grid-stride programs over x; the next w_tiles: one tile of
    W8^T each; the last oa_programs (0 without O_A): the e4m3 cast of O_A^T from its partial amaxes."""
    pid = tl.program_id(0)
    if pid < amax_programs:
        partial_amax_program(x_ptr, partial_ptr, n, pid, amax_programs, BLOCK, NUM_STAGES)
    else:
        tile = pid - amax_programs
        if CAST_OA:
            if tile < w_tiles:
                transpose_tile(w_ptr, wt_ptr, w_rows, w_rows, w_cols, stride_wr, stride_wc, tile, BLOCK_R, BLOCK_C)
            else:
                cast_tensorwise_program(oa_ptr, oa_partial_ptr, oa_num_partials, oa8_ptr, oa_scale_ptr, oa_n,
                                        tile - w_tiles, oa_programs, fp8_max, inv_max, min_scale, FP8_MAX, MANT_BITS,
                                        MIN_EXP, SCALE_BY_RECIPROCAL, SOFTWARE_ROUND, OA_PARTIALS_BLOCK, OA_BLOCK, 1)
        else:
            transpose_tile(w_ptr, wt_ptr, w_rows, w_rows, w_cols, stride_wr, stride_wc, tile, BLOCK_R, BLOCK_C)


def launch_grad_prepass(
    dy: torch.Tensor, weight: torch.Tensor, amax_cfg: FlatConfig, tile_cfg: TileConfig,
    oa_t: torch.Tensor | None = None, oa_partials: torch.Tensor | None = None, software_round: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """grad_prepass_oa with explicit configs for its amax and transpose passes (one num_warps: the transpose's);
    without oa_t and oa_partials it leaves O_A out (tests time and check the two other passes alone). Returns
    (partials, W8^T, O_A8^T or None, its scale or None)."""
    if dy.numel() == 0 or not dy.is_contiguous():
        raise ValueError(f"grad_prepass needs a non-empty contiguous dY, got {tuple(dy.shape)}")
    if weight.dim() != 2 or weight.element_size() != 1 or weight.numel() == 0:
        raise ValueError(
            f"grad_prepass transposes a non-empty 2-D 1-byte (fp8) weight, got {tuple(weight.shape)} {weight.dtype}"
        )
    if tile_cfg.programs_per_sm is not None:
        raise ValueError(f"the transpose part runs one program per tile: programs_per_sm must be None, got {tile_cfg}")
    bad_oa = oa_t is not None and (oa_t.numel() == 0 or not oa_t.is_contiguous())
    if (oa_t is None) != (oa_partials is None) or bad_oa:
        raise ValueError("grad_prepass casts O_A from a non-empty contiguous O_A^T and its partial amaxes, given "
                         "together")
    n = dy.numel()
    amax_programs = amax_cfg.programs(n, tc.num_sms(dy))
    partials = torch.empty(amax_programs, device=dy.device, dtype=torch.float32)
    w_bytes = weight.view(torch.uint8)
    weight_t = torch.empty((weight.shape[1], weight.shape[0]), device=dy.device, dtype=torch.uint8)
    tiles = tile_cfg.tiles(weight.shape[0], weight.shape[1])
    oa8_t = oa_scale = None
    oa_programs, oa_args = 0, dict(oa_ptr=partials, oa_partial_ptr=partials, oa_num_partials=1, oa8_ptr=partials,
                                   oa_scale_ptr=partials, oa_n=0, OA_PARTIALS_BLOCK=1)  # unused without O_A
    if oa_t is not None:
        oa8_t = torch.empty(oa_t.shape, device=dy.device, dtype=fp8.E4M3)
        oa_scale = torch.empty((), device=dy.device, dtype=torch.float32)
        oa_programs = triton.cdiv(oa_t.numel(), _OA_BLOCK)
        oa_args = dict(oa_ptr=oa_t, oa_partial_ptr=oa_partials, oa_num_partials=oa_partials.numel(), oa8_ptr=oa8_t,
                       oa_scale_ptr=oa_scale, oa_n=oa_t.numel(),
                       OA_PARTIALS_BLOCK=triton.next_power_of_2(oa_partials.numel()))
    _amax_transpose_prepass_kernel[(amax_programs + oa_programs + tiles,)](
        dy.view(-1), partials, n, amax_programs,
        w_bytes, weight_t, w_bytes.shape[0], w_bytes.shape[1], w_bytes.stride(0), w_bytes.stride(1), tiles,
        oa_programs=oa_programs, **oa_args, **_scale_args(dy if oa_t is None else oa_t, fp8.E4M3),
        SOFTWARE_ROUND=_software_round(software_round), CAST_OA=oa_t is not None, OA_BLOCK=_OA_BLOCK,
        BLOCK=amax_cfg.block, NUM_STAGES=amax_cfg.num_stages, BLOCK_R=tile_cfg.block_r, BLOCK_C=tile_cfg.block_c,
        num_warps=tile_cfg.num_warps,
    )
    return partials, weight_t.view(weight.dtype), oa8_t, oa_scale


def prepass_configs(dy: torch.Tensor, weight: torch.Tensor) -> tuple[FlatConfig, TileConfig]:
    """The tuned table's configs of the two passes this launch runs (quantize_configs)."""
    return config_for("partial_amax", 1, dy.numel(), tc.is_interpreter()), config_for("transpose_bytes", *weight.shape)


@tc.opaque_to_compile
def grad_prepass_oa(
    dy: torch.Tensor, weight: torch.Tensor, oa_t: torch.Tensor, oa_partials: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dY (contiguous), W8 (N x K, fp8) and O_A^T (r_pad x M_pad, contiguous, with its partial amaxes, from
    quantize_transpose.amax_copy_transpose in the forward) -> (dY's partial amaxes, the input of cast_db or
    quantize's cast; W8^T, K x N contiguous; O_A8^T in e4m3; O_A's dequant scale). One launch, CUDA (or the
    interpreter)."""
    return launch_grad_prepass(dy, weight, *prepass_configs(dy, weight), oa_t, oa_partials)
