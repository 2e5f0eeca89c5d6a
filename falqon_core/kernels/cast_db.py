"""FALQON's dB = dY^T . O_A computed by the e5m2 cast of dY itself, from the tiles it has just cast (no dY8^T).

Why: dB reduces over the tokens M, and an fp8 tensor-core GEMM (cuBLASLt, wgmma) takes both operands
K-contiguous, i.e. M-contiguous here. dY8 (M x N, e5m2) is N-contiguous, so the cuBLAS path needs a transposed
copy dY8^T (N x M_pad), written by the cast, and that transposed store of 1-byte elements ran at ~2 TB/s on an
H200 (the largest memory pass of a llama-7b attention step; docs/perf-notes.md). Here the cast pass keeps each
tile it casts, widens it to fp16 in registers (e5m2 and e4m3 values are exact in fp16, so every product is exact,
as in the fp8 GEMM) and feeds it to fp16 tensor cores as an N-major operand, which 16-bit MMAs take as it lies:

  dY8 = sat_cast(dY / s_dY)                                 (bit-identical to quantize_fp8)
  dB[n, j] = s_dY s_OA sum_m dY8[m, n] O_A8^T[j, m]         (fp32 accumulation, then the two scales)

Launches: dY's partial amax (quantize's, or, in FALQON's backward, kernels/grad_prepass.py's, which also
transposes W8 in the same launch), then the fused cast + dB over (N blocks x r blocks, splits of M). With
one split each program writes its dB block; with several, each writes a partial (splits x N x r fp32) and a
third launch sums them in split order (deterministic: the same bits on every run). The split count aims at a
few programs per SM, so a layer with few N blocks still fills the GPU.

Numerics: the same fp8 operands and scales as the cuBLAS GEMM; the fp32 sums are closer to exact (tests bound
them against fp64). Where it is faster than cast + transpose + cuBLAS is a shape question (the falqon layer's
db_path option and its rule `fused_db_wins`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from falqon_core.kernels import _triton_common as tc
# jit helpers are imported by name: inductor re-emits user Triton kernels and loses module aliases
from falqon_core.kernels._triton_common import inverse_scale, saturating_cast, scale_from_partials
from falqon_core.kernels.quantize import (
    _scale_args, _software_round, partial_amax, quantize_fp8_reference, quantize_fp8_triton,
)


def db_gemm_reference(
    dy8: torch.Tensor, dy_scale: torch.Tensor, oa8_t: torch.Tensor, oa_scale: torch.Tensor, rank: int
) -> torch.Tensor:
    """dB (N x rank, fp32) = dY8^T . O_A8 x both scales, from dY8 (M x N) and O_A8^T (r_pad x M_pad, columns past M
    ignored); fp32 matmul of the exact fp8 values."""
    _check(dy8, oa8_t, rank)
    m = dy8.shape[0]
    acc = dy8.float().t() @ oa8_t[:rank, :m].float().t()
    return acc * (dy_scale.float() * oa_scale.float())


def _check(dy8: torch.Tensor, oa8_t: torch.Tensor, rank: int) -> None:
    if dy8.dim() != 2 or oa8_t.dim() != 2:
        raise ValueError(f"quantize_db needs 2-D dY8 and O_A8^T, got {tuple(dy8.shape)} and {tuple(oa8_t.shape)}")
    if oa8_t.shape[1] < dy8.shape[0] or not 0 <= rank <= oa8_t.shape[0]:
        raise ValueError(
            f"quantize_db: O_A8^T {tuple(oa8_t.shape)} must have >= M = {dy8.shape[0]} columns and >= rank = {rank} rows"
        )


@triton.jit
def _cast_db_kernel(x_ptr, partial_ptr, num_partials, out_ptr, scale_ptr, oa_ptr, oa_scale_ptr, db_ptr,
                    n_tokens, n_cols, rank, stride_x, stride_oa, tokens_per_split,
                    fp8_max, inv_max, min_scale,
                    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
                    SCALE_BY_RECIPROCAL: tl.constexpr, SOFTWARE_ROUND: tl.constexpr, OA_DTYPE: tl.constexpr,
                    PARTIALS_BLOCK: tl.constexpr, SCALED: tl.constexpr, DOT_F32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, WRITE_ROWS: tl.constexpr):
    """The e5m2 cast of dY (its scale from the partial amaxes) over one column block x one token split, and the
    same tiles' share of dB: q = sat_cast(dY / s) is stored to dY8 and, widened to fp16, multiplied with O_A8."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    scale = scale_from_partials(partial_ptr, num_partials, scale_ptr, fp8_max, inv_max, min_scale,
                                SCALE_BY_RECIPROCAL, PARTIALS_BLOCK)
    inv = inverse_scale(scale)  # x * RN(1 / scale): see _triton_common.inverse_scale
    r_blocks = tl.cdiv(rank, BLOCK_R)
    n0 = (pid // r_blocks) * BLOCK_N
    r0 = (pid % r_blocks) * BLOCK_R
    ns = n0 + tl.arange(0, BLOCK_N)
    rs = r0 + tl.arange(0, BLOCK_R)
    n_mask = ns < n_cols
    r_mask = rs < rank
    m_lo = split * tokens_per_split
    m_hi = tl.minimum(m_lo + tokens_per_split, n_tokens)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)  # dB^T's block: O_A8^T . dY8, no operand transposed
    for m0 in range(m_lo, m_hi, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_mask = ms < m_hi
        mask = m_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + ms[:, None].to(tl.int64) * stride_x + ns[None, :], mask=mask, other=0.0)
        y = x.to(tl.float32) * inv
        q = saturating_cast(y, FP8_MAX, MANT_BITS, MIN_EXP, SOFTWARE_ROUND, out_ptr.dtype.element_ty)
        if WRITE_ROWS and r0 == 0:  # the r blocks share the cast: one of them stores it
            tl.store(out_ptr + ms[:, None].to(tl.int64) * n_cols + ns[None, :], q, mask=mask)
        oa = tl.load(oa_ptr + rs[:, None].to(tl.int64) * stride_oa + ms[None, :],
                     mask=r_mask[:, None] & m_mask[None, :], other=0).to(OA_DTYPE, bitcast=True)
        if DOT_F32:  # the interpreter: fp32 products of the same exact values
            acc = tl.dot(oa.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        else:  # fp16 holds every e5m2 and e4m3 value exactly: exact products, fp32 sum; dY8's tile is the
            acc = tl.dot(oa.to(tl.float16), q.to(tl.float16), acc)  # N-major B operand fp16 MMAs take as is
    out_mask = r_mask[:, None] & n_mask[None, :]
    offs_db = ns[None, :].to(tl.int64) * rank + rs[:, None]
    if SCALED:
        acc = acc * (scale * tl.load(oa_scale_ptr))
        tl.store(db_ptr + offs_db, acc, mask=out_mask)
    else:
        tl.store(db_ptr + split.to(tl.int64) * n_cols * rank + offs_db, acc, mask=out_mask)


@triton.jit
def _db_reduce_kernel(part_ptr, out_ptr, dy_scale_ptr, oa_scale_ptr, n_out, splits, BLOCK: tl.constexpr):
    """out = (sum over splits of the partials, in split order) x both scales."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_out
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * n_out + i, mask=mask, other=0.0)
    tl.store(out_ptr + i, acc * (tl.load(dy_scale_ptr) * tl.load(oa_scale_ptr)), mask=mask)


@dataclass(frozen=True)
class CastDbConfig:
    """The fused cast + dB kernel: block_n columns of dY x block_m tokens per step, r blocks up to max_block_r,
    warps by r block (wide accumulators take more registers), programs per SM the token split aims at, and
    Triton's pipelining depth of the token loop (None: Triton's default). Defaults: the fastest of 12 configs
    timed on an H200 at 12 shapes (docs/perf-notes.md); a register prefetch of the next tiles was slower at every
    shape. Ranks above WIDE_R take CAST_DB_CONFIG_WIDE_R (config_for_rank)."""

    block_n: int = 64
    block_m: int = 32
    max_block_r: int = 256
    warps_small_r: int = 4
    warps_large_r: int = 8
    programs_per_sm: int = 4
    num_stages: int | None = None


CAST_DB_CONFIG = CastDbConfig()
# r > 32 (r blocks of 64 and more): 64-token tiles, 2 programs per SM, 3 stages, i.e. the same bytes in flight
# per SM from half the programs, so half the split partials. Timed side by side in the falqon step on an H200
# (results/probes-step-h200/castdb-stages/): 0.970-0.997x at 10 of 11 cells with r 40-64 (1.021 at llama-7b up,
# r 64, 4096 tokens), but 0.994-1.038x at r 8-24, where the kernel wants the programs: those keep CAST_DB_CONFIG.
WIDE_R = 32
CAST_DB_CONFIG_WIDE_R = CastDbConfig(block_m=64, programs_per_sm=2, num_stages=3)


def config_for_rank(rank: int) -> CastDbConfig:
    """The launch config quantize_db_triton uses at this adapter rank."""
    return CAST_DB_CONFIG_WIDE_R if rank > WIDE_R else CAST_DB_CONFIG


def quantize_db_reference(
    dy: torch.Tensor, oa8_t: torch.Tensor, oa_scale: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dY8, its tensorwise scale, dB): quantize_fp8 of dY, then db_gemm_reference."""
    dy8, dy_scale = quantize_fp8_reference(dy.contiguous(), dtype, "tensorwise")
    return dy8, dy_scale, db_gemm_reference(dy8, dy_scale, oa8_t, oa_scale, rank)


