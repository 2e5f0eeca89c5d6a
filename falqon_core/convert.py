"""Turn a model's frozen nn.Linear layers into a method's trainable layers, by method name.

    model, method = convert_model(model, "bf16_lora", AdapterConfig(rank=16, target_modules=LLAMA_TARGET_MODULES))

Errors: UnknownMethodError (lists the registered names), MethodUnavailable (why it cannot run here and what
to install), ValueError (no linear matches target_modules; lists the linears present).
"""

from __future__ import annotations

import torch
from torch import nn

from falqon_core.methods import AdapterConfig, Method, MethodUnavailable, UnknownMethodError, get_method
from falqon_core.methods._lora_common import linear_module_names

__all__ = [
    "LLAMA_TARGET_MODULES",
    "MethodUnavailable",
    "UnknownMethodError",
    "convert_model",
    "linear_module_names",
    "model_device",
]

# the projections of a LLaMA decoder layer (attention and MLP), the usual LoRA targets
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def convert_model(model: nn.Module, method_name: str, config: AdapterConfig, compile: bool = False) -> tuple[nn.Module, Method]:
    """(converted model, method instance). May modify `model` in place; use the returned model.

    Checks the method can run on the model's device (and under torch.compile when `compile`) first
    (Method.check_runnable), so nothing is modified when it cannot: MethodUnavailable.
    """
    method = get_method(method_name)
    method.check_runnable(model_device(model), compile=compile)
    return method.convert(model, config), method
