"""bf16_linear: the frozen BF16 layer with no adapter, the floor every LoRA method adds cost on top of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    freeze_all,
    frozen_base_flops,
    select_target_linears,
)
from falqon_core.methods.base import AdapterConfig, Method, StepCost


@register_method
class Bf16Linear(Method):
    """Frozen nn.Linear in config.dtype (bf16); nothing is trained, the bench still takes dX."""

    name = "bf16_linear"
    option_names = ()
    summary = "frozen BF16 nn.Linear, no adapter (forward + dX only): the cost floor of every method"
    built_on = "torch nn.Linear"

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        """Cast to config.dtype and freeze every parameter; the target linears must exist."""
        select_target_linears(model, config.target_modules)
        model = model.to(config.dtype)
        freeze_all(model)
        return model

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """bf16: forward Y = X.W^T and dX = dY.W (2 * 2 M N K); no cast or elementwise pass (0 bytes)."""
        return StepCost(gemm_flops={"bf16": frozen_base_flops(K, N, tokens)}, quant_bytes=0.0)
