"""Where a whole fine-tuning step's GPU time goes, by kernel class, and the floor that bounds the step.

Kernel classes (STEP_CLASSES), from the kernel name alone: in a CUDA-graph replay the profiler sees kernels but
no launching ops, so names are all every mode shares.
  gemm          matrix multiplies: the converted linears' GEMMs (cuBLAS nvjet/xmma/cutlass, FALQON's melded GEMM)
                and the one unconverted linear, the LM head
  quantize      amax, scale, fp8 cast, fp8 transpose, NF4/fp8 dequantize
  attention     the fused attention kernels (flash, memory-efficient, cuDNN SDPA)
  optimizer     AdamW's multi-tensor (foreach / fused) kernels
  proxy_update  FALQON's merge kernels and the top-k that picks the rows
  elementwise   everything elementwise or a reduction: norms, activations, residual adds, softmax/loss, copies, fills
  other         the rest (named, so a new class can be split off later)

Floor of one step, ms (e2e_floor_ms): the converted linears at the roofline of their step_cost (GEMM FLOPs at the
measured GEMM peak of their precision + the bytes their quantization, adapter update and proxy update must move at
the measured copy bandwidth; falqon_bench.measure.roofline), plus the LM head's two bf16 GEMMs (forward, dX) at the bf16
peak, plus the measured time of the classes that are neither (attention, elementwise, optimizer, other). The
linears' step_cost already counts an SGD-sized update of the adapters, a few hundred MB on LLaMA-7B, so the
optimizer is counted twice by that much (< 0.1 ms on an H200).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

STEP_CLASSES = ("gemm", "quantize", "attention", "optimizer", "proxy_update", "elementwise", "other")
# measured classes the linears' roofline does not cover
REST_CLASSES = ("attention", "elementwise", "optimizer", "other")

_PROXY = re.compile(r"merge_rows|proxy_update|topk|radix_?select|gathertopk")
_OPTIMIZER = re.compile(r"multi_tensor_apply|foreach|adam|fused_?optim")
_ATTENTION = re.compile(r"flash|fmha|sdpa|attention|attn")
_GEMM = re.compile(
    r"nvjet|xmma|cutlass|cublas|gemm|s16816|s1688|matmul|melded|scaled_mm|(?:^|_)(?:mm|addmm|bmm)(?:_|$)"
)
_INDUCTOR_POINTWISE = re.compile(r"triton_(?:poi|red|per)_")
_QUANTIZE = re.compile(r"quant|amax|abs_?max|cast_tensorwise|transpose_bytes|transpose_fp8|float8|fp8|e4m3|e5m2|hadamard|rotat|nf4")
_ELEMENTWISE = re.compile(
    r"elementwise|reduce|copy|fill|memset|memcpy|triton_(?:poi|red|per)_|vectorized|unrolled|index|scatter|gather"
    r"|where|softmax|norm|cat_|sort|nll|loss|embedding|silu|gelu|mul|add|pow|rsqrt|mean|sum|cunn_|arange|clamp"
)


def classify_kernel(name: str) -> str:
    """The class (one of STEP_CLASSES) of one GPU kernel of a whole step, by its name (case-insensitive)."""
    lname = (name or "").lower()
    if _PROXY.search(lname):
        return "proxy_update"
    if _OPTIMIZER.search(lname):
        return "optimizer"
    if _ATTENTION.search(lname):
        return "attention"
    if _INDUCTOR_POINTWISE.match(lname):  # fused by inductor: named after its ops, never a GEMM or attention
        return "quantize" if re.search(r"amax|abs_max|float8|fp8|e4m3|e5m2|to_copy_clamp|clamp_.*to_copy", lname) else "elementwise"
    if _GEMM.search(lname):
        return "gemm"
    if _QUANTIZE.search(lname):
        return "quantize"
    if _ELEMENTWISE.search(lname):
        return "elementwise"
    return "other"


def kernel_class_ms(kernels: Iterable[tuple[str, float]], steps: int) -> dict[str, float]:
    """ms per step of each class (every class present, 0.0 when none ran) from (kernel name, duration us) pairs
    profiled over `steps` steps."""
    if steps <= 0:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = dict.fromkeys(STEP_CLASSES, 0.0)
    for name, us in kernels:
        out[classify_kernel(name)] += us / 1e3 / steps
    return out


def llama_linear_shapes(config: Any) -> list[tuple[str, int, int]]:
    """(name, K, N) of every linear a method converts in one decoder block of a LLaMA config (K -> N). The query
    width is heads x head_dim, which a config may set apart from the hidden size (Gemma-7B: 16 x 256 on 3072);
    a fused projection (Phi-3's qkv_proj, gate_up_proj) does the same work as these split ones."""
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    q, kv = heads * head_dim, int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return [("q_proj", hidden, q), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", q, hidden),
            ("gate_proj", hidden, inter), ("up_proj", hidden, inter), ("down_proj", inter, hidden)]


def lm_head_floor_ms(config: Any, tokens: int, peaks: dict[str, Any]) -> float | None:
    """The LM head's frozen bf16 GEMMs (forward and dX: 2 x 2 M H V FLOPs) at the measured bf16 peak, ms."""
    tflops = peaks.get("bf16_tflops")
    if not tflops:
        return None
    flops = 4.0 * tokens * int(config.hidden_size) * int(config.vocab_size)
    return flops / (tflops * 1e12) * 1e3


def e2e_floor_ms(method: Any, config: Any, rank: int, tokens: int, peaks: dict[str, Any] | None,
                 classes_ms: dict[str, float] | None, options: dict[str, Any] | None = None) -> dict[str, float] | None:
    """{'linears', 'lm_head', 'measured_rest', 'total'} in ms per step (module docstring), or None without peaks,
    without a measured class split, or where a converted linear's floor cannot be computed (a peak not measured).

    tokens: the tokens of one process's step (M of every linear); options: the method's options (step_cost's).
    """
    from falqon_bench.measure.roofline import floor_ms

    if not peaks or classes_ms is None:
        return None
    linears = 0.0
    for _, k_in, n_out in llama_linear_shapes(config):
        one = floor_ms(method.step_cost(k_in, n_out, rank, tokens, options or {}), peaks)
        if one is None:
            return None
        linears += one * int(config.num_hidden_layers)
    head = lm_head_floor_ms(config, tokens, peaks)
    if head is None:
        return None
    rest = sum(classes_ms.get(c, 0.0) for c in REST_CLASSES)
    return {"linears": linears, "lm_head": head, "measured_rest": rest, "total": linears + head + rest}
