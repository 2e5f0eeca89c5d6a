"""The stable shape of a results file, shared by the runner (writer) and report/compare (readers).

points.jsonl holds one JSON object per finished point. REQUIRED_KEYS are always present (value may be
null, e.g. gpu_ms on a CPU run or on an error row); their names and meanings never change within a
SCHEMA_VERSION. Units: every `*_ms` is milliseconds per training step of one layer; bytes are bytes.
"""

from __future__ import annotations

import hashlib
import json

SCHEMA_VERSION = 1

# key -> meaning (also rendered into docs and checked by tests)
REQUIRED_KEYS: dict[str, str] = {
    "point_id": "stable hash of the point's identity keys; --resume skips ids already in the file",
    "method": "registered method name (falqon_core.methods)",
    "layer": "named shape, e.g. 'llama-7b.attn', or 'custom.KxN'",
    "K": "input features of the linear layer",
    "N": "output features of the linear layer",
    "rank": "adapter rank r",
    "tokens": "rows M of the activation (batch x sequence)",
    "compile": "whether the converted layer ran under torch.compile",
    "cache": "'warm' or 'cold' (L2 flushed before every sample)",
    "device": "GPU name as the driver reports it, or 'CPU'",
    "status": "'ok' or 'error'",
    "error": "one-line error for status 'error' (null when ok)",
    "gpu_ms": "median GPU time of one fwd+bwd+update step from CUDA-graph replay (null on CPU)",
    "gpu_samples_ms": "every GPU-time sample, ms",
    "gpu_timing": "'cudagraph', 'profiler' (capture failed: profiler kernel sum), or 'none' (CPU)",
    "wall_ms": "median eager step time (CUDA events on GPU, perf_counter on CPU), includes launch cost",
    "wall_samples_ms": "every eager sample, ms",
    "kernel_ms": "profiler kernel time of one step by category (quantize, gemm_fp8, gemm_bf16, lora_gemm, elementwise, other)",
    "floor_ms": "roofline floor of the step from measured peaks (null when peaks were not measured)",
    "peak_mem_bytes": "peak device memory allocated during the timed step",
}

IDENTITY_KEYS = ("suite", "method", "layer", "K", "N", "rank", "tokens", "compile", "cache", "dtype", "options")

BREAKDOWN_CATEGORIES = ("quantize", "gemm_fp8", "gemm_bf16", "lora_gemm", "elementwise", "other")


def point_id(identity: dict) -> str:
    """A short stable id of a point from its identity keys (order-independent, JSON-canonical)."""
    payload = json.dumps({k: identity.get(k) for k in IDENTITY_KEYS}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]
