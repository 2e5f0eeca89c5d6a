"""FALQON's Triton launchers as torch.library custom ops (`falqon::*`), so torch.compile keeps them in its graph.

Under torch.compile a launcher decorated with `_triton_common.opaque_to_compile` calls its op here instead of
breaking the graph: Dynamo and inductor see one node per launch, with a fake implementation (shapes and dtypes
only) and the tensors it writes declared (`mutates_args`). Inductor never looks inside the op, so it cannot
drop a launch whose stores it failed to see (pytorch#170808, where compiled halo_lora returned zeros), and a
whole FALQON step compiles with fullgraph=True and can be captured in one CUDA graph. Eager calls do not go
through the ops (no dispatcher cost). The real implementation is the launcher itself.

Launchers without an op here (the Hadamard kernels) stay graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch

from falqon_core import fp8
from falqon_core.kernels import _triton_common as tc
from falqon_core.kernels import (
    cast_db, melded, proxy_update, proxy_update_batched, quantize, quantize_configs, quantize_transpose, transpose,
)
from falqon_core.kernels import grad_prepass as grad_prepass_kernels


def _launcher(fn):
    """The undecorated launcher behind an opaque_to_compile wrapper."""
    return getattr(fn, "__wrapped__", fn)


# ---------------------------------------------------------------- quantize


@torch.library.custom_op("falqon::partial_amax", mutates_args=())
def partial_amax(x_flat: torch.Tensor) -> torch.Tensor:
    return _launcher(quantize.partial_amax)(x_flat)


@partial_amax.register_fake
def _(x_flat):
    programs, _ = quantize.tensorwise_grid(x_flat, x_flat.numel())
    return x_flat.new_empty(programs, dtype=torch.float32)


@torch.library.custom_op("falqon::cast_tensorwise_from_partials", mutates_args=())
def cast_tensorwise_from_partials(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, software_round: Optional[bool] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launcher(quantize.cast_tensorwise_from_partials)(x, partials, dtype, software_round)


@cast_tensorwise_from_partials.register_fake
def _(x, partials, dtype, software_round=None):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("falqon::quantize_rowwise", mutates_args=())
def quantize_rowwise(x: torch.Tensor, dtype: torch.dtype, software_round: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launcher(quantize._quantize_rowwise_triton)(x, dtype, software_round)


@quantize_rowwise.register_fake
def _(x, dtype, software_round=None):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# ---------------------------------------------------------------- melded GEMM


@torch.library.custom_op("falqon::melded_gemm", mutates_args=())
def melded_gemm(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int,
    oa_amax: bool, software_round: Optional[bool], fast_accum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out M x n_out, o_a M x r, o_a's partial amaxes, or an empty tensor without oa_amax): ops return no None."""
    out, o_a, partials = _launcher(melded._melded_triton)(x8, x_scale, w8_melded, w_scale, n_out, oa_amax, software_round, fast_accum)
    return out, o_a, partials if partials is not None else x8.new_empty(0, dtype=torch.float32)


@melded_gemm.register_fake
def _(x8, x_scale, w8_melded, w_scale, n_out, oa_amax, software_round, fast_accum):
    m, r = x8.shape[0], w8_melded.shape[0] - n_out
    programs = tc.num_sms(x8) if oa_amax else 0
    return (x8.new_empty((m, n_out), dtype=torch.bfloat16), x8.new_empty((m, r), dtype=torch.bfloat16),
            x8.new_empty(programs, dtype=torch.float32))


def _melded_unpack(result):
    out, o_a, partials = result
    return out, o_a, (partials if partials.numel() > 0 else None)


# ---------------------------------------------------------------- transpose, proxy update


