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
    "projection_targets",
    "MethodUnavailable",
    "UnknownMethodError",
    "convert_model",
    "linear_module_names",
    "model_device",
]

# the projections of a LLaMA decoder layer (attention and MLP), the usual LoRA targets
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# linears of a causal LM that are not its decoder layers' projections: the output head (and a classifier's score)
_NOT_PROJECTIONS = ("lm_head", "score")


def projection_targets(model: nn.Module) -> tuple[str, ...]:
    """The LoRA targets of a causal LM: the names of all its linear projections, the output head left out (what
    PEFT calls "all-linear"), LLaMA's seven first in their usual order. For a LLaMA-architecture model (Qwen2,
    Mistral and Gemma name theirs the same) this is LLAMA_TARGET_MODULES; another architecture's own names come
    too (Phi-3's fused qkv_proj and gate_up_proj), so no projection is silently left frozen."""
    names = {name.rsplit(".", 1)[-1] for name in linear_module_names(model)} - set(_NOT_PROJECTIONS)
    llama = tuple(n for n in LLAMA_TARGET_MODULES if n in names)
    return llama + tuple(sorted(names - set(llama)))


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
