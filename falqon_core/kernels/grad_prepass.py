"""FALQON's first backward launch: dY's partial amax and W8's transposed copy for the dX GEMM, in one launch.

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

Numerics: none of its own. The partial amaxes are the same per-program maxima quantize's pass writes (the max
is exact in any order: the scale and every cast after it are bit-identical), and the transpose moves bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels.quantize import partial_amax_program
from falqon_core.kernels.quantize_configs import FlatConfig, TileConfig, config_for
from falqon_core.kernels.transpose import transpose_tile


@triton.jit(do_not_specialize=["amax_programs"])  # 1 at small shapes: a constexpr would break the helper's .to()
def _amax_transpose_prepass_kernel(
    x_ptr, partial_ptr, n, amax_programs,
    w_ptr, wt_ptr, w_rows, w_cols, stride_wr, stride_wc,
    BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs [0, amax_programs): the amax pass's grid-stride programs over x; the rest: one tile of W8^T each."""
    pid = tl.program_id(0)
    if pid < amax_programs:
        partial_amax_program(x_ptr, partial_ptr, n, pid, amax_programs, BLOCK, NUM_STAGES)
    else:
        transpose_tile(w_ptr, wt_ptr, w_rows, w_rows, w_cols, stride_wr, stride_wc, pid - amax_programs,
                       BLOCK_R, BLOCK_C)


def launch_grad_prepass(
    dy: torch.Tensor, weight: torch.Tensor, amax_cfg: FlatConfig, tile_cfg: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_prepass with explicit configs for its two parts (one num_warps: the transpose's)."""
    if dy.numel() == 0 or not dy.is_contiguous():
        raise ValueError(f"grad_prepass needs a non-empty contiguous dY, got {tuple(dy.shape)}")
    if weight.dim() != 2 or weight.element_size() != 1 or weight.numel() == 0:
        raise ValueError(
            f"grad_prepass transposes a non-empty 2-D 1-byte (fp8) weight, got {tuple(weight.shape)} {weight.dtype}"
        )
    if tile_cfg.programs_per_sm is not None:
        raise ValueError(f"the transpose part runs one program per tile: programs_per_sm must be None, got {tile_cfg}")
    n = dy.numel()
    amax_programs = amax_cfg.programs(n, tc.num_sms(dy))
    partials = torch.empty(amax_programs, device=dy.device, dtype=torch.float32)
    w_bytes = weight.view(torch.uint8)
    weight_t = torch.empty((weight.shape[1], weight.shape[0]), device=dy.device, dtype=torch.uint8)
    tiles = tile_cfg.tiles(weight.shape[0], weight.shape[1])
    _amax_transpose_prepass_kernel[(tiles + amax_programs,)](
        dy.view(-1), partials, n, amax_programs,
        w_bytes, weight_t, w_bytes.shape[0], w_bytes.shape[1], w_bytes.stride(0), w_bytes.stride(1),
        BLOCK=amax_cfg.block, NUM_STAGES=amax_cfg.num_stages, BLOCK_R=tile_cfg.block_r, BLOCK_C=tile_cfg.block_c,
        num_warps=tile_cfg.num_warps,
    )
    return partials, weight_t.view(weight.dtype)


def prepass_configs(dy: torch.Tensor, weight: torch.Tensor) -> tuple[FlatConfig, TileConfig]:
    """The tuned table's configs of the two passes this launch runs (quantize_configs)."""
    return config_for("partial_amax", 1, dy.numel(), tc.is_interpreter()), config_for("transpose_bytes", *weight.shape)


@tc.opaque_to_compile
def grad_prepass(dy: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dY (contiguous) and W8 (N x K, fp8) -> (dY's partial amaxes, the input of quantize's cast and of cast_db;
    W8^T, K x N contiguous). One launch, CUDA (or the interpreter)."""
    return launch_grad_prepass(dy, weight, *prepass_configs(dy, weight))
