"""fp8_base_lora: the frozen backbone in FP8 (torchao float8 on the base layers only), BF16 LoRA adapters."""

from __future__ import annotations

import torch
from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    adapter_flops,
    add_lora_adapters,
    frozen_base_flops,
    linear_shapes,
    lora_elementwise_bytes,
    model_memory_bytes,
    require_dims_multiple_of,
    select_target_linears,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, StepCost
from falqon_core.methods.fp8_lora import (
    FP8_DIM_MULTIPLE,
    base_fp8_cast_bytes,
    float8_unavailable_reason,
    import_float8_training,
)


def is_lora_base_layer(module: nn.Module, fqn: str) -> bool:
    """torchao module_filter_fn: only the frozen base nn.Linear that PEFT wrapped (named '<target>.base_layer')."""
    return fqn.endswith("base_layer")


@register_method
class Fp8BaseLora(Method):
    """PEFT LoRA, then torchao Float8Linear (tensorwise e4m3/e5m2) for each wrapped base layer; A, B stay bf16.

    Any rank works (the adapters run bf16); the base layers' K and N must be multiples of 16.
    """

    name = "fp8_base_lora"
    summary = "FP8 backbone (torchao float8 on base layers), BF16 LoRA adapters"
    built_on = "PEFT + torchao float8"

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        return float8_unavailable_reason(self.name) or super().unavailable_reason(device)

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        convert_to_float8_training, Float8LinearConfig = import_float8_training()
        model = model.to(config.dtype)
        targets = select_target_linears(model, config.target_modules)
        require_dims_multiple_of(self.name, linear_shapes(model, targets), None, FP8_DIM_MULTIPLE, "torchao float8")
        model = add_lora_adapters(model, config, targets)
        return convert_to_float8_training(model, module_filter_fn=is_lora_base_layer, config=Float8LinearConfig())

    def step_cost(self, K: int, N: int, rank: int, tokens: int) -> StepCost:
        """fp8: base forward + dX (4 M N K); bf16: the six adapter GEMMs (6 M r (K + N)).

        quant_bytes: bf16 -> fp8 casts of X, W and dY for the base GEMMs (read 2 + write 1 byte each),
        PEFT's scale-and-add and its backward, the SGD update of A, B. As in fp8_lora, torchao's discarded
        dW GEMM of the frozen base and its backward recasts are not counted.
        """
        moved = base_fp8_cast_bytes(K, N, tokens) + lora_elementwise_bytes(K, N, tokens) + sgd_update_bytes(K, N, rank)
        return StepCost(
            gemm_flops={"fp8": frozen_base_flops(K, N, tokens), "bf16": adapter_flops(K, N, rank, tokens)},
            quant_bytes=moved,
        )

    def memory_bytes(self, model: nn.Module) -> dict[str, int]:
        return model_memory_bytes(self, model)
