"""fp8_base_lora: the frozen backbone in FP8 (torchao float8 on the base layers only), BF16 LoRA adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    adapter_flops,
    frozen_base_flops,
    lora_elementwise_bytes,
    sgd_update_bytes,
)
from falqon_core.methods.base import StepCost
from falqon_core.methods.fp8_lora import Fp8Lora, base_fp8_cast_bytes


@register_method
class Fp8BaseLora(Fp8Lora):
    """PEFT LoRA, then torchao Float8Linear (tensorwise e4m3/e5m2) for each wrapped base layer; A, B stay bf16.

    Any rank works (the adapters run bf16); the base layers' K and N must be multiples of 16.
    """

    name = "fp8_base_lora"
    summary = "FP8 backbone (torchao float8 on base layers), BF16 LoRA adapters"
    built_on = "PEFT + torchao float8"

    adapters_in_fp8 = False

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
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