@tc.opaque_to_compile
def quantize_db_triton(
    dy: torch.Tensor, oa8_t: torch.Tensor, oa_scale: torch.Tensor, rank: int, dtype: torch.dtype,
    keep_rows: bool = True, software_round: bool | None = None, partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton path of quantize_db_reference: the amax pass (unless `partials`, dY's partial amaxes from
    grad_prepass, are given), then the fused cast + dB (+ the split reduce)."""
    return launch_quantize_db(dy, oa8_t, oa_scale, rank, dtype, keep_rows, config_for_rank(rank), software_round,
                              partials)


def launch_quantize_db(
    dy: torch.Tensor, oa8_t: torch.Tensor, oa_scale: torch.Tensor, rank: int, dtype: torch.dtype,
    keep_rows: bool, cfg: CastDbConfig, software_round: bool | None = None, partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_db_triton with an explicit launch config (the same dY8 bytes for every config; dB's fp32 sums
    in a config's own order)."""
    tc.check_fp8_dtype(dtype)
    dy = dy.detach().contiguous()
    if dy.dim() != 2 or dy.numel() == 0:
        raise ValueError(f"quantize_db needs a non-empty 2-D dY, got {tuple(dy.shape)}")
    _check(dy, oa8_t, rank)
    n_tokens, n_cols = dy.shape
    if rank == 0:  # no dB to fuse
        dy8, dy_scale = quantize_fp8_triton(dy, dtype, "tensorwise", software_round=software_round)
        return dy8, dy_scale, dy8.new_zeros((n_cols, 0), dtype=torch.float32)
    if partials is None:
        partials = partial_amax(dy.view(-1))
    dy8 = torch.empty((n_tokens, n_cols) if keep_rows else (0,), device=dy.device, dtype=dtype)
    dy_scale = torch.empty((), device=dy.device, dtype=torch.float32)
    db = torch.empty((n_cols, rank), device=dy.device, dtype=torch.float32)
    block_r = min(cfg.max_block_r, max(16, triton.next_power_of_2(rank)))
    base = triton.cdiv(n_cols, cfg.block_n) * triton.cdiv(rank, block_r)
    want = max(1, (tc.num_sms(dy) * cfg.programs_per_sm) // base)
    tokens_per_split = triton.cdiv(triton.cdiv(n_tokens, min(want, triton.cdiv(n_tokens, cfg.block_m))), cfg.block_m)
    tokens_per_split *= cfg.block_m
    splits = triton.cdiv(n_tokens, tokens_per_split)
    target = db if splits == 1 else torch.empty((splits, n_cols, rank), device=dy.device, dtype=torch.float32)
    _cast_db_kernel[(base, splits)](
        dy, partials, partials.numel(), dy8, dy_scale, oa8_t.view(torch.uint8), oa_scale, target,
        n_tokens, n_cols, rank, dy.stride(0), oa8_t.stride(0), tokens_per_split,
        **_scale_args(dy, dtype), SOFTWARE_ROUND=_software_round(software_round),
        OA_DTYPE=tc.triton_fp8_dtype(oa8_t.dtype), PARTIALS_BLOCK=triton.next_power_of_2(partials.numel()),
        SCALED=splits == 1, DOT_F32=tc.is_interpreter(), BLOCK_N=cfg.block_n, BLOCK_R=block_r, BLOCK_M=cfg.block_m,
        WRITE_ROWS=bool(keep_rows), num_warps=cfg.warps_small_r if block_r <= 64 else cfg.warps_large_r,
        **({} if cfg.num_stages is None else {"num_stages": cfg.num_stages}),
    )
    if splits > 1:
        block = 1024
        _db_reduce_kernel[(triton.cdiv(db.numel(), block),)](
            target, db, dy_scale, oa_scale, db.numel(), splits, BLOCK=block
        )
    return dy8, dy_scale, db


def quantize_db(
    dy: torch.Tensor, oa8_t: torch.Tensor, oa_scale: torch.Tensor, rank: int, dtype: torch.dtype,
    keep_rows: bool = True, partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """dY (M x N) -> (dY8 M x N or None without keep_rows, dequant scale, dB = dY8^T . O_A8 x both scales, N x rank
    fp32). Triton on CUDA (one pass over dY after its amax: no dY8^T), the reference elsewhere (which ignores
    `partials`, dY's partial amaxes from grad_prepass)."""
    if tc.triton_fp8_ok(dy) and oa8_t.stride(1) == 1:
        dy8, dy_scale, db = quantize_db_triton(dy, oa8_t, oa_scale, rank, dtype, keep_rows, None, partials)
    else:
        dy8, dy_scale, db = quantize_db_reference(dy, oa8_t, oa_scale, rank, dtype)
    return (dy8 if keep_rows else None), dy_scale, db
