"""fp8_lora: the paper's FP8 baseline - PEFT LoRA, then torchao `convert_to_float8_training` over every
nn.Linear including lora_A and lora_B (dynamic tensorwise e4m3 for X and W, e5m2 for gradients)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    adapter_flops,
    add_lora_adapters,
    cast_bytes,
    frozen_base_flops,
    linear_module_names,
    linear_shapes,
    lora_elementwise_bytes,
    require_dims_multiple_of,
    select_target_linears,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, MethodUnavailable, StepCost

FP8_DIM_MULTIPLE = 16  # torch._scaled_mm (cuBLASLt) needs K and N divisible by 16
# torchao's backward runs the weight-gradient GEMM dY^T (N x M) . X (M x K), which reduces over the tokens M:
# torch._scaled_mm refuses it on CUDA unless M % 16 == 0 ("trailing dimension of mat1 ... divisible by 16")
TOKEN_MULTIPLE = 16


def import_float8_training():
    """torchao's (convert_to_float8_training, Float8LinearConfig), or MethodUnavailable with an install hint."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise MethodUnavailable(f"needs torchao with float8 training (pip install torchao): {exc}") from exc
    return convert_to_float8_training, Float8LinearConfig


def float8_unavailable_reason(name: str) -> str | None:
    """None when torchao float8 training imports; otherwise the reason."""
    try:
        import_float8_training()
    except MethodUnavailable as exc:
        return f"{name} {exc}"
    return None


def base_fp8_cast_bytes(K: int, N: int, tokens: int) -> float:
    """Casting a frozen base layer's GEMM operands bf16 -> fp8 every step: X (M x K), W (N x K), dY (M x N)."""
    return cast_bytes(tokens * K) + cast_bytes(N * K) + cast_bytes(tokens * N)


def is_lora_base_layer(module: nn.Module, fqn: str) -> bool:
    """torchao module_filter_fn: only the frozen base nn.Linear that PEFT wrapped (named '<target>.base_layer')."""
    return fqn.endswith("base_layer")


def pad_tokens_of_float8_linears(model: nn.Module) -> nn.Module:
    """Make every torchao Float8Linear of `model` pad its tokens to a multiple of TOKEN_MULTIPLE (in place).

    What a user does at an odd token count (e.g. 3000 = batch x sequence): zero rows appended to the flattened
    M x K input and sliced off the output. Zero rows change no tensorwise amax and add zeros to the dW
    reduction, so the results are those of the unpadded layer; the cost is one M x K copy of x (and of its
    gradient). Aligned inputs take torchao's own forward, untouched.
    """
    for module in model.modules():
        base = type(module)
        if base.__name__ == "Float8Linear" and base.__module__.startswith("torchao."):
            module.__class__ = _token_padded(base)
    return model


@functools.cache
def _token_padded(base: type) -> type:
    """A subclass of torchao's Float8Linear whose forward pads the token dim M (flattened leading dims)."""

    class TokenPaddedFloat8Linear(base):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            k = input.shape[-1]
            rows = input.numel() // k
            extra = (-rows) % TOKEN_MULTIPLE
            if extra == 0:
                return super().forward(input)
            padded = torch.nn.functional.pad(input.reshape(rows, k), (0, 0, 0, extra))
            out = super().forward(padded)[:rows]
            return out.reshape(*input.shape[:-1], out.shape[-1])

    TokenPaddedFloat8Linear.__qualname__ = TokenPaddedFloat8Linear.__name__
    return TokenPaddedFloat8Linear


@register_method
class Fp8Lora(Method):
    """Every linear, adapters included, is a torchao Float8Linear with the default (tensorwise) recipe.

    torchao runs each GEMM through torch._scaled_mm, so every dim (K, N, rank, and tokens for the dW GEMM)
    must be a multiple of 16 on the GPU; convert checks K, N and rank, and the converted linears pad the
    tokens (pad_tokens_of_float8_linears).
    """

    name = "fp8_lora"
    option_names = ()
    summary = "LoRA with every linear in FP8 incl. A and B (torchao float8, tensorwise e4m3/e5m2)"
    built_on = "PEFT + torchao float8"

    adapters_in_fp8 = True  # fp8_base_lora (a subclass) keeps the adapters in bf16

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        return float8_unavailable_reason(self.name) or super().unavailable_reason(device)

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        convert_to_float8_training, Float8LinearConfig = import_float8_training()
        model = model.to(config.dtype)
        targets = select_target_linears(model, config.target_modules)
        # torchao converts every linear (or, base-only, just the targets): those dims must fit _scaled_mm
        checked = linear_module_names(model) if self.adapters_in_fp8 else targets
        rank = config.rank if self.adapters_in_fp8 else None
        require_dims_multiple_of(self.name, linear_shapes(model, checked), rank, FP8_DIM_MULTIPLE, "torchao float8")
        model = add_lora_adapters(model, config, targets)
        only_base = None if self.adapters_in_fp8 else is_lora_base_layer
        model = convert_to_float8_training(model, module_filter_fn=only_base, config=Float8LinearConfig())
        return pad_tokens_of_float8_linears(model)

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """All GEMMs fp8: base forward + dX (4 M N K) and the six adapter GEMMs (6 M r (K + N)).

        quant_bytes (bf16 -> fp8 casts, read 2 + write 1 byte per element, each operand once):
          base layer: X (M K), W (N K, cast every step: dynamic scaling), dY (M N);
          lora_A: X again (its own Float8Linear casts it), A (r K), dO_A (M r);
          lora_B: O_A (M r), B (N r), dY * scaling (M N);
        plus PEFT's scale-and-add of the adapter output and its backward, and the SGD update of A, B.
        Not counted (not needed for the result): torchao's backward also runs the dW GEMM of the frozen base
        (autograd discards it) and recasts X, W and dY in backward unless torch.compile merges the casts.
        """
        flops = frozen_base_flops(K, N, tokens) + adapter_flops(K, N, rank, tokens)
        casts = (
            base_fp8_cast_bytes(K, N, tokens)
            + cast_bytes(tokens * K) + cast_bytes(rank * K) + cast_bytes(tokens * rank)
            + cast_bytes(tokens * rank) + cast_bytes(N * rank) + cast_bytes(tokens * N)
        )
        moved = casts + lora_elementwise_bytes(K, N, tokens) + sgd_update_bytes(K, N, rank)
        return StepCost(gemm_flops={"fp8": flops}, quant_bytes=moved)
