"""bf16_lora: frozen BF16 W with BF16 LoRA adapters through PEFT; the reference every method is compared to.

Options (AdapterConfig.options):
  freeze_a   true: LoRA-FA, lora_A keeps PEFT's Kaiming-uniform init and never trains (requires_grad False),
             only B does. FALQON never trains its A either, so this baseline separates what a frozen A costs
             from what FALQON's fp8 path costs (docs/accuracy.md). Default false.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    BF16_BYTES,
    adapter_flops,
    add_lora_adapters,
    frozen_base_flops,
    gemm_flops,
    lora_elementwise_bytes,
    lora_layers,
    select_target_linears,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, StepCost

OPTION_NAMES = ("freeze_a",)


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """AdapterConfig.options -> {'freeze_a': bool}; ValueError names unknown options and ill-typed values."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"bf16_lora: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTION_NAMES)}")
    freeze_a = options.get("freeze_a", False)
    if not isinstance(freeze_a, bool):
        raise ValueError(f"bf16_lora option freeze_a must be true or false, got {freeze_a!r}")
    return {"freeze_a": freeze_a}


@register_method
class Bf16Lora(Method):
    """PEFT LoraConfig/get_peft_model on the target linears (r, alpha from the config, dropout 0), all bf16."""

    name = "bf16_lora"
    option_names = OPTION_NAMES
    parse_options = staticmethod(parse_options)
    summary = "frozen BF16 W + BF16 LoRA A, B (the reference); option freeze_a: A fixed at init (LoRA-FA)"
    built_on = "PEFT"

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        opts = parse_options(config.options)  # fail before touching the model
        model = model.to(config.dtype)
        model = add_lora_adapters(model, config, select_target_linears(model, config.target_modules))
        if opts["freeze_a"]:
            for _, layer in lora_layers(model):
                for p in layer.lora_A.parameters():
                    p.requires_grad_(False)
        return model

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """All GEMMs bf16: frozen base forward + dX (4 M N K) and the six adapter GEMMs (6 M r (K + N)).

        quant_bytes: no cast; PEFT's scale-and-add of the adapter output and its backward
        (lora_elementwise_bytes: 14 M N + 6 M K bytes) plus the SGD update of A, B (6 r (K + N) bytes).
        freeze_a: no dA GEMM (2 M r K flops fewer) and no update of A (6 r K bytes fewer); dO_A and dX_A stay,
        since dX needs them.
        """
        freeze_a = parse_options(options or {})["freeze_a"]
        flops = frozen_base_flops(K, N, tokens) + adapter_flops(K, N, rank, tokens)
        moved = lora_elementwise_bytes(K, N, tokens) + sgd_update_bytes(K, N, rank)
        if freeze_a:
            flops -= gemm_flops(rank, K, tokens)  # dA = dO_A^T . X
            moved -= 3.0 * BF16_BYTES * rank * K  # A's read, grad read, write
        return StepCost(gemm_flops={"bf16": flops}, quant_bytes=moved)
