"""halo_lora: HALO (arXiv 2501.02625) - a frozen FP8 backbone whose GEMMs see Hadamard-rotated operands - plus LoRA.

A frozen nn.Linear(K -> N) with weight W (N x K) keeps no high-precision copy of W. With H_K, H_N the
orthonormal, symmetric block-Hadamard matrices (falqon_core.kernels.hadamard; block b = 128, or the largest
power of two dividing the dim):
  forward   y  = (x H_K)(W H_K)^T            x H_K rotated + e4m3-quantized per step; W H_K stored in e4m3
  backward  dX = (dY H_N)(H_N^T W)           dY H_N rotated + e5m2-quantized per step; H_N^T W stored in e4m3
both GEMMs through torch._scaled_mm (tensorwise scales). H H^T = I makes both exact in real arithmetic;
the rotation spreads a large value over the b entries of its block before the cast.
The LoRA path runs in the activation dtype on top: y += (alpha/r) (x A^T) B^T, with dA, dB (and its part of
dX) from the same autograd.Function, so the adapter add is a GEMM epilogue (addmm), not an extra pass.

Storage: two e4m3 copies of W (W H_K as N x K for the forward, W^T H_N as K x N for dX), i.e. the bytes of
one bf16 W, plus A (r x K), B (N x r) and the bias.

What the rotation buys in FP8, measured (tests/test_halo_lora.py): e4m3 has a relative grid, so with a
tensorwise scale a large outlier costs the other entries nothing until it pushes them into e4m3's subnormal
range (outlier / typical value >~ 448 * 2^6). There, rotation keeps the blocks beside the outlier's block
precise (their scale drops by about sqrt(b)). It does not reduce the GEMM error that the outlier's own
rounding causes, and where the weight columns that meet an activation outlier are near zero, it spreads
that rounding into every output and makes the GEMM error much larger.

Options (AdapterConfig.options):
  max_block   largest Hadamard block (power of two, 16..128 for the Triton kernel; default 128)
"""

from __future__ import annotations

import dataclasses

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from falqon_core import fp8
from falqon_core.kernels.hadamard import (
    MAX_BLOCK,
    MIN_BLOCK,
    block_hadamard_reference,
    hadamard_block_size,
    hadamard_quantize,
)
from falqon_core.methods import register_method
from falqon_core.methods._lora_common import (
    BF16_BYTES,
    FP8_BYTES,
    adapter_flops,
    cast_bytes,
    freeze_all,
    frozen_base_flops,
    linear_shapes,
    require_dims_multiple_of,
    select_target_linears,
    set_submodule,
    sgd_update_bytes,
)
from falqon_core.methods.base import AdapterConfig, Method, StepCost

OPTION_NAMES = ("max_block",)


def rotated_fp8_weights(
    weight: torch.Tensor, block_k: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W H_K as e4m3 N x K, its scale, W^T H_N = (H_N^T W)^T as e4m3 K x N, its scale), tensorwise.

    Both are laid out as the second operand of fp8.scaled_mm wants it (rows = output columns, K-contiguous).
    The rotation runs once, in fp32 (fp64 for an fp64 weight).
    """
    w_fwd, s_fwd = fp8.quantize(block_hadamard_reference(weight, block_k), fp8.E4M3)
    w_bwd, s_bwd = fp8.quantize(block_hadamard_reference(weight.t(), block_n), fp8.E4M3)
    return w_fwd.contiguous(), s_fwd, w_bwd.contiguous(), s_bwd


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """alpha * (a @ b) as one GEMM (alpha in the epilogue); `like` only gives addmm its shape (beta = 0)."""
    return torch.addmm(like, a, b, beta=0.0, alpha=alpha)


class HaloLoRAFunction(torch.autograd.Function):
    """Forward and backward of HaloLinear on a flattened M x K input (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, w_fwd, s_fwd, w_bwd, s_bwd, block_k, block_n, scaling):
        x8, x_scale = hadamard_quantize(x, block_k, fp8.E4M3, "tensorwise")
        y = fp8.scaled_mm(x8, x_scale, w_fwd, s_fwd, out_dtype=x.dtype)  # (x H_K)(W H_K)^T, M x N
        h = x @ lora_a.t()  # M x r
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, h, lora_a, lora_b, w_bwd, s_bwd)
        ctx.block_n = block_n
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, lora_a, lora_b, w_bwd, s_bwd = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_y.contiguous()
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        grad_h = _mm_scaled(dy, lora_b, s, h) if (need_x or need_a) else None  # s dY B, M x r
        if need_x:
            g8, g_scale = hadamard_quantize(dy, ctx.block_n, fp8.E5M2, "tensorwise")
            grad_x = fp8.scaled_mm(g8, g_scale, w_bwd, s_bwd, out_dtype=dy.dtype)  # (dY H_N)(H_N^T W), M x K
            grad_x.addmm_(grad_h, lora_a)
        if need_a:
            grad_a = grad_h.t() @ x  # r x K
        if need_b:
            grad_b = _mm_scaled(dy.t(), h, s, lora_b)  # s dY^T (x A^T), N x r
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None


