"""fp6_lora: an FP6 (E3M2 or E2M3) weight-only backbone + BF16 LoRA (PEFT), as the FALQON paper's FP6 baseline.

Two backends for the frozen base weight W (N x K); option `fp6_backend` picks one:
- "fpx": torchao's fpx weight-only quantization (fp6-llm tensor-core kernels): the forward is one fused
  fp6 x bf16 GEMM. Needs a torchao that still ships fpx (removed in 0.18), CUDA, and K % 64 == 0,
  N % 256 == 0.
- "floatx": FP6 storage through torchao's own FPx encoder and decoder (torchao.prototype.custom_fp_utils).
  Each output row has one scale s = bf16(amax_row / fp6_max) (fp6_max = 28.0 for E3M2, 7.5 for E2M3, read
  from torchao's decoder); the codes are torchao's encoding of W / s (round to nearest, ties to even;
  magnitudes at or above fp6_max saturate to it; subnormals kept: E3M2 below 2^-2 on a 2^-4 grid, E2M3
  below 1 on a 2^-3 grid) packed 4 codes into 3 bytes, so W costs 0.75 B/elem + 2 B per row. At every use
  W is dequantized to bf16 - unpack, decode by looking the code up among the 64 values torchao's decoder
  gives (the decoder itself writes through boolean masks, a host sync that a CUDA graph cannot capture),
  times s, one bf16 rounding - and the GEMM runs in bf16: forward Y = X W'^T, backward dX = dY W'.
  This is what an FP6 weight-only backbone costs without fp6-llm kernels, like QLoRA's dequantize-then-GEMM:
  it saves weight memory, not time (step_cost counts the dequantization at a fused kernel's floor).
- "auto" (default): fpx when torchao ships it, the layers are on CUDA and every target shape fits its
  kernels; otherwise floatx. Each converted base layer records the backend it uses in `fp6_backend`.

Both run the frozen layer through `FrozenQuantizedLinear`, whose backward gives dX = dY . dequantize(W)
and no gradient for W (torchao's fpx tensor has no backward of its own).
Option `fp6_format`: "e3m2" (default, as the paper) or "e2m3".
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Mapping
from typing import Any

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
    select_target_linears,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, MethodUnavailable, StepCost

FP6_FORMATS = {"e3m2": (3, 2), "e2m3": (2, 3)}
FP6_BACKENDS = ("auto", "fpx", "floatx")
# fp6-llm's tensor-core layout: torchao silently skips layers whose shape does not fit
FPX_K_MULTIPLE = 64
FPX_N_MULTIPLE = 256
FP6_BITS = 6
FP6_CODES = 1 << FP6_BITS  # sign + 5 bits: codes 0..63, no inf/NaN encodings
FP6_BYTES = 0.75  # 4 codes in 3 bytes
CODES_PER_GROUP, BYTES_PER_GROUP = 4, 3
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny positive scale (its codes are 0), as torchao's floatx does


# ---------------------------------------------------------------------------------------------------------
# options


OPTION_NAMES = ("fp6_format", "fp6_backend")


def parse_options(options: Mapping[str, Any]) -> dict[str, str]:
    """AdapterConfig.options -> {'fp6_format', 'fp6_backend'} with defaults; ValueError names an unknown option or
    a value outside the allowed ones (suites call this at load, so a typo is not one error row per point)."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"fp6_lora: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTION_NAMES)}")
    fmt = options.get("fp6_format", "e3m2")
    if not isinstance(fmt, str) or fmt not in FP6_FORMATS:
        raise ValueError(f"fp6_lora: fp6_format={fmt!r}; allowed: {', '.join(FP6_FORMATS)}")
    backend = options.get("fp6_backend", "auto")
    if not isinstance(backend, str) or backend not in FP6_BACKENDS:
        raise ValueError(f"fp6_lora: fp6_backend={backend!r}; allowed: {', '.join(FP6_BACKENDS)}")
    return {"fp6_format": fmt, "fp6_backend": backend}


def fp6_format(config: AdapterConfig) -> tuple[int, int]:
    """(exponent bits, mantissa bits) from config.options['fp6_format']."""
    return FP6_FORMATS[parse_options(config.options)["fp6_format"]]


