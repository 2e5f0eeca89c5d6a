"""qlora_nf4: QLoRA - the frozen W stored as NF4 with double quantization (bitsandbytes Linear4bit),
BF16 compute, BF16 LoRA adapters through PEFT."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    BF16_BYTES,
    adapter_flops,
    add_lora_adapters,
    frozen_base_flops,
    lora_elementwise_bytes,
    select_target_linears,
    set_submodule,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, MethodUnavailable, StepCost

NF4_BLOCK = 64  # elements of W per absmax (bitsandbytes' default for Linear4bit)
NESTED_BLOCK = 256  # absmax values per fp32 scale of the double quantization


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MethodUnavailable(f"qlora_nf4 needs bitsandbytes (pip install bitsandbytes): {exc}") from exc
    return bitsandbytes


@contextlib.contextmanager
def bitsandbytes_quantize_ordered(device: torch.device | str) -> Iterator[None]:
    """Run bitsandbytes' weight quantization in order with torch's work, whatever stream is current.

    bitsandbytes (0.50 and before) launches its blockwise quantize kernels on CUDA's legacy default stream,
    not on torch's current stream (its open PR #2052). Under a side stream (the runner builds every point on
    one) the NF4 kernel then raced the torch ops around it: it read the weight before its producer wrote it,
    and the double quantization's torch ops read absmax before the kernel wrote it. On the H200 a 4-layer
    Qwen2.5-7B built that way gave layer 0's down_proj a non-finite NF4 weight (NaN loss from the first
    step), and two identical builds gave different losses. Here the quantization runs on the default
    stream itself, after and before a device synchronization; a one-time cost of the conversion.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize(device)
    try:
        with torch.cuda.stream(torch.cuda.default_stream(device)):
            yield
    finally:
        torch.cuda.synchronize(device)


def quantize_linear_to_nf4(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen bitsandbytes Linear4bit (NF4, double quant) holding `linear`'s weight, on its device.

    Params4bit quantizes when moved to a device, so the module is built on meta and moved last, in order
    with torch's stream (`bitsandbytes_quantize_ordered`).
    """
    bnb = _import_bitsandbytes()
    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.detach().to(compute_dtype),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        blocksize=NF4_BLOCK,
        module=q,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    with bitsandbytes_quantize_ordered(device):
        return q.to(device)


def nf4_dequant_bytes(K: int, N: int) -> float:
    """One dequantization of an N x K NF4 weight with double-quantized absmax, in bytes (B = N K / 64 blocks):
    absmax = code[absmax_u8] * absmax2 (read B u8, write B fp32), + offset (read and write B fp32), then
    W = nf4_code[nibble] * absmax (read N K / 2 packed bytes and B fp32, write N K bf16): about 2.77 N K."""
    n_blocks = N * K / NF4_BLOCK
    absmax_pass = n_blocks * 1 + n_blocks * 4 + 2 * n_blocks * 4 + n_blocks * 4
    return absmax_pass + N * K * 0.5 + N * K * BF16_BYTES


@register_method
class QloraNf4(Method):
    """Swap each target nn.Linear for bitsandbytes Linear4bit (NF4, double quant, bf16 compute), then PEFT LoRA."""

    name = "qlora_nf4"
    option_names = ()
    summary = "W in NF4 with double quant, dequantized to BF16 per GEMM; BF16 LoRA (QLoRA)"
    built_on = "bitsandbytes Linear4bit + PEFT"

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        try:
            _import_bitsandbytes()
        except MethodUnavailable as exc:
            return str(exc)
        return super().unavailable_reason(device)

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        model = model.to(config.dtype)
        targets = select_target_linears(model, config.target_modules)
        for name in targets:
            set_submodule(model, name, quantize_linear_to_nf4(model.get_submodule(name), config.dtype))
        # the flag transformers sets on 4-bit models; PEFT reads it to wrap Linear4bit with its bnb LoRA layer
        model.is_loaded_in_4bit = True
        return add_lora_adapters(model, config, targets)

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """All GEMMs bf16: base forward + dX on the dequantized W (4 M N K) and the adapters (6 M r (K + N)).

        quant_bytes: W dequantized NF4 -> bf16 once in forward and once for dX (2 x nf4_dequant_bytes,
        about 2 x 2.77 N K); PEFT's bnb layer clones the base output (read + write M x N bf16 = 4 M N);
        LoRA scale-and-add and its backward (lora_elementwise_bytes); SGD update of A, B.
        bitsandbytes >= 0.50 may run a fused NF4 GEMM for small M on some GPUs, skipping the forward
        dequant write; the count here is the dequant + GEMM path it takes for training-sized M.
        """
        flops = frozen_base_flops(K, N, tokens) + adapter_flops(K, N, rank, tokens)
        moved = (
            2 * nf4_dequant_bytes(K, N)
            + 2 * BF16_BYTES * tokens * N
            + lora_elementwise_bytes(K, N, tokens)
            + sgd_update_bytes(K, N, rank)
        )
        return StepCost(gemm_flops={"bf16": flops}, quant_bytes=moved)