@torch.library.custom_op("falqon::transpose_fp8", mutates_args=())
def transpose_fp8(x: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    return _launcher(transpose.transpose_fp8_triton)(x, pad_to)


@transpose_fp8.register_fake
def _(x, pad_to=1):
    return x.new_empty((x.shape[1], transpose.padded_length(x.shape[0], pad_to)), dtype=x.dtype)


@torch.library.custom_op("falqon::proxy_update_", mutates_args=("w8", "b"))
def proxy_update_(
    w8: torch.Tensor, a8: torch.Tensor, b: torch.Tensor, k: int, software_round: Optional[bool] = None,
    fused_select: Optional[bool] = None,
) -> torch.Tensor:
    """In place on w8 (merged rows) and b (zeroed); returns the merged rows (k,) int64."""
    return _launcher(proxy_update.proxy_update_triton_)(
        w8, a8, b, k, software_round=software_round, fused_select=fused_select
    )


@proxy_update_.register_fake
def _(w8, a8, b, k, software_round=None, fused_select=None):
    return w8.new_empty(k, dtype=torch.int64)


def _proxy_update_call(w8, a8, b, k, *, software_round=None, fused_select=None):
    return proxy_update_(w8, a8, b, k, software_round, fused_select)


@torch.library.custom_op("falqon::proxy_update_batched_", mutates_args=("melded", "b"))
def proxy_update_batched_(melded: torch.Tensor, b: torch.Tensor, k: int, software_round: Optional[bool] = None) -> torch.Tensor:
    """In place on melded (L x (N + r_pad) x K: merged rows of W8) and b (L x N x r: zeroed); returns rows (L x k)."""
    return _launcher(proxy_update_batched.proxy_update_batched_triton_)(melded, b, k, software_round=software_round)


@proxy_update_batched_.register_fake
def _(melded, b, k, software_round=None):
    return melded.new_empty((melded.shape[0], k), dtype=torch.int64)


def _proxy_update_batched_call(melded, b, k, *, software_round=None):
    return proxy_update_batched_(melded, b, k, software_round)


# ---------------------------------------------------------------- quantize with the transposed write


@torch.library.custom_op("falqon::partial_amax_2d", mutates_args=())
def partial_amax_2d(x: torch.Tensor) -> torch.Tensor:
    return _launcher(quantize_transpose.partial_amax_2d)(x)


@partial_amax_2d.register_fake
def _(x):
    return x.new_empty(quantize_transpose._grid(x, x.shape[0], x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("falqon::cast_transpose_from_partials", mutates_args=())
def cast_transpose_from_partials(
    x: torch.Tensor, partials: torch.Tensor, dtype: torch.dtype, pad_to: int, keep_rows: bool,
    software_round: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launcher(quantize_transpose.cast_transpose_from_partials)(x, partials, dtype, pad_to, keep_rows, software_round)


@cast_transpose_from_partials.register_fake
def _(x, partials, dtype, pad_to, keep_rows, software_round=None):
    rows_out = transpose.padded_length(x.shape[0], pad_to)
    return (x.new_empty(tuple(x.shape) if keep_rows else (0,), dtype=dtype),
            x.new_empty((x.shape[1], rows_out), dtype=dtype), x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("falqon::amax_copy_transpose", mutates_args=())
def amax_copy_transpose(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return _launcher(quantize_transpose.amax_copy_transpose_triton)(x, pad_to)


@amax_copy_transpose.register_fake
def _(x, pad_to=1):
    rows_out = transpose.padded_length(x.shape[0], pad_to)
    cfg = quantize_configs.config_for("cast_transpose", x.shape[0], x.shape[1])
    return (x.new_empty((x.shape[1], rows_out)),
            x.new_empty(cfg.programs(rows_out, x.shape[1], tc.num_sms(x)), dtype=torch.float32))


@torch.library.custom_op("falqon::grad_prepass_oa", mutates_args=())
def grad_prepass_oa(
    dy: torch.Tensor, weight: torch.Tensor, oa_t: torch.Tensor, oa_partials: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launcher(grad_prepass_kernels.grad_prepass_oa)(dy, weight, oa_t, oa_partials)


@grad_prepass_oa.register_fake
def _(dy, weight, oa_t, oa_partials):
    amax_cfg, _ = grad_prepass_kernels.prepass_configs(dy, weight)
    return (dy.new_empty(amax_cfg.programs(dy.numel(), tc.num_sms(dy)), dtype=torch.float32),
            weight.new_empty((weight.shape[1], weight.shape[0])),
            oa_t.new_empty(oa_t.shape, dtype=fp8.E4M3), oa_t.new_empty((), dtype=torch.float32))


@torch.library.custom_op("falqon::quantize_db", mutates_args=())
def quantize_db(
    dy: torch.Tensor, oa8_t: torch.Tensor, oa_scale: torch.Tensor, rank: int, dtype: torch.dtype, keep_rows: bool = True,
    software_round: Optional[bool] = None, partials: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launcher(cast_db.quantize_db_triton)(dy, oa8_t, oa_scale, rank, dtype, keep_rows, software_round, partials)


@quantize_db.register_fake
def _(dy, oa8_t, oa_scale, rank, dtype, keep_rows=True, software_round=None, partials=None):
    return (dy.new_empty(tuple(dy.shape) if keep_rows else (0,), dtype=dtype), dy.new_empty((), dtype=torch.float32),
            dy.new_empty((dy.shape[1], rank), dtype=torch.float32))


# launcher -> the op torch.compile calls instead (and how to map its result back to the launcher's)
tc.register_compile_op(quantize.partial_amax, partial_amax)
tc.register_compile_op(quantize.cast_tensorwise_from_partials, cast_tensorwise_from_partials)
tc.register_compile_op(quantize._quantize_rowwise_triton, quantize_rowwise)
tc.register_compile_op(melded._melded_triton, melded_gemm, unpack=_melded_unpack)
tc.register_compile_op(transpose.transpose_fp8_triton, transpose_fp8)
tc.register_compile_op(proxy_update.proxy_update_triton_, _proxy_update_call)
tc.register_compile_op(proxy_update_batched.proxy_update_batched_triton_, _proxy_update_batched_call)
tc.register_compile_op(quantize_transpose.partial_amax_2d, partial_amax_2d)
tc.register_compile_op(quantize_transpose.cast_transpose_from_partials, cast_transpose_from_partials)
tc.register_compile_op(cast_db.quantize_db_triton, quantize_db)
tc.register_compile_op(grad_prepass_kernels.grad_prepass_oa, grad_prepass_oa)
tc.register_compile_op(quantize_transpose.amax_copy_transpose_triton, amax_copy_transpose)