def requested_backend(config: AdapterConfig) -> str:
    """config.options['fp6_backend']: 'auto' (default), 'fpx' or 'floatx'."""
    return parse_options(config.options)["fp6_backend"]


# ---------------------------------------------------------------------------------------------------------
# torchao: fpx (fp6-llm kernels) where it still ships, the floatx encoder/decoder otherwise


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
        f"torchao {torchao.__version__} lacks fpx (FPXWeightOnlyConfig / fpx_weight_only); "
        "it was removed from torchao - install a torchao release that still ships it for the fp6-llm kernels"
    )


def torchao_floatx_codec():
    """(encode, decode): torchao's FPx encoder fp32 -> uint8 code and decoder uint8 code -> fp32, or MethodUnavailable.

    Codes sit in the low bits of the uint8 (bit 5 the sign for fp6), round to nearest even, saturate at the
    format's largest magnitude, keep subnormals, and have no inf/NaN encodings.
    """
    try:
        from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32
    except ImportError as exc:
        raise MethodUnavailable(
            f"fp6_lora needs torchao (pip install torchao) for its FPx encoder/decoder "
            f"(torchao.prototype.custom_fp_utils): {exc}"
        ) from exc
    return _f32_to_floatx_unpacked, _floatx_unpacked_to_f32


def fpx_kernels_run_on(device: torch.device) -> bool:
    """fp6-llm kernels are CUDA-only."""
    return device.type == "cuda"


def require_fpx_shapes(shapes: dict[str, tuple[int, int]]) -> None:
    """fp6-llm kernels need K % 64 == 0 and N % 256 == 0; torchao would skip others silently."""
    bad = [f"{n} (K={k}, N={n_})" for n, (k, n_) in shapes.items() if k % FPX_K_MULTIPLE or n_ % FPX_N_MULTIPLE]
    if bad:
        raise MethodUnavailable(
            f"fp6_lora: torchao fpx kernels need K % {FPX_K_MULTIPLE} == 0 and N % {FPX_N_MULTIPLE} == 0; "
            f"not met by {', '.join(bad[:8])}"
        )


def fpx_unavailable_reason(device: torch.device, shapes: dict[str, tuple[int, int]]) -> str | None:
    """None when the fpx backend can run these layers on `device`; else why not."""
    try:
        torchao_fpx_config()
        if not fpx_kernels_run_on(device):
            return f"torchao fpx (fp6-llm) kernels need CUDA, the model is on {device.type}"
        require_fpx_shapes(shapes)
    except MethodUnavailable as exc:
        return str(exc)
    return None


def choose_backend(requested: str, device: torch.device, shapes: dict[str, tuple[int, int]]) -> tuple[str, str]:
    """(backend, why): 'fpx' when requested or when auto finds it can run; 'floatx' otherwise.

    Raises MethodUnavailable when the requested backend cannot run.
    """
    if requested == "floatx":
        torchao_floatx_codec()
        return "floatx", "requested (fp6_backend='floatx')"
    fpx_problem = fpx_unavailable_reason(device, shapes)
    if requested == "fpx":
        if fpx_problem:
            raise MethodUnavailable(f"fp6_lora with fp6_backend='fpx': {fpx_problem}")
        return "fpx", "requested (fp6_backend='fpx')"
    if fpx_problem is None:
        return "fpx", "auto: torchao ships fpx and the layers fit its kernels"
    torchao_floatx_codec()
    return "floatx", f"auto: {fpx_problem}"


# ---------------------------------------------------------------------------------------------------------
# the floatx backend: FP6 codes, 4 to 3 bytes


def fp6_max(ebits: int, mbits: int) -> float:
    """Largest FP6 magnitude, from torchao's decoder: the all-ones exponent and mantissa code (E3M2 28.0, E2M3 7.5)."""
    _, decode = torchao_floatx_codec()
    return float(decode(torch.tensor([(1 << (ebits + mbits)) - 1], dtype=torch.uint8), ebits, mbits))


