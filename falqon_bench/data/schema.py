"""The stable shape of a results file, shared by the runner (writer) and report/compare (readers).

points.jsonl holds one JSON object per finished point. REQUIRED_KEYS are always present (value may be
null, e.g. gpu_ms on a CPU run or on an error row); their names and meanings never change within a
SCHEMA_VERSION. Units: every `*_ms` is milliseconds per training step of one layer; bytes are bytes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

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

# e2e points (suite kind "e2e": a whole model's fine-tuning step; falqon_bench.measure.e2e_step) give the required keys
# these meanings: layer = the model's name, K / N = its hidden / intermediate size, tokens = tokens per optimizer
# step (all ranks), compile = mode "compile", wall_ms = median wall time of one whole step (synchronized),
# gpu_ms = profiler GPU kernel time per step ('profiler' gpu_timing; null on CPU), peak_mem_bytes = peak device
# memory of the whole run (model, optimizer, activations). They add these keys (null when not measured):
E2E_KEYS: dict[str, str] = {
    "mode": "'eager', 'compile' (torch.compile of the model) or 'cuda_graph' (the whole step in one CUDA graph)",
    "tokens_per_s": "tokens per second over all ranks, from the median step wall time",
    "host_ms": "median host time to issue one step (until the Python call returns, before synchronizing), ms",
    "split_ms": "median GPU ms per phase {forward, backward, optimizer, post_step} from CUDA events (eager, compile)",
    "gpu_busy": "profiler kernel time / wall time over profile_steps steps (1 = the GPU never idles)",
    "kernel_launches": "GPU kernels per step seen by the profiler",
    "kernel_class_ms": "profiler kernel ms per step by class {gemm, quantize, attention, optimizer, proxy_update, elementwise, other}",
    "floor_parts_ms": "floor of the step, ms: {linears (roofline), lm_head (roofline), measured_rest, total = floor_ms}",
    "convert_s": "seconds to convert the model to the method (FALQON: its SVD init)",
    "liger_patches": "liger-kernel patches applied to the model (null without liger; compiled modes leave RoPE out)",
    "loss_per_step": "training loss of every step, warm-up included (mean over ranks)",
    "loss_first": "loss of the first step",
    "loss_last": "loss of the last step",
    "world_size": "processes (GPUs) of the run",
    "backend": "torch.distributed backend, or 'none'",
}

# Keys every runner writes (null until measured) that readers do not require: files written before a key
# existed lack it. Adding a field to every results row is one line here (new_row fills it with null).
ROW_KEYS: dict[str, str] = {
    "per_block": "how many of this layer one transformer block holds (1 for whole models and kernels)",
    "gpu_p10_ms": "10th percentile of gpu_samples_ms", "gpu_p90_ms": "90th percentile of gpu_samples_ms",
    "wall_p10_ms": "10th percentile of wall_samples_ms", "wall_p90_ms": "90th percentile of wall_samples_ms",
    "kernels": "profiled kernels of one step (name, category, ms), at most 40",
    "kernel_total_ms": "profiler kernel time of one step, ms",
    "pct_of_floor": "floor_ms as a percent of gpu_ms (100 = at the roofline)",
    "flops": "FLOPs per step by dtype class (layers) or of the GEMM (kernels)",
    "quant_bytes": "bytes the step's quantize kernels must move",
    "memory": "bytes the method keeps per layer, by part (Method.memory_bytes)",
    "clocks_before": "GPU clocks, temperature and throttle reasons before the timed samples",
    "clocks_after": "the same after the timed samples",
    "clock_dropped": "whether the SM clock fell between clocks_before and clocks_after",
    "started_at": "UTC time the point started (ISO 8601)",
    "duration_s": "seconds the point took, building and timing included",
    "worker_pid": "process id of the process that measured the point",
    "error_type": "short class of a failure ('unavailable', 'timeout', an exception name); null when ok",
}

BREAKDOWN_CATEGORIES = ("quantize", "gemm_fp8", "gemm_bf16", "lora_gemm", "elementwise", "other")


@dataclass(frozen=True)
class Point:
    """What makes two measurements the same benchmark: the identity of a point, listed once.

    Points travel as plain dicts (JSON to worker processes, lines of points.jsonl): `as_dict` is the
    point a suite kind expands to, with `point_id` and any kind-specific extras (not part of the id).
    Shapes: the layer is K x N (input x output features), `tokens` rows M of the activation.
    """

    suite: str
    method: str
    layer: str
    K: int
    N: int
    rank: int
    tokens: int
    compile: bool
    cache: str
    dtype: str
    options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_KEYS}

    @property
    def point_id(self) -> str:
        return point_id(self.identity())

    def as_dict(self, **extras: Any) -> dict[str, Any]:
        """The point as the runner sends it: identity keys, point_id, then `extras` (kind, per_block, ...)."""
        return {**self.identity(), "point_id": self.point_id, **extras}


IDENTITY_KEYS = tuple(f.name for f in fields(Point))


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


def _bare_ok(text: str) -> bool:
    """A word that reads as nothing else: not a number, true/false/null, nor holding ',', '=', brackets, quotes."""
    if not _BARE.fullmatch(text) or text in ("true", "false", "null"):
        return False
    try:
        float(text)  # inf, nan, infinity
    except ValueError:
        return True
    return False


def _compact(value: Any) -> str:
    """An option value as short text: true/false, numbers as Python prints them, a plain word bare, any other
    string JSON-quoted (so "1" is not 1, nor "a,b=2" two options), else compact JSON; unicode as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and _bare_ok(value):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def option_text(options: Any) -> str:
    """'key=value,...' (sorted keys, compact values) of a point's method options; '' for none. Distinct option
    sets give distinct texts (odd keys and string values are quoted)."""
    if isinstance(options, dict):
        return ",".join(f"{_compact(str(k))}={_compact(options[k])}" for k in sorted(options))
    return _compact(options) if options else ""


