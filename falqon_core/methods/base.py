"""The contract every fine-tuning method fulfils, so the runner never knows any method by name.

A method turns the frozen `nn.Linear(K -> N)` layers of a model (weight W, N x K) into trainable
layers with adapter rank r. The suite builds a one-layer model, converts it, and times
`forward -> autograd.grad -> SGD update -> method.after_optimizer_step` as one training step.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from falqon_core import fp8


class MethodUnavailable(RuntimeError):
    """Raised by `Method.convert` when the method cannot run here; the message says what to install."""


@dataclass(frozen=True)
class AdapterConfig:
    """What every method needs to build its trainable layer.

    rank: adapter rank r. alpha: LoRA alpha (scaling alpha/r; FALQON ignores it, as the reference does).
    target_modules: names (suffixes) of the nn.Linear modules to convert; None means every nn.Linear.
    dtype: compute dtype of activations and high-precision weights.
    options: method-specific settings (e.g. FALQON's `topk`, `use_triton`); each method documents its own.
    """

    rank: int
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.rank)


@dataclass(frozen=True)
class StepCost:
    """The minimum work of one training step of one layer (fwd + bwd + adapter update), for the roofline.

    gemm_flops: dtype class ('fp8' or 'bf16') -> matmul FLOPs (2*M*N*K per GEMM) run in that precision.
    quant_bytes: bytes that quantization, casts and elementwise passes must move through device memory
      (each such input read once, each output written once); GEMM operand traffic is not counted here.
    """

    gemm_flops: dict[str, float]
    quant_bytes: float


class Method(abc.ABC):
    """Base class of a fine-tuning method. Subclass, set the class attributes, decorate with @register_method.

    Class attributes:
      name         registry key, e.g. "bf16_lora" (also the `methods = [...]` value in suite files)
      summary      one line for `falqon-bench list methods`
      built_on     the libraries it uses ("PEFT + torchao float8")
      needs_cuda   True when it cannot run on CPU at all (its CPU error says why)
      needs_fp8_tensor_cores  True when its CUDA path runs fp8 GEMMs (sm_89+)
      supports_compile  whether `torch.compile` of the converted model is expected to work
      option_names the AdapterConfig.options keys it reads; None: not declared (anything passes the suite check)
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    built_on: ClassVar[str] = ""
    needs_cuda: ClassVar[bool] = False
    needs_fp8_tensor_cores: ClassVar[bool] = False  # on CUDA, refuse GPUs older than sm_89 (Ada/Hopper)
    supports_compile: ClassVar[bool] = True
    # a suite's option the method never reads would be recorded in the row as if it had applied: suites refuse it
    option_names: ClassVar[tuple[str, ...] | None] = None
    # options -> parsed values, ValueError on an ill-typed value; None: values are checked only at convert
    parse_options: ClassVar[Callable[[Mapping[str, Any]], Any] | None] = None

    def check_runnable(self, device: torch.device | str, compile: bool = False) -> None:
        """The one availability check (the runner before it starts a worker; convert_model before it touches a
        model): raise MethodUnavailable with unavailable_reason's text, or when `compile` is asked of a method
        whose supports_compile is False."""
        reason = self.unavailable_reason(device)
        if reason is None and compile and not self.supports_compile:
            reason = f"{self.name} does not support torch.compile (supports_compile = False)"
        if reason is not None:
            raise MethodUnavailable(reason)

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        """None when the method can run on `device`; otherwise a one-line reason with what to install."""
        device = torch.device(device)
        if self.needs_cuda and device.type != "cuda":
            return f"{self.name} needs a CUDA GPU (its kernels have no CPU path)"
        if self.needs_fp8_tensor_cores and device.type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < fp8.FP8_MIN_CAPABILITY:
                return f"{self.name} needs fp8 tensor cores (sm_89+, Ada or Hopper); this GPU is sm_{major}{minor}"
        return None

    @abc.abstractmethod
    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        """Return `model` with its target nn.Linear layers replaced by this method's trainable layers.

        Base weights stay frozen; only adapter tensors have requires_grad. May modify `model` in place.
        Raises MethodUnavailable with an install hint when a library or the device is missing.
        """

    @abc.abstractmethod
    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """FLOPs and quantization bytes of one fwd+bwd+update step of a K->N layer at this rank, M=tokens.

        `options` are the AdapterConfig.options the layer was converted with (None: the method's defaults);
        the cost depends on nothing else, in particular not on an earlier convert.
        """

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """What the run should record about a converted model beyond the timings (a results row's method_info),
        e.g. FALQON's k per layer or fp6_lora's backend. Read from `model`, not from the method. Default: {}."""
        return {}

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors an optimizer updates (the adapters)."""
        return [p for p in model.parameters() if p.requires_grad]

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Work a method does after every optimizer step (FALQON's row-wise proxy update). Default: none.

        Must be CUDA-graph capturable (no host syncs) so the timed step can include it.
        """

    def memory_bytes(self, model: nn.Module) -> dict[str, int]:
        """Bytes held by frozen weights, adapters and optimizer state (AdamW: 2 fp32 moments per trainable element).

        Weights count what their storage really holds: a quantized tensor subclass (torchao float8 / fp6,
        bitsandbytes NF4) its packed data, scales and quantization statistics, not its logical bf16 shape.
        """
        trainable = self.trainable_parameters(model)
        trainable_ids = {id(p) for p in trainable}
        seen: dict[int, torch.Tensor] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            seen.setdefault(id(t), t)
        weights = adapters = 0
        for t in seen.values():
            if id(t) in trainable_ids:
                adapters += tensor_storage_bytes(t)
            else:
                weights += tensor_storage_bytes(t) + quant_state_bytes(t)
        n_trainable = sum(p.numel() for p in trainable)
        return {"weights": weights, "adapters": adapters, "optimizer_state": 2 * 4 * n_trainable}


def tensor_storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a traceable tensor subclass (torchao) counts its inner tensors
    (packed data + scales), a plain tensor numel * element_size."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        inner_names, _ = t.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(t, name)) for name in inner_names)
    return t.numel() * t.element_size()


def quant_state_bytes(weight: torch.Tensor) -> int:
    """Bytes of a bitsandbytes 4-bit weight's quantization statistics (absmax, nested absmax, code book)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return 0
    tensors = [v for v in state.as_dict(packed=False).values() if isinstance(v, torch.Tensor)]
    return sum(v.numel() * v.element_size() for v in tensors)
