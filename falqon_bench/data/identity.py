"""Is a result row's method and layer a name this project knows? Checked by readers before they show a row.

A results file may come from anyone (a CI artifact, a colleague, a pull request), so its names are data,
not trusted labels. Method and layer names must be identifiers (METHOD_NAME_RE, LAYER_NAME_RE, at most
MAX_NAME_LEN characters) and should be known: a registered method, a named layer shape, a model name of
an e2e run, or 'custom.KxN'; any other identifier is a suite's inline shape {name, K, N} and allowed.
A row that fails is still shown (escaped) with a visible mark, never dropped.

Torch-free on purpose (readers run where torch is absent): KNOWN_METHODS, KNOWN_LAYER_SHAPES and
KNOWN_MODELS are static copies of falqon_core.methods' registry, falqon_bench.suites.layers and
falqon_bench.suites.models, kept in sync by tests/test_report_security.py.
"""

from __future__ import annotations

import re
from typing import Any

MAX_NAME_LEN = 128
METHOD_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
# '/' and '~' for an e2e run whose layer is the path of a local model directory
LAYER_NAME_RE = re.compile(r"[A-Za-z0-9_.\-/~]+")
CUSTOM_LAYER_RE = re.compile(r"custom\.(\d+)x(\d+)")
# the kernel suite (falqon_bench.measure.kernel_bench) names its cases 'kernel.<kernel>.<implementation>'
KERNEL_CASE_RE = re.compile(r"kernel\.[a-z0-9_]+\.(triton|torch|torch_compile|cublas)")

WARNING_SIGN = "⚠"

KNOWN_METHODS = ("bf16_linear", "bf16_lora", "qlora_nf4", "fp8_lora", "fp8_base_lora", "fp6_lora", "halo_lora", "falqon")

# name -> (K, N), from falqon_bench.suites.layers.named_layers()
KNOWN_LAYER_SHAPES: dict[str, tuple[int, int]] = {
    "llama-7b.attn": (4096, 4096), "llama-7b.up": (4096, 11008), "llama-7b.down": (11008, 4096),
    "llama-13b.attn": (5120, 5120), "llama-13b.up": (5120, 13824), "llama-13b.down": (13824, 5120),
    "llama-3-8b.attn": (4096, 4096), "llama-3-8b.kv": (4096, 1024), "llama-3-8b.up": (4096, 14336),
    "llama-3-8b.down": (14336, 4096),
    "mistral-7b.attn": (4096, 4096), "mistral-7b.kv": (4096, 1024), "mistral-7b.up": (4096, 14336),
    "mistral-7b.down": (14336, 4096),
}

# whole models: the layer name of an e2e point (falqon_bench.suites.models.MODEL_NAMES)
KNOWN_MODELS = ("tiny-llama", "small-llama", "llama-7b", "llama-13b", "llama-3-8b", "mistral-7b", "llama-70b")


def is_identifier(name: Any, pattern: re.Pattern = METHOD_NAME_RE) -> bool:
    """True for a str of 1..MAX_NAME_LEN characters that the pattern matches whole."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN and pattern.fullmatch(name) is not None


def method_problem(method: Any) -> str | None:
    """None for a registered method name, else what is wrong ('invalid method name' or 'unknown method')."""
    if not is_identifier(method, METHOD_NAME_RE):
        return "invalid method name"
    if method not in KNOWN_METHODS and not KERNEL_CASE_RE.fullmatch(method):
        return "unknown method"
    return None


def layer_problem(layer: Any, K: Any = None, N: Any = None) -> str | None:
    """None for a known layer whose K and N agree with its name, else what is wrong.

    A named shape ('llama-7b.attn') or 'custom.KxN' must have that K and N; a model name (an e2e point)
    and any other identifier (a suite's inline table {name, K, N} may name its shape freely) pass.
    Points without K/N skip the shape check.
    """
    if not is_identifier(layer, LAYER_NAME_RE):
        return "invalid layer name"
    if layer in KNOWN_MODELS:
        return None
    shape = KNOWN_LAYER_SHAPES.get(layer)
    custom = CUSTOM_LAYER_RE.fullmatch(layer)
    if custom:
        shape = (int(custom.group(1)), int(custom.group(2)))
    if shape is None:
        return None
    if K is not None and N is not None and (K, N) != shape:
        return f"K×N {K}×{N} is not the shape of {layer} ({shape[0]}×{shape[1]})"
    return None


def row_problems(method: Any, layer: Any, K: Any = None, N: Any = None) -> list[str]:
    """Every identity problem of one row, e.g. ['unknown method', 'invalid layer name']; empty when fine."""
    return [p for p in (method_problem(method), layer_problem(layer, K, N)) if p]