def option_set_label(method: str, options: Any) -> str:
    """'method[key=value,...]' for a point run with method options, else 'method': how figures, tables and the
    gate name one of several option sets of a method."""
    text = option_text(options)
    return f"{method}[{text}]" if text else method


def method_label(point: Mapping[str, Any]) -> str:
    """A point's method as figures, tables and the gate name it, with its option set: a layer point's options are
    its method's (kernels' too); an e2e point keeps its method's under options.method_options (the rest are the
    run's settings); an accuracy point's options are its run's settings (it is named by its label): the bare method."""
    kind, options = point.get("kind", "layers"), point.get("options") or {}
    if kind == "e2e" and isinstance(options, dict):
        return option_set_label(str(point.get("method")), options.get("method_options"))
    return str(point.get("method")) if kind == "accuracy" else option_set_label(str(point.get("method")), options)


def point_id(identity: dict) -> str:
    """A short stable id of a point from its identity keys (order-independent, JSON-canonical)."""
    payload = json.dumps({k: identity.get(k) for k in IDENTITY_KEYS}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def new_row(point: Mapping[str, Any], device: str) -> dict[str, Any]:
    """The one way to start a results row: every REQUIRED_KEYS and ROW_KEYS key, the point's identity and
    point_id, status 'error' until a runner fills the measurements and sets 'ok'. Every runner (layer
    worker, e2e, accuracy, kernel micro-benchmarks) starts its rows here."""
    row: dict[str, Any] = {k: None for k in (*REQUIRED_KEYS, *ROW_KEYS)}
    row.update({k: point.get(k) for k in IDENTITY_KEYS})
    row.update(
        point_id=point["point_id"], per_block=point.get("per_block", 1), device=device, status="error",
        gpu_samples_ms=[], wall_samples_ms=[], gpu_timing="none", worker_pid=os.getpid(),
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
    )
    return row


def error_row(point: Mapping[str, Any], device: str, error_type: str, error: str) -> dict[str, Any]:
    """A finished error row (status 'error') for a point that produced no measurement."""
    row = new_row(point, device)
    row.update(error_type=error_type, error=error, duration_s=0.0)
    return row


# ---------------------------------------------------------------- row type check (readers)

_SHAPE_INT = ("K", "N", "rank", "tokens")  # kernel micro-benchmark rows write 0 for rank and tokens (not applicable)
_NON_NEGATIVE_NUMBER = ("gpu_ms", "wall_ms", "floor_ms", "peak_mem_bytes")
_SAMPLE_LISTS = ("gpu_samples_ms", "wall_samples_ms")
_TEXT = ("point_id", "cache", "device", "error", "gpu_timing")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    import math

    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def row_problem(row: object, shape_required: bool = False) -> str | None:
    """Why `row` is not a SCHEMA_VERSION results row, or None when it is: a phrase that follows "point 3",
    such as "has `rank` = 'sixteen' (str); allowed: an integer >= 0 or null".

    shape_required (the report, which computes with them): K, N, rank, tokens must be integers and
    `compile` true/false, not null.

    Every REQUIRED_KEY must be present; `method`, `layer` and `status` are non-empty text (any status
    but 'ok' is a failed point);
    K, N, rank, tokens are integers >= 0 (0 or null: not applicable, as in kernel rows); times (ms) and bytes are finite numbers >= 0
    or null; sample lists hold finite numbers; kernel_ms maps category -> ms; `compile` is a bool.
    A `schema` key in a row, when present, must equal SCHEMA_VERSION.
    """
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object (one point per line)"
    if "schema" in row and row["schema"] != SCHEMA_VERSION:
        return f"has `schema` = {row['schema']!r}: a row of another schema version; this reader knows version {SCHEMA_VERSION}"
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        return f"lacks key(s) {', '.join(f'`{k}`' for k in missing)}; every row has {', '.join(REQUIRED_KEYS)}"

    def bad(key: str, allowed: str) -> str:
        return f"has `{key}` = {row[key]!r} ({type(row[key]).__name__}); allowed: {allowed}"

    for key in ("method", "layer", "status"):  # a status other than 'ok' reads as a failed point
        if not isinstance(row[key], str) or not row[key]:
            return bad(key, "a non-empty string" + (" ('ok' or 'error')" if key == "status" else ""))
    for key in _TEXT:
        if row[key] is not None and not isinstance(row[key], str):
            return bad(key, "a string or null")
    or_null = "" if shape_required else " or null"
    for key in _SHAPE_INT:
        if (row[key] is not None or shape_required) and not (_is_int(row[key]) and row[key] >= 0):
            return bad(key, f"an integer >= 0 (0: not applicable){or_null}")
    if (row["compile"] is not None or shape_required) and not isinstance(row["compile"], bool):
        return bad("compile", f"true, false{or_null}")
    for key in _NON_NEGATIVE_NUMBER:
        if row[key] is not None and not (_is_number(row[key]) and row[key] >= 0):
            return bad(key, "a finite number >= 0 or null")
    for key in _SAMPLE_LISTS:
        value = row[key]
        if value is not None and not (isinstance(value, list) and all(_is_number(v) and v >= 0 for v in value)):
            return bad(key, "a list of finite numbers >= 0 (ms) or null")
    kernel = row["kernel_ms"]
    if kernel is not None and not (isinstance(kernel, dict) and all(isinstance(k, str) and (v is None or _is_number(v)) for k, v in kernel.items())):
        return bad("kernel_ms", "an object category -> ms (numbers) or null")
    return None