class HaloLinear(nn.Module):
    """A frozen nn.Linear(K -> N) as HALO's rotated fp8 backbone plus a trainable LoRA adapter of rank r.

    Buffers: `w_fwd` (N x K e4m3, W H_K), `w_fwd_scale`, `w_bwd` (K x N e4m3, W^T H_N), `w_bwd_scale`
    (0-dim fp32 dequant scales). Parameters: `lora_A` (r x K, PEFT's kaiming-uniform init), `lora_B` (N x r,
    zeros) in `dtype`; `bias` (frozen, if the linear had one). Input (..., K) in `dtype`.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        max_block: int = MAX_BLOCK,
        seed: int = 0,
    ):
        super().__init__()
        n_out, k_in = linear.weight.shape
        if rank < 1:
            raise ValueError(f"halo_lora rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = k_in, n_out, rank
        self.block_k = hadamard_block_size(k_in, max_block)
        self.block_n = hadamard_block_size(n_out, max_block)
        self.scaling = float(alpha if alpha is not None else rank) / rank

        w_fwd, s_fwd, w_bwd, s_bwd = rotated_fp8_weights(linear.weight.detach(), self.block_k, self.block_n)
        self.register_buffer("w_fwd", w_fwd)
        self.register_buffer("w_fwd_scale", s_fwd)
        self.register_buffer("w_bwd", w_bwd)
        self.register_buffer("w_bwd_scale", s_bwd)
        device = linear.weight.device
        self.lora_A = nn.Parameter(_kaiming_uniform((rank, k_in), seed).to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, device=device, dtype=dtype))
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_config(cls, linear: nn.Linear, config: AdapterConfig) -> HaloLinear:
        """Build from an AdapterConfig; raises ValueError naming any unknown option and the allowed ones."""
        opts = parse_options(config.options)
        return cls(linear, config.rank, config.lora_alpha, dtype=config.dtype, seed=config.seed, **opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        y = HaloLoRAFunction.apply(
            x2d, self.lora_A, self.lora_B, self.w_fwd, self.w_fwd_scale, self.w_bwd, self.w_bwd_scale,
            self.block_k, self.block_n, self.scaling,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scaling={self.scaling:g}, block_k={self.block_k}, block_n={self.block_n}"
        )


def _kaiming_uniform(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's LoRA A init (nn.Linear's: kaiming-uniform, a = sqrt(5)), fp32 on CPU from its own generator."""
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return t


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """The HaloLinear keyword arguments from AdapterConfig.options; ValueError names unknown options."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"halo_lora: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTION_NAMES)}")
    parsed: dict[str, Any] = {}
    if "max_block" in options:
        parsed["max_block"] = int(options["max_block"])
    return parsed


def halo_layers(model: nn.Module) -> list[tuple[str, HaloLinear]]:
    """Every HaloLinear in `model` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HaloLinear)]


@register_method
class HaloLora(Method):
    """HALO's Hadamard-rotated fp8 backbone (x, dY rotated per step; W pre-rotated) with LoRA adapters."""

    name = "halo_lora"
    option_names = OPTION_NAMES
    parse_options = staticmethod(parse_options)
    summary = "Hadamard-rotated FP8 backbone (HALO): fp8 GEMMs on block-Hadamard-rotated x, dY, W + LoRA A, B"
    built_on = "own Triton block-Hadamard + fp8 cast (scipy.linalg.hadamard blocks) + torch._scaled_mm"
    needs_cuda = False  # the torch references and torch._scaled_mm run on CPU
    supports_compile = True
    needs_fp8_tensor_cores = True

    def convert(self, model: nn.Module, config: AdapterConfig) -> nn.Module:
        """Swap every target nn.Linear for a HaloLinear; only lora_A and lora_B stay trainable."""
        parse_options(config.options)  # fail before touching the model
        # a shape it cannot rotate is "unavailable" (an error row saying so), as fp8_lora's unaligned shapes are
        why = "the block-Hadamard rotation (a power-of-two block >= 16 dividing K and N)"
        if isinstance(model, nn.Linear) and config.target_modules is None:
            require_dims_multiple_of(self.name, {"linear": (model.in_features, model.out_features)}, None, MIN_BLOCK, why)
            freeze_all(model)
            return HaloLinear.from_config(model, config)
        names = select_target_linears(model, config.target_modules)
        require_dims_multiple_of(self.name, linear_shapes(model, names), None, MIN_BLOCK, why)
        modules = dict(model.named_modules())
        # each layer its own seed (config.seed + its index) so same-shaped layers do not start with one lora_A
        new_layers = {
            name: HaloLinear.from_config(modules[name], dataclasses.replace(config, seed=config.seed + i))
            for i, name in enumerate(names)
        }  # all checks first
        freeze_all(model)
        for name, layer in new_layers.items():
            set_submodule(model, name, layer)
        return model

    def step_cost(self, K: int, N: int, rank: int, tokens: int, options: Mapping[str, Any] | None = None) -> StepCost:
        """Minimum work of one fwd + bwd + SGD step at M = tokens.

        fp8 GEMMs: forward y (M N K) and dX (M K N) = 4 M N K. bf16: the six LoRA GEMMs (6 M r (K + N)) and the
        rotations as bf16 matmuls with the b x b blocks: 2 M K b_K (x) + 2 M N b_N (dY).
        Bytes: x read bf16 + written e4m3 (3 M K), dY read bf16 + written e5m2 (3 M N), and the SGD update of
        A, B (6 r (K + N)). The LoRA scale and add are GEMM epilogues, so no elementwise pass is counted.
        The tensorwise kernel reads x (and dY) twice, once per launch, so it moves 5 bytes per element where
        this floor counts 3: the gap shows up in `% of floor`.
        """
        max_block = int((options or {}).get("max_block", MAX_BLOCK))
        b_k, b_n = hadamard_block_size(K, max_block), hadamard_block_size(N, max_block)
        M = tokens
        rotations = 2.0 * M * K * b_k + 2.0 * M * N * b_n
        flops = {"fp8": frozen_base_flops(K, N, M), "bf16": adapter_flops(K, N, rank, M) + rotations}
        moved = cast_bytes(M * K, BF16_BYTES, FP8_BYTES) + cast_bytes(M * N, BF16_BYTES, FP8_BYTES)
        moved += sgd_update_bytes(K, N, rank)
        return StepCost(gemm_flops=flops, quant_bytes=float(moved))
