"""bf16_lora: frozen BF16 W with BF16 LoRA adapters through PEFT; the reference every method is compared to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    adapter_flops,
    add_lora_adapters,
    frozen_base_flops,
    lora_elementwise_bytes,
    select_target_linears,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, StepCost


@register_method
class Bf16Lora(Method):
    """PEFT LoraConfig/get_peft_model on the target linears (r, alpha from the config, dropout 0), all bf16."""

    name = "bf16_lora"
    summary = "frozen BF16 W + BF16 LoRA A, B (the reference)"
    built_on = "PEFT"

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        model = model.to(config.dtype)
        return add_lora_adapters(model, config, select_target_linears(model, config.target_modules))

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """All GEMMs bf16: frozen base forward + dX (4 M N K) and the six adapter GEMMs (6 M r (K + N)).

        quant_bytes: no cast; PEFT's scale-and-add of the adapter output and its backward
        (lora_elementwise_bytes: 14 M N + 6 M K bytes) plus the SGD update of A, B (6 r (K + N) bytes).
        """
        flops = frozen_base_flops(K, N, tokens) + adapter_flops(K, N, rank, tokens)
        moved = lora_elementwise_bytes(K, N, tokens) + sgd_update_bytes(K, N, rank)
        return StepCost(gemm_flops={"bf16": flops}, quant_bytes=moved)
