"""fp6_lora: an FP6 (E3M2 or E2M3) weight-only backbone, torchao's fpx / fp6-llm kernels, + BF16 LoRA (PEFT).

torchao's fpx weight has no backward, so the frozen layer runs through `FrozenQuantizedLinear`: forward is
torchao's fused fp6 x bf16 GEMM, backward is dX = dY . dequantize(W). No gradient for W.
Option `fp6_format`: "e3m2" (default, as the paper) or "e2m3".
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    BF16_BYTES,
    adapter_flops,
    add_lora_adapters,
    frozen_base_flops,
    linear_shapes,
    lora_elementwise_bytes,
    lora_layers,
    model_memory_bytes,
    select_target_linears,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, MethodUnavailable, StepCost

FP6_FORMATS = {"e3m2": (3, 2), "e2m3": (2, 3)}
# fp6-llm's tensor-core layout: torchao silently skips layers whose shape does not fit
FPX_K_MULTIPLE = 64
FPX_N_MULTIPLE = 256
FP6_BYTES = 0.75


def torchao_fpx_config():
    """torchao's FPX weight-only config class (its location moved across releases), or MethodUnavailable."""
    try:
        import torchao
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise MethodUnavailable(f"fp6_lora needs torchao with fpx weight-only quantization: {exc}") from exc
    candidates = ("torchao.quantization", "torchao.prototype.quantization.quant_api", "torchao.quantization.quant_api")
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        config_cls = getattr(module, "FPXWeightOnlyConfig", None) or getattr(module, "fpx_weight_only", None)
        if config_cls is not None:
            return config_cls, quantize_
    raise MethodUnavailable(
        f"unavailable: torchao {torchao.__version__} lacks fpx (FPXWeightOnlyConfig / fpx_weight_only); "
        "it was removed from torchao - install a torchao release that still ships it to run fp6_lora"
    )


class _FrozenWeightLinearFn(torch.autograd.Function):
    """Y = linear(X, W) with a frozen, possibly quantized W; backward gives dX = dY . dequantize(W) only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.weight
        dense = weight if type(weight) in (torch.Tensor, nn.Parameter) else weight.dequantize()
        grad_x = grad_out @ dense.to(grad_out.dtype)
        return grad_x, None, None


class FrozenQuantizedLinear(nn.Linear):
    """nn.Linear whose frozen weight may be a torchao quantized tensor without autograd support."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FrozenQuantizedLinear:
        """A frozen copy sharing `linear`'s weight and bias tensors (no new memory)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        new.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenWeightLinearFn.apply(x, self.weight, self.bias)


def is_frozen_quantized_linear(module: nn.Module, fqn: str) -> bool:
    """torchao quantize_ filter: only the base layers this method swapped in."""
    return isinstance(module, FrozenQuantizedLinear)


def fp6_format(config: AdapterConfig) -> tuple[int, int]:
    """(exponent bits, mantissa bits) from config.options['fp6_format']."""
    fmt = config.options.get("fp6_format", "e3m2")
    if fmt not in FP6_FORMATS:
        raise ValueError(f"fp6_lora: fp6_format={fmt!r}; allowed: {', '.join(FP6_FORMATS)}")
    return FP6_FORMATS[fmt]


def require_fpx_shapes(shapes: dict[str, tuple[int, int]]) -> None:
    """fp6-llm kernels need K % 64 == 0 and N % 256 == 0; torchao would skip others silently."""
    bad = [f"{n} (K={k}, N={n_})" for n, (k, n_) in shapes.items() if k % FPX_K_MULTIPLE or n_ % FPX_N_MULTIPLE]
    if bad:
        raise MethodUnavailable(
            f"fp6_lora: torchao fpx kernels need K % {FPX_K_MULTIPLE} == 0 and N % {FPX_N_MULTIPLE} == 0; "
            f"not met by {', '.join(bad[:8])}"
        )


@register_method
class Fp6Lora(Method):
    """PEFT LoRA, then each wrapped base layer becomes a FrozenQuantizedLinear quantized by torchao fpx."""

    name = "fp6_lora"
    summary = "FP6 (E3M2) weight-only backbone via torchao fpx (fp6-llm kernels) + BF16 LoRA"
    built_on = "PEFT + torchao fpx"
    needs_cuda = True
    supports_compile = False  # torch.compile over the custom backward + fpx tensor subclass is not verified

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        reasons = []
        if torch.device(device).type != "cuda":
            reasons.append(f"{self.name} needs a CUDA GPU (torchao fpx kernels)")
        try:
            torchao_fpx_config()
        except MethodUnavailable as exc:
            reasons.append(str(exc))
        return "; ".join(reasons) or None

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        config_cls, quantize_ = torchao_fpx_config()
        ebits, mbits = fp6_format(config)
        model = model.to(config.dtype)
        targets = select_target_linears(model, config.target_modules)
        require_fpx_shapes(linear_shapes(model, targets))
        model = add_lora_adapters(model, config, targets)
        for _, layer in lora_layers(model):
            layer.base_layer = FrozenQuantizedLinear.from_linear(layer.base_layer)
        quantize_(model, config_cls(ebits, mbits), filter_fn=is_frozen_quantized_linear)
        dense = [n for n, layer in lora_layers(model) if type(layer.base_layer.weight) in (torch.Tensor, nn.Parameter)]
        if dense:
            raise MethodUnavailable(f"fp6_lora: torchao fpx left these layers unquantized: {', '.join(dense[:8])}")
        return model

    def step_cost(self, K: int, N: int, rank: int, tokens: int) -> StepCost:
        """bf16 tensor-core math: forward fp6 x bf16 fused GEMM and dX (4 M N K), adapters (6 M r (K + N)).

        quant_bytes: the forward kernel dequantizes W in registers (its fp6 read is GEMM operand traffic);
        backward dequantizes W to bf16 for dX (read 0.75 N K + 2 N fp16 row scales, write 2 N K);
        PEFT's scale-and-add and its backward; the SGD update of A, B.
        """
        dequant = N * K * FP6_BYTES + 2 * N + N * K * BF16_BYTES
        moved = dequant + lora_elementwise_bytes(K, N, tokens) + sgd_update_bytes(K, N, rank)
        flops = frozen_base_flops(K, N, tokens) + adapter_flops(K, N, rank, tokens)
        return StepCost(gemm_flops={"bf16": flops}, quant_bytes=moved)

    def memory_bytes(self, model: nn.Module) -> dict[str, int]:
        """The fpx weight counts its packed 6-bit data and scales, not its logical bf16 shape."""
        return model_memory_bytes(self, model)
