"""Where the time of one training step goes: torch.profiler time grouped into BREAKDOWN_CATEGORIES.

On a GPU every device kernel is attributed to its innermost launching op (the CPU event whose
`FunctionEvent.kernels` holds it), because cuBLAS names both bf16 and fp8 GEMMs `nvjet_*`: only the
op (`aten::_scaled_mm` vs `aten::mm`) and its recorded input shapes and dtypes tell them apart. On a
CPU there are no device kernels, so each op's self CPU time is classified the same way; that gives
the CPU smoke suite a breakdown too (of host time, not GPU time).

Units: every `*_ms` is milliseconds per step (profiled time / steps).

Known limit of shape-based LoRA detection: a GEMM is `lora_gemm` when one of its matrix dimensions
equals the rank, so a suite whose `tokens` (M) equals the rank would mark every GEMM as LoRA.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch

from falqon_core.cublaslt import PROFILER_OP as CUBLASLT_FP8_GEMM_OP
from falqon_bench.data.derived import residual  # noqa: F401  (re-exported: readers import it from falqon_bench.data.derived)
from falqon_bench.data.schema import BREAKDOWN_CATEGORIES

STEP_LABEL = "falqon_bench.profile_step"
MAX_KERNEL_ROWS = 40

# --- op families (aten names without the overload) -------------------------------------------------
# CUBLASLT_FP8_GEMM_OP: the op falqon_core.cublaslt runs its own cuBLASLt fp8 GEMM call in while profiling
FP8_GEMM_OPS = frozenset({"aten::_scaled_mm", "aten::_scaled_mm_v2", "aten::_scaled_grouped_mm", CUBLASLT_FP8_GEMM_OP})
GEMM_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::_addmm_activation",
        "aten::bmm",
        "aten::baddbmm",
        "aten::addbmm",
        "aten::matmul",
        "aten::linear",
        "aten::mv",
        "aten::addmv",
        "aten::addmm_",
        "aten::baddbmm_",
        "aten::addbmm_",
        "aten::addmv_",
    }
)
# operands that are matrices, per op: (first index, last index exclusive); others: every >=2-D input
_MATRIX_OPERANDS = {
    "aten::mm": (0, 2),
    "aten::bmm": (0, 2),
    "aten::matmul": (0, 2),
    "aten::_scaled_mm": (0, 2),
    "aten::_scaled_mm_v2": (0, 2),
    "aten::_scaled_grouped_mm": (0, 2),
    "aten::addmm": (1, 3),
    "aten::addmm_": (1, 3),
    "aten::_addmm_activation": (1, 3),
    "aten::baddbmm": (1, 3),
    "aten::baddbmm_": (1, 3),
    "aten::addbmm": (1, 3),
}
# casts: a float8 dtype on one side and a wider one on the other is a quantize (or dequantize)
CAST_OPS = frozenset({"aten::copy_", "aten::_to_copy", "aten::to"})
# ops that compute an amax, a scale or a clamp; they count as `quantize` when they feed a float8 cast
# (views and allocations are listed so they do not break a run of such ops)
QUANT_PREP_OPS = CAST_OPS | frozenset(
    {
        "aten::abs",
        "aten::amax",
        "aten::max",
        "aten::min",
        "aten::aminmax",
        "aten::maximum",
        "aten::minimum",
        "aten::clamp",
        "aten::clamp_",
        "aten::clamp_min",
        "aten::clamp_max",
        "aten::clip",
        "aten::div",
        "aten::div_",
        "aten::mul",
        "aten::mul_",
        "aten::reciprocal",
        "aten::where",
        "aten::round",
        "aten::nan_to_num",
        "aten::clone",
        "aten::contiguous",
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::fill_",
        "aten::scalar_tensor",
        "aten::lift_fresh",
        "aten::detach",
        "aten::t",
        "aten::transpose",
        "aten::permute",
        "aten::view",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::expand",
        "aten::as_strided",
        "aten::squeeze",
        "aten::unsqueeze",
        "aten::resolve_conj",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::result_type",
    }
)
COPY_FILL_OPS = frozenset(
    {
        "aten::copy_",
        "aten::_to_copy",
        "aten::to",
        "aten::clone",
        "aten::contiguous",
        "aten::fill_",
        "aten::zero_",
        "aten::zeros",
        "aten::zeros_like",
        "aten::ones",
        "aten::ones_like",
        "aten::full",
        "aten::full_like",
        "aten::cat",
        "aten::stack",
        "aten::index_add_",
        "aten::index_copy_",
        "aten::index_put_",
        "aten::index_select",
        "aten::scatter_add_",
        "aten::topk",
        "aten::sort",
        "aten::argsort",
        "aten::softmax",
        "aten::_softmax",
        "aten::cumsum",
    }
)

# --- kernel-name patterns (Triton, inductor, cuBLAS/CUTLASS, CUDA runtime) -------------------------
_TRITON_GEMM_NAME = re.compile(r"matmul|melded|gemm|scaled_mm|(?:^|_)(?:mm|addmm|bmm)(?:_|$)")
_CUBLAS_GEMM_NAME = re.compile(r"nvjet|cutlass|xmma|cublas|s16816|s1688|^(?:sm\d+|ampere|hopper|volta|turing)_\w*gemm")
_FP8_NAME_HINT = re.compile(r"(?:^|[^a-z0-9])f8|fp8|float8|e4m3|e5m2|scaled_mm|melded")
# rotate: HALO's Hadamard rotation before the cast; merge_rows/proxy_update: FALQON's re-cast of merged rows
_QUANT_NAME = re.compile(r"quant|amax|abs_max|cast|hadamard|rotat|merge_rows|proxy_update|float8|fp8|e4m3|e5m2")
_ELEMENTWISE_NAME = re.compile(
    r"elementwise|reduce|copy|fill|memset|memcpy|triton_(?:poi|red|per)_|vectorized|unrolled|foreach"
    r"|index|scatter|gather|where|softmax|norm|cat_|sort|topk"
)
# inductor's fused pointwise/reduction kernels are named after the ops they fuse ("..._fused_addmm_1"), never GEMMs
_INDUCTOR_POINTWISE = re.compile(r"triton_(?:poi|red|per)_")
# CPU records that stand for one kernel (inductor names them after it)
_KERNEL_RECORD = re.compile(r"^triton_|^cpp_fused|kernel")
_AUTOGRAD_NODE = re.compile(r"^autograd::|backward\d*$")
_RUNTIME_EVENT = re.compile(r"^(?:cuda|cu[A-Z]|hip)")


def _base_op(op: str | None) -> str:
    """'aten::mm.default' -> 'aten::mm'; None -> ''."""
    if not op:
        return ""
    return op.split(".", 1)[0] if op.startswith("aten::") else op


def _norm_dtypes(dtypes: Iterable[Any] | None) -> list[str]:
    """Profiler dtype strings ('c10::BFloat16', 'float') or torch dtypes, lower-cased, tensors only."""
    out = []
    for d in dtypes or ():
        s = str(d).lower().replace("c10::", "").replace("torch.", "")
        if s and s not in ("scalar", "scalarlist", "tensorlist", "genericlist", "none"):
            out.append(s)
    return out


def _is_fp8(dtype: str) -> bool:
    return "float8" in dtype


def _is_wide_float(dtype: str) -> bool:
    return dtype in ("float", "double", "half", "bfloat16", "float32", "float16", "float64")


@functools.lru_cache(maxsize=512)
def _aten_tags(op: str) -> frozenset[str]:
    """Tags ('pointwise', 'reduction', ...) over every overload of an aten op; empty when unknown."""
    if not op.startswith("aten::"):
        return frozenset()
    tags: set[str] = set()
    try:
        packet = getattr(torch.ops.aten, op[len("aten::") :])
        for overload in packet.overloads():
            tags |= {t.name for t in getattr(packet, overload).tags}
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(tags)


def _matrix_dims(op: str, shapes: Sequence[Sequence[int]] | None) -> list[int]:
    """The dimensions of a GEMM's matrix operands (last two dims of each; linear: K and the weight's N, K)."""
    shapes = [list(s) for s in (shapes or []) if isinstance(s, (list, tuple))]
    if op == "aten::linear":
        dims = [shapes[0][-1]] if shapes and shapes[0] else []
        if len(shapes) > 1 and len(shapes[1]) == 2:
            dims += shapes[1]
        return dims
    if op in _MATRIX_OPERANDS:
        lo, hi = _MATRIX_OPERANDS[op]
        shapes = shapes[lo:hi]
    return [d for s in shapes if len(s) >= 2 for d in s[-2:]]


def _gemm_precision(name: str, op: str, dtypes: list[str]) -> str | None:
    """'fp8' or 'bf16' when this kernel/op is a GEMM, else None."""
    has_fp8 = any(_is_fp8(d) for d in dtypes)
    if op in FP8_GEMM_OPS:
        return "fp8"
    if op in GEMM_OPS:
        return "fp8" if has_fp8 else "bf16"
    if op.startswith("aten::"):
        return None  # a known non-GEMM aten op: its kernels are not GEMMs
    fp8_hint = has_fp8 or bool(_FP8_NAME_HINT.search(name))
    if _CUBLAS_GEMM_NAME.search(name):
        return "fp8" if fp8_hint else "bf16"
    if _TRITON_GEMM_NAME.search(name) and not _INDUCTOR_POINTWISE.match(name):
        wide_only = bool(dtypes) and all(_is_wide_float(d) for d in dtypes)
        # the Triton GEMMs this suite launches are fp8 ones, unless the recorded dtypes say otherwise
        return "fp8" if fp8_hint or not wide_only else "bf16"
    return None


def _is_quantize(name: str, op: str, dtypes: list[str], feeds_fp8: bool) -> bool:
    has_fp8 = any(_is_fp8(d) for d in dtypes)
    if op in ("aten::amax", "aten::_amax"):
        return True
    if op in ("aten::_to_copy", "aten::to") and has_fp8:
        return True  # its input is float8: a dequantizing cast
    if op == "aten::copy_" and has_fp8 and any(_is_wide_float(d) for d in dtypes):
        return True
    if feeds_fp8 and op in QUANT_PREP_OPS:
        return True
    if op.startswith("aten::"):
        return False
    if _QUANT_NAME.search(name):
        return True
    if "clamp" in name and "to_copy" in name:  # inductor: fused clamp + cast
        return True
    return "to_copy" in name and has_fp8


def _is_elementwise(name: str, op: str) -> bool:
    if op.startswith("aten::"):
        if op in COPY_FILL_OPS or op.startswith("aten::_foreach_"):
            return True
        if _aten_tags(op) & {"pointwise", "reduction"}:
            return True
    return bool(_ELEMENTWISE_NAME.search(name))


def classify(
    name: str,
    op: str | None,
    shapes: Sequence[Sequence[int]] | None,
    dtypes: Sequence[Any] | None,
    rank: int | None,
    feeds_fp8: bool = False,
) -> str:
    """Category (one of BREAKDOWN_CATEGORIES) of one kernel, or of one op's self time on CPU.

    name: kernel name (GPU) or op name (CPU). op: the innermost launching op ('aten::_scaled_mm'),
    or None for a kernel with no op around it. shapes/dtypes: that op's recorded inputs.
    rank: the adapter rank; a GEMM with a matrix dimension equal to it is `lora_gemm`.
    feeds_fp8: the op is part of a run of amax/scale/clamp ops that ends in a float8 cast.
    """
    lname = (name or "").lower()
    base = _base_op(op)
    dts = _norm_dtypes(dtypes)
    if _AUTOGRAD_NODE.search(lname):
        return "other"  # CPU self time of autograd engine glue (a device kernel never has such a name)
    precision = _gemm_precision(lname, base, dts)
    if precision is not None:
        # shapes are GEMM operands only for an aten GEMM or a kernel's own record (inductor), not for
        # e.g. an autograd.Function around a melded GEMM whose inputs include the rank-r adapter
        operands = base in GEMM_OPS or base in FP8_GEMM_OPS or base.lower() == lname
        if rank and operands and rank in _matrix_dims(base, shapes):
            return "lora_gemm"
        return f"gemm_{precision}"
    if _is_quantize(lname, base, dts, feeds_fp8):
        return "quantize"
    if _is_elementwise(lname, base):
        return "elementwise"
    return "other"


# --- profiling ---------------------------------------------------------------------------------------


def _event_dtypes(evt: Any, fallback: dict[int, list[str]]) -> list[str]:
    dtypes = getattr(evt, "input_dtypes", None)
    if dtypes is None:
        dtypes = fallback.get(evt.id, [])
    return list(dtypes or [])


def _dtypes_by_correlation(prof: Any) -> dict[int, list[str]]:
    """Older torch keeps input dtypes only on the raw kineto events; map correlation id -> dtypes."""
    try:
        return {k.correlation_id(): list(k.dtypes()) for k in prof.profiler.kineto_results.events()}
    except (AttributeError, RuntimeError):
        return {}


def _shapes(evt: Any) -> list[list[int]]:
    return [list(s) if isinstance(s, (list, tuple)) else [] for s in (evt.input_shapes or [])]


def _subtree(evt: Any) -> Iterable[Any]:
    stack = [evt]
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def _is_fp8_cast(evt: Any, dtypes: list[str]) -> bool:
    dts = _norm_dtypes(dtypes)
    return _base_op(evt.name) == "aten::copy_" and any(map(_is_fp8, dts)) and any(map(_is_wide_float, dts))


def _quantization_event_ids(cpu_events: list[Any], dtypes_of: Callable[[Any], list[str]]) -> set[int]:
    """Ids of events that belong to a quantization: each float8 cast, its enclosing cast ops, and the
    run of amax/scale/clamp ops just before it among its siblings (with their subtrees)."""
    marked: set[int] = set()
    top_level = sorted((e for e in cpu_events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    for cast in (e for e in cpu_events if _is_fp8_cast(e, dtypes_of(e))):
        top = cast
        while top.cpu_parent is not None and _base_op(top.cpu_parent.name) in CAST_OPS:
            top = top.cpu_parent
        marked.update(id(e) for e in _subtree(top))
        siblings = sorted(top.cpu_parent.cpu_children, key=lambda e: e.time_range.start) if top.cpu_parent else top_level
        j = next((i for i, s in enumerate(siblings) if s is top), 0) - 1
        while j >= 0 and _base_op(siblings[j].name) in QUANT_PREP_OPS:
            marked.update(id(e) for e in _subtree(siblings[j]))
            j -= 1
    return marked


def _fp8_gemm_inside(evt: Any) -> Any | None:
    """For a GEMM op on a tensor subclass (torchao Float8 tensors dispatch aten::mm to _scaled_mm)."""
    for e in _subtree(evt):
        if e is not evt and _base_op(e.name) in FP8_GEMM_OPS:
            return e
    return None


def _fp8_gemm_around(evt: Any) -> Any | None:
    """The enclosing aten::_scaled_mm of an op (its CPU fallback runs aten::mm; helpers run inside it)."""
    parent = evt.cpu_parent
    while parent is not None:
        if _base_op(parent.name) in FP8_GEMM_OPS:
            return parent
        parent = parent.cpu_parent
    return None


CUPTI_BUFFER_EVENT = "Activity Buffer Request"


def _launching_op(evt: Any) -> Any:
    """Skip CUDA runtime/driver events (cudaLaunchKernel) up to the op that made the launch."""
    while evt.cpu_parent is not None and _RUNTIME_EVENT.match(evt.name):
        evt = evt.cpu_parent
    return evt


def _is_device_event(evt: Any) -> bool:
    return str(getattr(evt, "device_type", "")).split(".")[-1] not in ("CPU", "")


def _unique_device_kernels(events: list[Any]) -> list[Any]:
    """Device kernel events of the profile, each (name, start, end) once."""
    seen: dict[tuple, Any] = {}
    for e in events:
        if _is_device_event(e) and e.name != STEP_LABEL and not getattr(e, "is_user_annotation", False):
            seen.setdefault((e.name, e.time_range.start, e.time_range.end), e)
    return list(seen.values())


def _launchers_by_correlation(cpu_events: list[Any]) -> dict[int, Any]:
    """Correlation id -> the host op that launched kernels under it (CUPTI pseudo-ops excluded)."""
    out: dict[int, Any] = {}
    for e in sorted(cpu_events, key=lambda ev: ev.time_range.start):
        if e.name != CUPTI_BUFFER_EVENT and getattr(e, "linked_correlation_id", 0) == 0:
            out.setdefault(e.id, e)
    return out


def _collect_rows(prof: Any, rank: int | None, on_gpu: bool) -> tuple[list[dict[str, Any]], float]:
    """Classified (name, op, shapes, dtypes, category, us) rows over all profiled steps, and the total us."""
    events = list(prof.events())
    fallback = _dtypes_by_correlation(prof)
    cpu_events = [e for e in events if not _is_device_event(e) and not getattr(e, "is_async", False)]
    roots = [e for e in cpu_events if e.name == STEP_LABEL]
    if on_gpu:
        # backward ops run on the autograd engine's device thread, outside the step label's subtree;
        # the profile holds nothing but the labelled steps, so every op in it belongs to a step
        step_events = cpu_events
    else:
        in_step = {id(e) for r in roots for e in _subtree(r)}
        step_events = [e for e in cpu_events if id(e) in in_step]
    dtypes_of = functools.partial(_event_dtypes, fallback=fallback)
    quant_ids = _quantization_event_ids(step_events, dtypes_of)

    def row(name: str, evt: Any, us: float) -> dict[str, Any]:
        if evt is None:  # a kernel with no host op recorded (e.g. launched from the autograd thread): by name
            return {"name": name, "op": None, "input_shapes": [], "input_dtypes": [],
                    "category": classify(name, None, [], [], rank), "us": us}
        op_evt = _fp8_gemm_around(evt) or evt
        if _base_op(evt.name) in GEMM_OPS:
            op_evt = _fp8_gemm_inside(evt) or op_evt
        shapes, dtypes = _shapes(op_evt), dtypes_of(op_evt)
        if not on_gpu and not evt.name.startswith("aten::") and not _KERNEL_RECORD.search(evt.name.lower()):
            category = "other"  # host time of Python-level records (autograd.Function, user ranges)
        else:
            category = classify(name, op_evt.name, shapes, dtypes, rank, feeds_fp8=id(evt) in quant_ids)
        return {"name": name, "op": op_evt.name, "input_shapes": shapes, "input_dtypes": dtypes, "category": category, "us": us}

    rows: list[dict[str, Any]] = []
    if on_gpu:
        kernels = _unique_device_kernels(events)
        launcher = _launchers_by_correlation(step_events)
        attributed = 0.0
        if all(hasattr(k, "linked_correlation_id") for k in kernels):
            # each device kernel once, filed under the op whose correlation id it carries; an id that
            # CUPTI's "Activity Buffer Request" pseudo-op shares with a real op must not count it twice
            for k in kernels:
                op = launcher.get(k.linked_correlation_id)
                us = float(k.time_range.elapsed_us())
                rows.append(row(k.name, None if op is None else _launching_op(op), us))
                attributed += us
        else:  # a torch without correlation ids on device events: the ops' kernel lists, pseudo-op skipped
            for e in step_events:
                if e.name == CUPTI_BUFFER_EVENT:
                    continue
                for k in e.kernels:
                    if k.name != STEP_LABEL:
                        rows.append(row(k.name, _launching_op(e), float(k.duration)))
                        attributed += float(k.duration)
        device_total = sum(float(k.time_range.elapsed_us()) for k in kernels)
        if device_total > attributed:  # kernels the profiler could not link to a launching op
            rows.append({"name": "(unattributed device time)", "op": None, "input_shapes": [], "input_dtypes": [], "category": "other", "us": device_total - attributed})
        total_us = max(device_total, attributed)
    else:
        for e in step_events:
            if e.name != STEP_LABEL and e.self_cpu_time_total > 0:
                rows.append(row(e.name, e, float(e.self_cpu_time_total)))
        total_us = sum(r.cpu_time_total for r in roots)
    return rows, total_us


def _aggregate(rows: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Rows with the same (name, op, shapes, dtypes, category) merged; ms and count per step, longest first."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["name"], r["op"], repr(r["input_shapes"]), repr(r["input_dtypes"]), r["category"])
        g = groups.setdefault(key, {**{k: r[k] for k in ("name", "op", "input_shapes", "input_dtypes", "category")}, "us": 0.0, "n": 0})
        g["us"] += r["us"]
        g["n"] += 1
    out = [
        {**{k: g[k] for k in ("name", "op", "input_shapes", "input_dtypes", "category")}, "ms": g["us"] / 1e3 / steps, "count": g["n"] / steps}
        for g in groups.values()
    ]
    return sorted(out, key=lambda r: r["ms"], reverse=True)


def summarize(rows: list[dict[str, Any]], total_us: float, steps: int) -> dict[str, Any]:
    """kernel_ms per category (every category present, 0.0 when empty), top kernels, total per step."""
    kernel_ms: dict[str, float] = defaultdict(float)
    for r in rows:
        kernel_ms[r["category"]] += r["us"] / 1e3 / steps
    return {
        "kernel_ms": {c: float(kernel_ms.get(c, 0.0)) for c in BREAKDOWN_CATEGORIES},
        "kernels": _aggregate(rows, steps)[:MAX_KERNEL_ROWS],
        "total_ms": total_us / 1e3 / steps,
    }


def profile_step(step: Callable[[], Any], rank: int | None, device: torch.device | str, steps: int = 3) -> dict[str, Any]:
    """Profile `steps` calls of `step` (one fwd+bwd+update) and group the time into categories.

    Returns {"kernel_ms": {category: ms per step}, "kernels": [top 40 rows by ms: name, op,
    input_shapes, input_dtypes, category, ms, count (per step)], "total_ms": ms per step}.
    GPU: total_ms is device kernel time per step and the categories sum to it. CPU: total_ms is the
    step's host time; categories hold the ops' self CPU time (Python glue between ops is not in them).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    step()  # one untimed call so lazy init and autotuning stay out of the profile
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                step()
        if on_gpu:
            torch.cuda.synchronize(device)
    rows, total_us = _collect_rows(prof, rank, on_gpu)
    return summarize(rows, total_us, steps)
