"""FALQON: LoRA melded into one FP8 backbone matrix (as the FALQON reference code does it, written out below;
docs/architecture.md shows where the methods sit).

A frozen nn.Linear(K -> N) becomes one e4m3 matrix [W; A] of (N+r) x K with one tensorwise scale s,
plus a trainable B (N x r) that the forward never reads:
  forward   x -> e4m3; one fp8 GEMM against [W; A] gives (out = x.W^T, O_A = x.A^T); O_A kept in e4m3.
  backward  dY -> e5m2; dX = dY.W8 (fp8 GEMM); dB = dY^T.O_A. No gradient for W or A.
            The fp8 GEMMs want their operands K-contiguous: W8^T (K x N, unless cached) is made by a tiled Triton
            byte transpose on CUDA (in the launch that also takes dY's amax, kernels/grad_prepass.py; torch's
            generic copy of a transposed fp8 tensor is not vectorised); O_A8^T (r x M) is written by its e4m3
            cast itself. dB (`db_path`): either the e5m2 cast of dY also computes dB from its tiles
            (kernels/cast_db.quantize_db: fp16 tensor cores take the N-major dY8 tile as it is, so no dY8^T is
            written), or the cast writes dY8 and dY8^T in one pass (quantize_transpose_fp8) for a cuBLAS fp8 dB
            GEMM; "auto" picks per shape (fused_db_wins).
  update    after each optimizer step, the top-k rows of B (by L1 norm) are merged into W8 in fp8 units
            of s (W8[rows] += B[rows].A8, saturating re-cast) and B is zeroed; s never changes.

Differences from the reference code (github.com/iamkanghyunchoi/falqon, float8_linear_falqon.py),
all deliberate:
- O_A is saved as a compact bf16 copy (r x M, transposed, with its amax taken in the same forward launch) and
  cast to e4m3 in the backward's first launch; the reference saves O_A as a view of the melded GEMM's output
  (which keeps that whole M x (N + r) output alive until the backward) and casts it in the backward: same values,
  2 r x M bytes saved instead of 2 (N + r) x M.
- The proxy update sums W8 + B.A8 in fp32 before the e4m3 cast, as the reference does (its B, and so
  its AdamW state, is fp32; so is B here, whatever the layer's compute dtype).
- k is a parameter (default r, what the reference ran: its warm-up phase with k = r is never ended)
  with an optional schedule to a smaller k; the reference's `num_topk` default of 10 is never reached.
- The LoRA alpha / r scaling is ignored, as in the reference (its `scaling` attribute is never used).
- The SVD runs on the weight's device (the reference moves CPU weights to CUDA for it).

Options (AdapterConfig.options):
  topk            rows merged per update (default: rank), 1 <= topk <= N
  topk_after      k after the warm-up (default: topk, i.e. no schedule)
  warmup_steps    number of updates that use `topk` before `topk_after` applies (default 0)
  svd_dtype       "float32" (default, as the reference) or "float64"
  init_svd        "lowrank" (default: randomized top-r SVD of the quantization error, falqon_core.lowrank; ~100x
                  faster on LLaMA-7B) or "exact" (the reference's full SVD; A differs by the approximation only)
  cache_weight_t  keep a K x N fp8 copy of W8 for the dX GEMM (default False; see FalqonLinear)
  fast_accum      forward (melded) GEMM with cuBLASLt's use_fast_accum (default True, as the reference; the
                  fp8 tensor-core accumulation bound of tests/bounds.py holds either way)
  db_path         "auto" (default: per shape, `fused_db_wins`), "fused" (dB computed by dY's e5m2 cast from the
                  same e5m2 and e4m3 values: exact products, fp32 sums) or "transpose" (dY8^T + cuBLAS fp8 GEMM,
                  the previous path). The same operands either way; the fused fp32 sums are closer to the exact
                  ones (H200, M = N = 4096: max relative error 3e-5 against an fp32 matmul, cuBLAS's fp8 GEMM 6e-2)

Padding (inside the layer, so a benchmark times what a user runs): the fp8 GEMM (torch._scaled_mm) wants
its reduction length and output width to be multiples of 16, else fp8.scaled_mm falls back to a bf16
GEMM. The melded matrix gets zero rows up to N + r_pad (r_pad = r rounded up to 16): the forward GEMM
then always fits, and the padded O_A columns are exactly zero. The dB GEMM reduces over the tokens M: its
transposed operands (dY8^T, O_A8^T) are written with zero columns up to M_pad by the cast pass itself.
Aligned ranks and token counts take exactly the unpadded path (no extra rows, no copies).

Variants of the proxy update (defaults = the reference; see falqon_core.kernels.proxy_update and
docs/accuracy.md): at LoRA's usual learning rates nearly every merged delta rounds away on the e4m3 grid.
  rounding        "nearest" (default) or "stochastic" (unbiased: sub-grid updates survive in expectation)
  merge           "topk" (default) or "grid" (every row with an entry that changes under round-to-nearest)
  keep_unmerged   zero only the merged rows of B (default False: all of B, as the reference)
  seed            seed of the stochastic rounding's counter-based RNG (default 0)
  a_scale         "svd" (default: A = sqrt(S_r) V_r^T as the reference) or "kaiming": every row of A rescaled to the
                  RMS of PEFT's Kaiming-uniform LoRA A, 1/sqrt(3K) (U(-1/sqrt(K), 1/sqrt(K))), capped so that
                  max|A| <= max|W|: the melded matrix keeps W's own e4m3 scale, so W8 is unchanged. The forward
                  never reads A's scale into the output; it only sets the step of W (with Adam on B, a merged
                  delta is ~ lr x |A|), so this moves FALQON's best lr toward LoRA's. The RMS gain is 2.7x for
                  W ~ N(0, 0.02) at K = 4096, 1.6-3.5x (capped) on the CPU suite's tiny-llama; the layer keeps it
                  and whether the cap applied (`adapter_gain`, `adapter_capped`).
  flush_every     every this many updates (default 0: never), after the usual top-k update, merge every row of B
                  into W8 (same rounding) and zero B: with keep_unmerged, a row of B waits at most this many
                  steps to reach W8 instead of ~N/k (256 steps for k = 16 of 4096 rows). Costs one read and write
                  of all N rows of W8 per flush (step_cost counts it spread over the steps). Chosen on the host
                  from the update count, like the k schedule: a captured graph replays what its capture did.
                  Its merges are not in `lost_stats`. flush_every = 1 (the recommended variant, docs/accuracy.md):
                  the flush replaces the top-k update (no row norms, no top-k; keep_unmerged, merge, topk,
                  topk_after and warmup_steps have no effect), so every update of B reaches the forward at the
                  next step, as LoRA's does.
  a_redraw        rows of A redrawn after every flush (default 0: A fixed, as the reference; needs flush_every > 0).
                  FALQON never trains A, so every update of W lies in the r-dimensional row space of A (LoRA-FA);
                  LoRA trains A and finds a better subspace. Right after a flush B is zero, so A can change without
                  changing the function: `a_redraw` rows (cyclically: rows 0..a_redraw-1 at the first flush, the
                  next ones at the second, ...) get fresh Kaiming-uniform entries U(-b, b), b = sqrt(3) x the RMS of
                  A8 at init (so the step size a_scale chose is kept), cast to e4m3 at the melded scale (W8 and s
                  unchanged). Over a run W moves in r + flushes x a_redraw directions instead of r. Random bits
                  from the same counter-based hash as stochastic rounding (seed `seed`, advanced on the device: no
                  host sync, capturable). AdamW's moments of B's redrawn columns then refer to the old row of A
                  for ~1/(1 - beta1) steps; the layer cannot reach the optimizer, so they are left as they are.
                  Costs a_redraw x K e4m3 bytes written per flush (step_cost counts them spread over the steps).

Batched update (a Falqon.convert option, not a layer's): batched_update (default true) stacks layers of one shape
so that one proxy update serves them all (falqon_core.methods.falqon_groups); false keeps one update per layer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from falqon_core import fp8
from falqon_core.kernels import melded_matmul, proxy_update_, quantize_fp8, transpose_fp8
from falqon_core.kernels import _triton_common as tc
from falqon_core.kernels.cast_db import quantize_db
from falqon_core.kernels.flush import flush_
from falqon_core.kernels.grad_prepass import grad_prepass_oa
from falqon_core.kernels.proxy_update import MERGE_RULES, proxy_update_variant_
from falqon_core.kernels.quantize import cast_from_partials
from falqon_core.kernels.quantize_transpose import amax_copy_transpose, quantize_transpose_fp8
from falqon_core.methods import register_method
from falqon_core.methods.base import AdapterConfig, Method, StepCost
from falqon_core.methods.falqon_groups import run_proxy_updates, stack_layers

OPTION_NAMES = (
    "topk", "topk_after", "warmup_steps", "svd_dtype", "cache_weight_t", "fast_accum", "init_svd",
    "rounding", "merge", "keep_unmerged", "seed", "a_scale", "flush_every", "batched_update", "a_redraw", "db_path",
)
DB_PATHS = ("auto", "fused", "transpose")
ROUNDINGS = ("nearest", "stochastic")
A_SCALES = ("svd", "kaiming")
_SVD_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}
# torch._scaled_mm (cuBLASLt) needs the reduction dim and the output-column dim to be multiples of 16
FP8_GEMM_MULTIPLE = 16


# W8's transpose in the launch of dY's amax (kernels/grad_prepass.py) rather than a launch of its own
PREPASS = True


def fused_db_wins(n_out: int, rank: int, tokens: int, grad_bytes: int = 2) -> bool:
    """db_path "auto": the fused cast + dB where it beat cast + transpose + cuBLAS dB on an H200 (both timed side
    by side, docs/perf-notes.md): wide outputs (N >= 2048), ranks up to 64 and >= 1024 tokens. Narrow GQA outputs
    (N 1024), r >= 100 and 512 tokens kept the transposed path. Only 16-bit dY (the timed case): an fp32 dY keeps
    the transposed path until the fused kernel has run on a GPU with it (Triton 3.6 miscompiled another fp32 cast
    pass on an H200, quantize_transpose's docstring)."""
    return n_out >= 2048 and rank <= 64 and tokens >= 1024 and grad_bytes == 2


def fp8_gemm_fits(reduction_dim: int, out_cols: int) -> bool:
    """True when an fp8 GEMM with this reduction length and output width meets torch._scaled_mm's rules."""
    return reduction_dim % FP8_GEMM_MULTIPLE == 0 and out_cols % FP8_GEMM_MULTIPLE == 0


def fp8_matmul_nt(
    a8: torch.Tensor, a_scale: torch.Tensor, b8: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """a (M x K, fp8) . b (N x K, fp8)^T -> M x N in out_dtype, tensorwise dequant scales applied.

    The fp8 GEMM (torch._scaled_mm) wants both operands K-contiguous (a row-major, b^T column-major). Callers
    pass contiguous operands (transposed ones made with transpose_fp8), so the `.contiguous()` here is a
    no-op that only guards against a strided view costing a slow implicit copy. fp8.scaled_mm handles K or N not
    multiples of 16 on CUDA (e.g. rank 12 as N of the dB GEMM) with its upcast GEMM: the same fp8 values
    exactly, fp32 accumulation, the scales in fp32, one rounding to out_dtype.
    """
    return fp8.scaled_mm(a8.contiguous(), a_scale, b8.contiguous(), b_scale, out_dtype=out_dtype)


def pad_rows(x: torch.Tensor, multiple: int = FP8_GEMM_MULTIPLE) -> torch.Tensor:
    """x with zero rows appended up to a multiple of `multiple` rows; x itself (no copy) when already aligned."""
    extra = (-x.shape[0]) % multiple
    if extra == 0:
        return x
    zeros = torch.zeros((extra, *x.shape[1:]), device=x.device, dtype=torch.uint8).view(x.dtype)
    return torch.cat([x.view(torch.uint8), zeros.view(torch.uint8)]).view(x.dtype)


class MeldedLinearFunction(torch.autograd.Function):
    """FALQON's fwd/bwd on a flattened M x K input; B is an input only so that autograd returns dB."""

    @staticmethod
    def forward(ctx, x2d, lora_b, melded, scale, n_out, weight_t, fast_accum=False, db_path="transpose"):
        x8, x_scale = quantize_fp8(x2d.contiguous(), fp8.E4M3, "tensorwise")
        # melded has N + r_pad rows: o_a is M x r_pad, its columns past r exactly zero (zero rows of A8)
        out, o_a = melded_matmul(x8, x_scale, melded, scale, n_out, fast_accum=fast_accum)
        # the dB product reduces over M, so it wants O_A M-contiguous (r_pad x M_pad, zero columns past M). One
        # launch reads the strided O_A columns of the GEMM output in place, takes their partial amax and writes
        # them transposed, in bf16 (a compact copy, so the backward does not keep the whole GEMM output alive);
        # the e4m3 cast waits for the backward's first launch (grad_prepass_oa), as the reference casts it there
        oa_t, oa_partials = amax_copy_transpose(o_a, FP8_GEMM_MULTIPLE)
        ctx.save_for_backward(melded, scale, oa_t, oa_partials, weight_t)
        ctx.n_out = n_out
        ctx.x_dtype = x2d.dtype
        ctx.b_dtype = lora_b.dtype
        ctx.rank = lora_b.shape[1]
        auto = fused_db_wins(n_out, ctx.rank, x2d.shape[0], x2d.element_size())
        ctx.fused_db = db_path == "fused" or (db_path == "auto" and auto)
        out = out.to(x2d.dtype)
        if torch.compiler.is_compiling():
            # out is a column slice of the melded GEMM's output. Returned as that view from a traced
            # autograd.Function, the backward torch.compile built on an H200 (torch 2.11) read zeros for
            # grad_out: every dX and dB of a compiled model was zero. A copy (fused into the bias add or the
            # next elementwise op by inductor) gives the eager gradients; eager keeps the view (no copy).
            out = out.contiguous()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        melded, scale, oa_t, oa_partials, weight_t = ctx.saved_tensors
        n_out = ctx.n_out
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_b = None
        # dX (M x K) = dY (M x N) . W8 (N x K): reduction over N, so the fp8 GEMM wants W8^T (K x N) N-contiguous:
        # the cached copy, else a transposed copy (N x K bytes read + written), made on the Triton path by the
        # same launch as dY's amax, which also casts O_A^T to e4m3 (r_pad x M_pad, for dB)
        w8_t, partials, oa8_t, oa_scale = weight_t, None, None, None
        if need_b and need_x and w8_t is None and PREPASS and tc.triton_fp8_ok(grad_out):
            grad_out = grad_out.contiguous()
            partials, w8_t, oa8_t, oa_scale = grad_prepass_oa(grad_out, melded[:n_out], oa_t, oa_partials)
        elif need_b:
            oa8_t, oa_scale = cast_from_partials(oa_t, oa_partials, fp8.E4M3)
        if need_b and ctx.fused_db:  # dY8 (M x N e5m2, for dX) and dB (N x r) from one pass over dY's tiles
            dy8, dy_scale, grad_b = quantize_db(grad_out, oa8_t, oa_scale, ctx.rank, fp8.E5M2, keep_rows=need_x,
                                                partials=partials)
            grad_b = grad_b.to(ctx.b_dtype)
        elif need_b:  # dY8 (M x N e5m2, for dX) and dY8^T (N x M_pad, for the dB GEMM) from one cast pass
            dy8, dy8_t, dy_scale = quantize_transpose_fp8(grad_out, fp8.E5M2, FP8_GEMM_MULTIPLE, keep_rows=need_x,
                                                          partials=partials)
        else:
            dy8, dy_scale = quantize_fp8(grad_out.contiguous(), fp8.E5M2, "tensorwise")  # M x N e5m2
        if need_x:
            if w8_t is None:
                w8_t = transpose_fp8(melded[:n_out])
            grad_x = fp8_matmul_nt(dy8, dy_scale, w8_t, scale, ctx.x_dtype)
        if need_b and not ctx.fused_db:
            # dB (N x r) = dY^T (N x M) . O_A (M x r): reduction over M, so dY8^T (N x M_pad) M-contiguous, written
            # by the cast above with the zero columns up to M_pad (M x N bytes more written, no re-read);
            # e5m2 x e4m3 (CUDA has no e5m2 x e5m2). The product is N x r_pad, sliced back to r
            grad_b = fp8_matmul_nt(dy8_t, dy_scale, oa8_t, oa_scale, ctx.b_dtype)[:, : ctx.rank]
        return grad_x, grad_b, None, None, None, None, None, None


class FalqonLinear(nn.Module):
    """A frozen nn.Linear(K -> N) as FALQON's melded fp8 layer with adapter rank r.

    Buffers: `melded` ((N+r_pad) x K, float8_e4m3fn; rows [:N] are W8, rows [N:N+r] are A8, zero rows up to a
    multiple of 16), `scale` (0-dim fp32 dequant scale, fixed after init), optionally `weight_t` (K x N fp8 copy of W8, only with
    cache_weight_t: costs N x K more bytes, i.e. doubles the weight memory, and saves the N x K
    transpose that every backward otherwise makes for the dX GEMM; kept in sync by the proxy update: the merged
    columns copied after a top-k merge, or written by the flush kernel itself with flush_every).
    Parameters: `lora_B` (N x r, fp32 as in the reference, trainable, zero after every proxy update unless
    keep_unmerged), `bias` (frozen, if present). Buffer `rounding_seed` (int64, stochastic rounding only).
    `track_lost = True` makes each proxy update add, on the device, [lost entries, merged entries with a
    nonzero delta, rows merged] to `lost_stats` (int64 (3,)); lost = the fp8 value did not change.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        topk: int | None = None,
        topk_after: int | None = None,
        warmup_steps: int = 0,
        svd_dtype: torch.dtype = torch.float32,
        cache_weight_t: bool = False,
        fast_accum: bool = True,
        db_path: str = "auto",
        init_svd: str = "lowrank",
        rounding: str = "nearest",
        merge: str = "topk",
        keep_unmerged: bool = False,
        seed: int = 0,
        a_scale: str = "svd",
        flush_every: int = 0,
        a_redraw: int = 0,
    ):
        super().__init__()
        n_out, k_in = linear.weight.shape
        _check_rank(rank, k_in, n_out)
        self.in_features, self.out_features, self.rank = k_in, n_out, rank
        self.topk = _check_k("topk", rank if topk is None else topk, n_out)
        self.topk_after = _check_k("topk_after", self.topk if topk_after is None else topk_after, n_out)
        if warmup_steps < 0:
            raise ValueError(f"falqon warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.updates_done = 0  # proxy updates run so far (host counter: drives the k schedule)
        self.last_k: int | None = None  # k of the most recent proxy update
        self._all_rows: torch.Tensor | None = None  # what proxy_update returns with flush_every = 1 (made once)
        self.fast_accum = bool(fast_accum)
        if db_path not in DB_PATHS:
            raise ValueError(f"falqon db_path {db_path!r}; allowed: {', '.join(DB_PATHS)}")
        self.db_path = db_path
        if rounding not in ROUNDINGS or merge not in MERGE_RULES:
            raise ValueError(f"falqon rounding {rounding!r} / merge {merge!r}; allowed: {ROUNDINGS} / {MERGE_RULES}")
        self.rounding, self.merge, self.keep_unmerged = rounding, merge, bool(keep_unmerged)
        self.track_lost = False

        if a_scale not in A_SCALES:
            raise ValueError(f"falqon a_scale {a_scale!r}; allowed: {', '.join(A_SCALES)}")
        self.a_scale = a_scale
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 0:
            raise ValueError(f"falqon flush_every must be an integer >= 0, got {flush_every!r}")
        self.flush_every, self.flushes_done = flush_every, 0
        self.a_redraw = _check_redraw(a_redraw, rank, flush_every)
        init = meld_init(linear.weight.detach(), rank, svd_dtype, init_svd, a_scale)
        melded, scale = init.melded, init.scale
        self.adapter_gain, self.adapter_capped = init.adapter_gain, init.adapter_capped
        self.register_buffer("melded", pad_rows(melded))  # N + r_pad rows (module docstring: Padding)
        self.register_buffer("scale", scale)
        self.register_buffer("weight_t", transpose_fp8(melded[:n_out]) if cache_weight_t else None)
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, dtype=torch.float32, device=melded.device))
        # stochastic rounding's seed lives on the device and advances there: a captured graph draws new bits
        seed_t = torch.tensor(int(seed), dtype=torch.int64, device=melded.device) if rounding == "stochastic" else None
        self.register_buffer("rounding_seed", seed_t)
        # a_redraw: the bits of the redrawn rows of A (its own counter: the rounding's stream is left as it is)
        redraw_t = torch.tensor(int(seed), dtype=torch.int64, device=melded.device) if self.a_redraw else None
        self.register_buffer("redraw_seed", redraw_t)
        self.redraw_bound = redraw_bound(self.adapter_fp8) if self.a_redraw else None  # fp8 units of s
        self.redraws_done = 0  # rows redrawn so far (host counter: which rows come next)
        self.lost_stats: torch.Tensor | None = None  # made on the first tracked update
        # set by falqon_groups.stack_layers when this layer's tensors are slices of a group's stacks
        self.proxy_group: Any = None
        self.proxy_group_index: int | None = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_config(cls, linear: nn.Linear, config: AdapterConfig) -> FalqonLinear:
        """Build from an AdapterConfig; raises ValueError naming any unknown option and the allowed ones."""
        return cls(linear, config.rank, dtype=config.dtype, **parse_options(config.options))

    @property
    def backbone_fp8(self) -> torch.Tensor:
        """W8: the N x K e4m3 backbone rows of the melded matrix (a view, shares storage)."""
        return self.melded[: self.out_features]

    @property
    def adapter_fp8(self) -> torch.Tensor:
        """A8: the r x K e4m3 adapter rows of the melded matrix (a view, shares storage; padding rows excluded)."""
        return self.melded[self.out_features : self.out_features + self.rank]

    def next_k(self) -> int:
        """The k the next proxy update uses: `topk` for the first `warmup_steps` updates, then `topk_after`."""
        return self.topk if self.updates_done < self.warmup_steps else self.topk_after

    def uses_plain_update(self) -> bool:
        """True when the next proxy update is the reference one (top-k, round-to-nearest, all of B zeroed,
        nothing tracked): the update proxy_update_ (and the batched one of falqon_groups) computes.

        A variant that adds work to proxy_update (e.g. the periodic all-row merge of `flush_every`) must make
        this False, or the batched update would skip that work.
        """
        plain = self.rounding == "nearest" and self.merge == "topk" and not self.keep_unmerged and not self.track_lost
        return plain and not self.flush_every

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = MeldedLinearFunction.apply(
            x.reshape(-1, self.in_features), self.lora_B, self.melded, self.scale, self.out_features, self.weight_t,
            self.fast_accum, self.db_path,
        )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    @torch.no_grad()
    def proxy_update(self) -> torch.Tensor:
        """Merge the top-k rows of B into W8 and zero B (no host sync: CUDA-graph capturable). Returns rows (k,).

        k is chosen on the host from the update count; a captured graph replays the k it was captured with.
        With flush_every = 1 the flush is the whole update (every row of B merged every step): the top-k merge
        before it would only round the same rows twice, so it is skipped; returns all N rows.
        """
        if self.flush_every == 1:
            if self.track_lost and self.lost_stats is None:  # the flush does not count lost entries: stays zero
                self.lost_stats = torch.zeros(3, dtype=torch.int64, device=self.melded.device)
            self.last_k = self.out_features
            self.updates_done += 1
            self.flush()
            if self._all_rows is None or self._all_rows.device != self.melded.device:  # not one arange per step
                self._all_rows = torch.arange(self.out_features, device=self.melded.device)
            return self._all_rows
        k = self.next_k()
        if self.uses_plain_update():
            rows = proxy_update_(self.backbone_fp8, self.adapter_fp8, self.lora_B, k)
        else:
            if self.track_lost and self.lost_stats is None:
                self.lost_stats = torch.zeros(3, dtype=torch.int64, device=self.melded.device)
            rows = proxy_update_variant_(
                self.backbone_fp8, self.adapter_fp8, self.lora_B, k, stochastic=self.rounding == "stochastic",
                seed=self.rounding_seed, merge=self.merge, keep_unmerged=self.keep_unmerged,
                stats=self.lost_stats if self.track_lost else None,
            )
            if self.rounding == "stochastic":
                self.rounding_seed.add_(1)
            k = rows.numel() if self.merge == "topk" else k  # grid: rows merged per update are in lost_stats[2]
        if self.weight_t is not None:
            fresh = self.backbone_fp8.view(torch.uint8).index_select(0, rows).t()
            self.weight_t.view(torch.uint8).index_copy_(1, rows, fresh)
        self.last_k = k
        self.updates_done += 1
        if self.flush_every and self.updates_done % self.flush_every == 0:
            self.flush()
        return rows

    @torch.no_grad()
    def flush(self) -> None:
        """Merge every row of B into W8 with the layer's rounding and zero B (flush_every). No host sync."""
        # one dense pass over W8 (falqon_core.kernels.flush), then W8^T refreshed (if cached) and B zeroed
        flush_(
            self.backbone_fp8, self.adapter_fp8, self.lora_B, stochastic=self.rounding == "stochastic",
            seed=self.rounding_seed, weight_t=self.weight_t,
        )
        if self.rounding == "stochastic":
            self.rounding_seed.add_(1)
        self.flushes_done += 1
        if self.a_redraw:
            self.redraw_adapter_rows()

    @torch.no_grad()
    def redraw_adapter_rows(self) -> torch.Tensor:
        """Give the next `a_redraw` rows of A8 (cyclic) fresh Kaiming-uniform entries (a_redraw; only while B is
        zero, i.e. right after a flush). Returns the redrawn rows (a_redraw,), indices into A. No host sync."""
        rows = redrawn_adapter_rows(self.redraws_done, self.a_redraw, self.rank, self.melded.device)
        fresh = redrawn_adapter_values(self.redraw_seed, rows, self.in_features, self.redraw_bound)
        self.melded.view(torch.uint8).index_copy_(
            0, rows + self.out_features, fp8.saturating_cast(fresh, self.melded.dtype).view(torch.uint8)
        )
        self.redraw_seed.add_(1)
        self.redraws_done += self.a_redraw
        return rows

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"topk={self.topk}, topk_after={self.topk_after}, warmup_steps={self.warmup_steps}, "
            f"rounding={self.rounding}, merge={self.merge}, keep_unmerged={self.keep_unmerged}, a_scale={self.a_scale}, "
            f"flush_every={self.flush_every}, a_redraw={self.a_redraw}, "
            f"bias={self.bias is not None}, cache_weight_t={self.weight_t is not None}, fast_accum={self.fast_accum}, db_path={self.db_path}"
        )


def meld_weight_and_adapter(
    weight: torch.Tensor, rank: int, svd_dtype: torch.dtype = torch.float32, init_svd: str = "lowrank",
    a_scale: str = "svd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FALQON's init: A = sqrt(S_r) V_r^T from the top-r SVD of W's own e4m3 quantization error (exact or
    randomized, `init_svd`), then [W; A] as one e4m3 tensor. Returns (melded (N+r) x K float8_e4m3fn, scale 0-dim fp32)."""
    init = meld_init(weight, rank, svd_dtype, init_svd, a_scale)
    return init.melded, init.scale


class MeldInit(NamedTuple):
    """meld_init's result: the melded matrix and its scale, and what a_scale did to A (gain 1.0 for "svd")."""

    melded: torch.Tensor  # (N + r) x K float8_e4m3fn
    scale: torch.Tensor  # 0-dim fp32 dequant scale
    adapter_gain: float  # RMS of A after / before the rescale
    adapter_capped: bool  # the Kaiming RMS would have pushed max|A| past max|W|: A was scaled down to max|W|


def meld_init(
    weight: torch.Tensor, rank: int, svd_dtype: torch.dtype = torch.float32, init_svd: str = "lowrank",
    a_scale: str = "svd",
) -> MeldInit:
    """meld_weight_and_adapter with the a_scale option (module docstring) and a record of its rescale."""
    from falqon_core.lowrank import top_singular

    w = weight.float()
    w8, w_scale = fp8.quantize(w, fp8.E4M3, "tensorwise")
    error = (w - fp8.dequantize(w8, w_scale)).to(svd_dtype)
    s, vh = top_singular(error, rank, init_svd)
    adapter = (s[:rank].sqrt().unsqueeze(1) * vh[:rank]).float()  # r x K
    gain, capped = 1.0, False
    if a_scale == "kaiming":
        adapter, gain, capped = kaiming_rms_rows(adapter, float(w.abs().max()))
    melded, scale = fp8.quantize(torch.cat([w, adapter], dim=0), fp8.E4M3, "tensorwise")
    return MeldInit(melded, scale, gain, capped)


def kaiming_rms_rows(adapter: torch.Tensor, weight_amax: float) -> tuple[torch.Tensor, float, bool]:
    """Rows of A (r x K) rescaled to RMS 1/sqrt(3K), the RMS of PEFT's LoRA A (kaiming_uniform_ with a = sqrt(5):
    U(-1/sqrt(K), 1/sqrt(K))), then, if max|A| would exceed max|W| (and so change the melded matrix's e4m3 scale
    and with it W8), all of A scaled down to max|A| = max|W|. Returns (A, RMS gain over the input A, capped)."""
    k_in = adapter.shape[1]
    row_rms = adapter.pow(2).mean(dim=1, keepdim=True).sqrt()
    target = 1.0 / math.sqrt(3 * k_in)
    # a zero row (zero quantization error: W exactly on the e4m3 grid) has no direction to scale: left at zero
    rescaled = torch.where(row_rms > 0, adapter * (target / row_rms.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    amax = float(rescaled.abs().max())
    capped = weight_amax > 0 and amax > weight_amax
    if capped:  # the clamp: the product can round one fp32 ulp past max|W| (and so move the scale)
        rescaled = (rescaled * (weight_amax / amax)).clamp(-weight_amax, weight_amax)
    before = float(adapter.pow(2).mean().sqrt())
    gain = float(rescaled.pow(2).mean().sqrt()) / before if before > 0 else 1.0
    return rescaled, gain, bool(capped)


def redraw_bound(adapter_fp8: torch.Tensor) -> float:
    """b of the a_redraw option's U(-b, b), in fp8 units: sqrt(3) x the RMS of A8 (a uniform draw's RMS is b/sqrt(3),
    so redrawn rows keep A's RMS and with it the step size), at most the format's max."""
    rms = float(adapter_fp8.float().pow(2).mean().sqrt())
    return min(math.sqrt(3.0) * rms, float(torch.finfo(adapter_fp8.dtype).max))


def redrawn_adapter_rows(done: int, count: int, rank: int, device: torch.device) -> torch.Tensor:
    """Rows of A (int64 (count,)) the next redraw takes: `count` rows on from the `done` already redrawn, mod r.
    An arange on the device (the start is a host int), so a captured graph has no host-to-device copy."""
    return (torch.arange(count, device=device, dtype=torch.int64) + done) % rank


def redrawn_adapter_values(seed: torch.Tensor, rows: torch.Tensor, k_in: int, bound: float) -> torch.Tensor:
    """fp32 (len(rows) x K) entries U(-bound, bound) from the counter-based hash (seed, row x K + column): the
    same bits on every device for a given seed (falqon_core.kernels.proxy_update.hash_uniform_reference)."""
    from falqon_core.kernels.proxy_update import hash_uniform_reference

    offsets = rows[:, None] * k_in + torch.arange(k_in, device=rows.device, dtype=torch.int64)
    return (hash_uniform_reference(seed, offsets) * 2.0 - 1.0) * bound


def _check_redraw(a_redraw: Any, rank: int, flush_every: int) -> int:
    if isinstance(a_redraw, bool) or not isinstance(a_redraw, int) or not 0 <= a_redraw <= rank:
        raise ValueError(f"falqon a_redraw must be an integer in 0..{rank} (rows of A), got {a_redraw!r}")
    _check_redraw_needs_flush(a_redraw, flush_every)
    return int(a_redraw)


def _check_redraw_needs_flush(a_redraw: int, flush_every: int) -> None:
    if a_redraw and not flush_every:
        raise ValueError(
            f"falqon a_redraw = {a_redraw} needs flush_every > 0: A may change only right after a flush, when B is zero"
        )


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """AdapterConfig.options -> FalqonLinear keyword arguments, with errors that list what is allowed."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown falqon option(s) {unknown}; allowed: {', '.join(OPTION_NAMES)}")
    kwargs: dict[str, Any] = {}
    # the bounds no layer shape lifts are checked here (a suite's load calls this): topk <= N, a_redraw <= r and
    # rank <= min(K, N) need the shape and stay with the layer
    for name, least in (("topk", 1), ("topk_after", 1), ("warmup_steps", 0), ("flush_every", 0), ("a_redraw", 0)):
        if options.get(name) is not None:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"falqon option {name} must be an integer, got {value!r}")
            if value < least:
                raise ValueError(f"falqon option {name} must be an integer >= {least}, got {value!r}")
            kwargs[name] = value
    _check_redraw_needs_flush(kwargs.get("a_redraw", 0), kwargs.get("flush_every", 0))
    if "svd_dtype" in options:
        kwargs["svd_dtype"] = _svd_dtype(options["svd_dtype"])
    if "fast_accum" in options:
        if not isinstance(options["fast_accum"], bool):
            raise ValueError(f"falqon option fast_accum must be true or false, got {options['fast_accum']!r}")
        kwargs["fast_accum"] = options["fast_accum"]
    if "db_path" in options:
        if options["db_path"] not in DB_PATHS:
            raise ValueError(f"falqon option db_path must be one of {', '.join(DB_PATHS)}, got {options['db_path']!r}")
        kwargs["db_path"] = options["db_path"]
    if "init_svd" in options:
        if options["init_svd"] not in ("exact", "lowrank"):
            raise ValueError(f"falqon option init_svd must be 'exact' or 'lowrank', got {options['init_svd']!r}")
        kwargs["init_svd"] = options["init_svd"]
    for name, allowed in (("rounding", ROUNDINGS), ("merge", MERGE_RULES)):
        if name in options:
            if options[name] not in allowed:
                raise ValueError(f"falqon option {name} must be one of {', '.join(allowed)}, got {options[name]!r}")
            kwargs[name] = options[name]
    if "a_scale" in options:
        if options["a_scale"] not in A_SCALES:
            raise ValueError(f"falqon option a_scale must be one of {', '.join(A_SCALES)}, got {options['a_scale']!r}")
        kwargs["a_scale"] = options["a_scale"]
    for name in ("cache_weight_t", "keep_unmerged", "batched_update"):  # bool("false") is True: a flag is a bool
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"falqon option {name} must be true or false, got {options[name]!r}")
    kwargs.update({name: options[name] for name in ("cache_weight_t", "keep_unmerged") if name in options})
    if "seed" in options:
        if isinstance(options["seed"], bool) or not isinstance(options["seed"], int):
            raise ValueError(f"falqon option seed must be an integer, got {options['seed']!r}")
        kwargs["seed"] = options["seed"]
    return kwargs


def _svd_dtype(value: Any) -> torch.dtype:
    if value in (torch.float32, torch.float64):
        return value
    if isinstance(value, str) and value in _SVD_DTYPES:
        return _SVD_DTYPES[value]
    raise ValueError(f"falqon option svd_dtype must be one of {sorted(_SVD_DTYPES)}, got {value!r}")


def check_layer_fit(k_in: int, n_out: int, rank: int, kwargs: dict[str, Any]) -> None:
    """ValueError when a K -> N layer of this rank cannot take these parse_options kwargs (the shape-dependent
    checks FalqonLinear makes), for a tool that checks every shape before it builds or times any."""
    _check_rank(rank, k_in, n_out)
    topk = _check_k("topk", rank if kwargs.get("topk") is None else kwargs["topk"], n_out)
    _check_k("topk_after", topk if kwargs.get("topk_after") is None else kwargs["topk_after"], n_out)
    _check_redraw(kwargs.get("a_redraw", 0), rank, kwargs.get("flush_every", 0))


def _check_rank(rank: int, k_in: int, n_out: int) -> None:
    if not 1 <= rank <= min(n_out, k_in):
        allowed = min(n_out, k_in)
        raise ValueError(f"falqon rank {rank} does not fit a {k_in}->{n_out} linear; allowed: 1..{allowed}")


def _check_k(name: str, k: int, n_out: int) -> int:
    if not 1 <= k <= n_out:
        raise ValueError(f"falqon option {name}={k} out of range; allowed: 1..{n_out} (rows of W)")
    return int(k)


def falqon_layers(model: nn.Module) -> list[tuple[str, FalqonLinear]]:
    """Every FalqonLinear in `model` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FalqonLinear)]


@register_method
class Falqon(Method):
    """FALQON (NeurIPS 2025): melded fp8 [W; A], B folded into W8 by the row-wise proxy update.

    memory_bytes: the base accounting is exact here: weights = melded fp8 + scale (+ bias, + weight_t
    when cached), adapters = B, optimizer_state = AdamW's two fp32 moments of B.
    """

    name = "falqon"
    option_names = OPTION_NAMES
    parse_options = staticmethod(parse_options)
    summary = "melded fp8 [W; A] in one GEMM, B merged into W8 by a top-k row-wise proxy update"
    built_on = "own fp8 GEMM (torch._scaled_mm) + Triton kernels"
    needs_cuda = False  # the torch references run on CPU
    supports_compile = True
    needs_fp8_tensor_cores = True

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        """Swap every target nn.Linear for a FalqonLinear and freeze everything but the B matrices."""
        from falqon_core.methods._lora_common import freeze_all, select_target_linears, set_submodule

        parse_options(config.options)  # fail before touching the model
        if isinstance(model, nn.Linear) and config.target_modules is None:  # the model is itself one nn.Linear
            freeze_all(model)
            return FalqonLinear.from_config(model, config)
        names = select_target_linears(model, config.target_modules)
        modules = dict(model.named_modules())
        new_layers = {name: FalqonLinear.from_config(modules[name], config) for name in names}  # all checks first
        freeze_all(model)
        for name, layer in new_layers.items():
            set_submodule(model, name, layer)
        if config.options.get("batched_update", True):
            stack_layers(list(new_layers.values()))  # layers of one shape share stacked tensors: one batched proxy update each
        return model

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Run the row-wise proxy update on every FalqonLinear (no host sync): one batched update per group of
        stacked layers of one shape (falqon_core.methods.falqon_groups), the per-layer update for the others."""
        with torch.no_grad():
            run_proxy_updates(m for m in model.modules() if isinstance(m, FalqonLinear))  # no names: less host time

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """{'topk': layer name -> k of its last proxy update (None before the first)}, so a run reports its k."""
        return {"topk": {name: layer.last_k for name, layer in falqon_layers(model)}}

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: dict[str, Any] | None = None) -> StepCost:
        """Minimum work of one FALQON step (fwd + bwd + SGD on B + proxy update) at M = tokens.

        GEMMs: forward M x (N+r) x K, dX M x K x N and dB N x r x M, counted at the unpadded r and M (the
        zero padding is the layer's overhead, not work the floor should grant). The layer pads r and M, so
        the forward is fp8 when K and N are multiples of 16, dX when N and K are, dB always; a GEMM off that
        grid is bf16 (fp8.scaled_mm's upcast fallback). The proxy update's k x r x K fp32 product is
        negligible and not counted.
        Bytes: x bf16 read + e4m3 write; dY bf16 read + e5m2 write; O_A bf16 read + e4m3 write; the
        transpose of W8 (N x K, read + write) for dX unless cached (the r x M one of O_A is small and not
        counted; dY8^T is not needed: the fused cast + dB of db_path reads dY's tiles as they lie); the timed step's
        SGD update of B (read B and dB, write B: 3 N x r fp32, as the LoRA baselines count for A and B);
        proxy update: B read for ranking and zeroed (N x r each way), A8 read (r x K), k x K read + write of
        W8 rows, k x r of B rows (and k x K into weight_t when cached); B is fp32; merge="grid" reads and writes all N rows;
        flush_every = T adds one such all-row merge every T steps (and a_redraw x K bytes of A8); T = 1 replaces
        the top-k update. k is the steady-state k: the `topk_after` option when set (every update past
        `warmup_steps` uses it), else `topk` (default r).
        `options` are the layer's AdapterConfig.options (topk, topk_after, cache_weight_t, merge).
        """
        M, r, options = tokens, rank, options or {}
        k = min(int(options.get("topk_after") or options.get("topk") or r), N)
        cached = bool(options.get("cache_weight_t", False))
        bf16, f32, e = 2, 4, 1  # bytes per element
        if options.get("merge") == "grid":  # every row is read and written back
            k = N
        flops = {"fp8": 0.0, "bf16": 0.0}
        fwd_fp8, dx_fp8, db_fp8 = fp8_gemm_fits(K, N), fp8_gemm_fits(N, K), True
        flops["fp8" if fwd_fp8 else "bf16"] += 2.0 * M * (N + r) * K
        flops["fp8" if dx_fp8 else "bf16"] += 2.0 * M * K * N
        flops["fp8" if db_fp8 else "bf16"] += 2.0 * N * r * M
        quant = (bf16 + e) * M * K + (bf16 + e) * M * N + (bf16 + e) * M * r
        if not cached:
            quant += 2 * e * N * K
        quant += 3 * f32 * N * r
        flush_every = int(options.get("flush_every") or 0)
        if flush_every != 1:  # flush_every = 1: the flush replaces the top-k update (FalqonLinear.proxy_update)
            quant += 2 * f32 * N * r + e * r * K + 2 * e * k * K + f32 * k * r + (e * k * K if cached else 0)
        if flush_every:  # a merge of all N rows (W8 read + write, A8, B read + zeroed) every flush_every steps
            quant += (2 * e * N * K + e * r * K + 2 * f32 * N * r + (2 * e * N * K if cached else 0)) / flush_every
            quant += e * int(options.get("a_redraw") or 0) * K / flush_every  # a_redraw rows of A8 written per flush
        return StepCost(gemm_flops=flops, quant_bytes=float(quant))