def fp6_code_values(ebits: int, mbits: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """All 64 FP6 values indexed by code, decoded by torchao (exact in bf16, fp16, fp32: <= 4 significant bits)."""
    _, decode = torchao_floatx_codec()
    return decode(torch.arange(FP6_CODES, dtype=torch.uint8), ebits, mbits).to(dtype=dtype, device=device)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """6-bit codes (uint8, any shape, values < 64) -> (ceil(n / 4), 3) uint8, n = codes.numel().

    Little-endian bit stream: code j of a group of four occupies bits 6j .. 6j+5 of its 24 bits; the last
    group is padded with zero codes.
    """
    flat = codes.reshape(-1)
    pad = -flat.numel() % CODES_PER_GROUP
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    c0, c1, c2, c3 = flat.view(-1, CODES_PER_GROUP).unbind(1)
    b0 = c0 | ((c1 & 0x03) << 6)
    b1 = (c1 >> 2) | ((c2 & 0x0F) << 4)
    b2 = (c2 >> 4) | (c3 << 2)
    return torch.stack([b0, b1, b2], dim=1)


def packed_fp6_bytes(numel: int) -> int:
    """Bytes of pack_fp6's output for `numel` codes: 3 per group of 4, the last group padded."""
    return BYTES_PER_GROUP * math.ceil(numel / CODES_PER_GROUP)


def unpack_fp6(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """(G, 3) uint8 from pack_fp6 -> the first `numel` 6-bit codes, flat uint8. No host sync (graph-capturable)."""
    b0, b1, b2 = packed.unbind(1)
    c0 = b0 & 0x3F
    c1 = (b0 >> 6) | ((b1 & 0x0F) << 2)
    c2 = (b1 >> 4) | ((b2 & 0x03) << 4)
    c3 = b2 >> 2
    return torch.stack([c0, c1, c2, c3], dim=1).view(-1)[:numel]


def quantize_fp6_rowwise(weight: torch.Tensor, ebits: int, mbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 N x K, scale N in weight.dtype): s = amax_row / fp6_max rounded to weight.dtype, codes =
    torchao's encoding of fp32(W) / s. Dividing by the stored (rounded) scale keeps dequantization consistent;
    a row whose scale rounded down saturates at fp6_max (within 2^-8 of its amax)."""
    encode, _ = torchao_floatx_codec()
    w32 = weight.detach().float()
    amax = w32.abs().amax(dim=1).clamp(min=AMAX_FLOOR)
    scale = (amax / fp6_max(ebits, mbits)).to(weight.dtype).clamp(min=torch.finfo(weight.dtype).tiny)
    codes = encode((w32 / scale.float()[:, None]).contiguous(), ebits, mbits)
    return codes, scale


def fp6_dequant_bytes(K: int, N: int) -> float:
    """One dequantization of an N x K FP6 weight at its floor (one fused pass), in bytes: read the packed codes
    (0.75 B/elem) and the N bf16 row scales, write N K bf16 (2.75 B/elem in all).

    Eager torch (Fp6WeightTensor.dequantize) runs about fifteen kernels instead - unpack's masks and shifts, the
    stack, the int32 index cast, the gather, the scale multiply - moving about 22 B/elem; the roofline floor
    counts what a fused kernel would move."""
    return N * K * FP6_BYTES + BF16_BYTES * N + N * K * BF16_BYTES


@functools.cache
def fp6_weight_tensor_class() -> type:
    """The floatx backend's weight tensor class, defined on first use so that importing the method registry does
    not import torchao.

    Fp6WeightTensor(packed, scale, code_values, ebits, mbits, in_features, dtype): a torchao tensor subclass
    of logical shape N x K and dtype bf16 (the weight's dtype) holding packed (ceil(N K / 4) x 3 uint8),
    scale (N, bf16) and code_values (the 64 FP6 values in bf16, decoded once by torchao: dequantize gathers
    from them instead of running torchao's decoder, whose boolean-mask writes sync the host and so cannot run
    inside a CUDA graph). F.linear dequantizes to bf16, then runs a bf16 GEMM. Its storage counts through
    __tensor_flatten__: 0.75 N K (rounded up to 3 bytes) + 2 N + 128 bytes.
    """
    from torchao.utils import TorchAOBaseTensor

    class Fp6WeightTensor(TorchAOBaseTensor):
        tensor_data_names = ["packed", "scale", "code_values"]
        tensor_attribute_names = ["ebits", "mbits", "in_features", "dtype"]

        def __new__(cls, packed, scale, code_values, ebits, mbits, in_features, dtype):
            shape = (scale.shape[0], in_features)
            return torch.Tensor._make_wrapper_subclass(
                cls, shape, dtype=dtype, device=packed.device, requires_grad=False
            )

        def __init__(self, packed, scale, code_values, ebits, mbits, in_features, dtype):
            super().__init__()
            self.packed, self.scale, self.code_values = packed, scale, code_values
            self.ebits, self.mbits, self.in_features = ebits, mbits, in_features

        @classmethod
        def from_hp(cls, weight: torch.Tensor, ebits: int, mbits: int):
            """Quantize a dense N x K weight (quantize_fp6_rowwise) and pack its codes."""
            codes, scale = quantize_fp6_rowwise(weight, ebits, mbits)
            values = fp6_code_values(ebits, mbits, weight.dtype, weight.device)
            return cls(pack_fp6(codes), scale, values, ebits, mbits, weight.shape[1], weight.dtype)

        def codes(self) -> torch.Tensor:
            """The N x K uint8 FP6 codes."""
            n, k = self.shape
            return unpack_fp6(self.packed, n * k).view(n, k)

        def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
            """N x K in the weight's dtype: code value times row scale, rounded once to bf16 (torch multiplies bf16
            in fp32, where the product of an FP6 value and a bf16 scale, at most 12 significant bits, is exact)."""
            codes = self.codes().reshape(-1).int()  # index_select takes int32 as is; indexing would widen to int64
            dense = torch.index_select(self.code_values, 0, codes).view(self.shape) * self.scale[:, None]
            return dense if output_dtype is None else dense.to(output_dtype)

    @Fp6WeightTensor.implements_torch_function(F.linear)
    @Fp6WeightTensor.implements(torch.ops.aten.linear.default)
    def _linear(func, types, args, kwargs):
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return F.linear(x, weight.dequantize(), bias)

    Fp6WeightTensor.__qualname__ = "Fp6WeightTensor"  # found again through this module's __getattr__ (pickle)
    return Fp6WeightTensor


def __getattr__(name: str):
    """`fp6_lora.Fp6WeightTensor` builds the class on first access (PEP 562), so torchao loads only when used."""
    if name == "Fp6WeightTensor":
        return fp6_weight_tensor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantize_weight_floatx(linear: nn.Linear, ebits: int, mbits: int) -> None:
    """Replace `linear.weight` in place by its frozen Fp6WeightTensor."""
    fp6_tensor = fp6_weight_tensor_class().from_hp(linear.weight.detach(), ebits, mbits)
    linear.weight = nn.Parameter(fp6_tensor, requires_grad=False)


# ---------------------------------------------------------------------------------------------------------
# the frozen layer both backends share


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
    """nn.Linear whose frozen weight may be a torchao quantized tensor without autograd support.

    fp6_backend: 'fpx' or 'floatx' once fp6_lora has quantized it, None before; fp6_backend_reason why that
    backend; fp6_format 'e3m2' or 'e2m3'.
    """

    fp6_backend: str | None = None
    fp6_backend_reason: str | None = None
    fp6_format: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FrozenQuantizedLinear:
        """A frozen copy sharing `linear`'s weight and bias tensors (no new memory)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        new.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenWeightLinearFn.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp6_backend={self.fp6_backend}"


def is_frozen_quantized_linear(module: nn.Module, fqn: str) -> bool:
    """torchao quantize_ filter: only the base layers this method swapped in."""
    return isinstance(module, FrozenQuantizedLinear)


def fp6_base_layers(model: nn.Module) -> list[tuple[str, FrozenQuantizedLinear]]:
    """(PEFT layer name, its FrozenQuantizedLinear base layer) of a converted model."""
    layers = lora_layers(model)
    return [(n, layer.base_layer) for n, layer in layers if isinstance(layer.base_layer, FrozenQuantizedLinear)]


def first_target_device(model: nn.Module, names: list[str]) -> torch.device:
    """The device of the first named linear's weight (where the fp6 kernels would run)."""
    return model.get_submodule(names[0]).weight.device


# ---------------------------------------------------------------------------------------------------------
# the method


@register_method
class Fp6Lora(Method):
    """PEFT LoRA, then each wrapped base layer becomes a FrozenQuantizedLinear holding W in FP6 (fpx or floatx).

    The backend a run used is on each base layer (`fp6_backend`, with `fp6_backend_reason` and `fp6_format`)
    and in `describe(model)`; step_cost counts the backend the options ask for (auto: the one auto picks for
    that shape on this machine's GPU, or CPU).
    """

    name = "fp6_lora"
    option_names = OPTION_NAMES
    parse_options = staticmethod(parse_options)
    summary = (
        "FP6 (E3M2/E2M3) weight-only backbone + BF16 LoRA: W stored 0.75 B/elem, dequantized to BF16 for each "
        "GEMM (fused fp6-llm GEMM only where torchao ships fpx)"
    )
    built_on = "PEFT + torchao floatx encode/decode (fp6-llm GEMM when torchao ships fpx)"
    needs_cuda = False  # the floatx backend runs anywhere; fpx needs CUDA and is chosen only there
    supports_compile = False  # torch.compile over the custom backward + torchao tensor subclass is not verified

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        device = torch.device(device)
        try:
            torchao_floatx_codec()
            return None
        except MethodUnavailable as floatx_exc:
            floatx_problem = str(floatx_exc)
        fpx_problem = fpx_unavailable_reason(device, {})
        return None if fpx_problem is None else f"{floatx_problem}; fpx backend: {fpx_problem}"

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        ebits, mbits = fp6_format(config)
        requested = requested_backend(config)
        model = model.to(config.dtype)
        targets = select_target_linears(model, config.target_modules)
        backend, why = choose_backend(requested, first_target_device(model, targets), linear_shapes(model, targets))
        model = add_lora_adapters(model, config, targets)
        for _, layer in lora_layers(model):
            layer.base_layer = FrozenQuantizedLinear.from_linear(layer.base_layer)
        if backend == "fpx":
            config_cls, quantize_ = torchao_fpx_config()
            quantize_(model, config_cls(ebits, mbits), filter_fn=is_frozen_quantized_linear)
            dense = [n for n, base in fp6_base_layers(model) if type(base.weight) in (torch.Tensor, nn.Parameter)]
            if dense:
                raise MethodUnavailable(f"fp6_lora: torchao fpx left these layers unquantized: {', '.join(dense[:8])}")
        else:
            for _, base in fp6_base_layers(model):
                quantize_weight_floatx(base, ebits, mbits)
        for _, base in fp6_base_layers(model):
            base.fp6_backend, base.fp6_backend_reason = backend, why
            base.fp6_format = config.options.get("fp6_format", "e3m2")
        return model

    def describe(self, model: nn.Module) -> dict[str, str | dict[str, str] | None]:
        """The backend the converted layers use (one name, or layer -> name if they differ), why, and the format."""
        layers = fp6_base_layers(model)
        used = {name: base.fp6_backend for name, base in layers}
        backends = set(used.values())
        first = layers[0][1] if layers else None
        return {
            "fp6_backend": backends.pop() if len(backends) == 1 else used,
            "fp6_backend_reason": first.fp6_backend_reason if first else None,
            "fp6_format": first.fp6_format if first else None,
        }

    def default_backend(self, K: int, N: int, options: Mapping[str, Any] | None = None) -> str:
        """The backend options['fp6_backend'] names, else what auto would pick for a K -> N layer on this
        machine's GPU (CPU without one)."""
        requested = (options or {}).get("fp6_backend", "auto")
        if requested != "auto":
            return requested
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return "fpx" if fpx_unavailable_reason(device, {"layer": (K, N)}) is None else "floatx"

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """bf16 tensor-core math: base forward and dX (4 M N K), adapters (6 M r (K + N)).

        quant_bytes, floatx: W dequantized to bf16 in forward and again for dX (2 x fp6_dequant_bytes: read
        0.75 N K packed + 2 N scale bytes, write 2 N K); fpx: the forward kernel dequantizes W in registers
        (its fp6 read is GEMM operand traffic), backward dequantizes once for dX (1 x fp6_dequant_bytes).
        Both: PEFT's scale-and-add and its backward; the SGD update of A, B.
        """
        passes = 1 if self.default_backend(K, N, options) == "fpx" else 2
        moved = passes * fp6_dequant_bytes(K, N) + lora_elementwise_bytes(K, N, tokens) + sgd_update_bytes(K, N, rank)
        flops = frozen_base_flops(K, N, tokens) + adapter_flops(K, N, rank, tokens)
        return StepCost(gemm_flops={"bf16": flops}, quant_bytes=moved)
