"""Measure points, one results row each: in-process (`measure_point`) or as an isolated worker process.

Worker protocol (`python -m falqon_bench.measure.worker`): the parent writes one JSON object on stdin
    {"points": [point, ...], "context": MeasureContext fields, "modules": [modules defining the methods]}
and reads JSON lines on stdout: {"event": "ready"} once imports are done, {"event": "result", "row": {...}}
per point (in order), {"event": "restart", "reason": ...} when a CUDA error poisoned this process (the
parent starts a fresh worker for the rest), and {"event": "done"}. Anything libraries print goes to
stderr (fd 1 is re-pointed there), which the parent keeps in the run's worker log.

A row starts as falqon_bench.data.schema.new_row (every REQUIRED_KEYS and ROW_KEYS key, with their
meanings there) and adds breakdown_error / capture_error / method_info when there is something to say.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from falqon_bench.measure import envinfo, timing
from falqon_bench.data.schema import new_row

MAX_KERNELS = 40
_POISON = re.compile(r"CUDA error|illegal memory access|device-side assert|CUBLAS_STATUS_EXECUTION_FAILED|unspecified launch failure")


@dataclass
class MeasureContext:
    """How to measure the points of one run (sent to workers as JSON). Times in ms."""

    device: str
    budget_ms: float = 1000.0
    warmup_ms: float = 100.0
    min_samples: int = 10
    profile: bool = True
    peaks: dict[str, Any] | None = None
    run_dir: str | None = None  # the run's results directory (kinds that cache work per run, e.g. a pretrained base)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def one_line(e: BaseException) -> str:
    """'Type: first line of the message' (results rows hold one-line errors)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def record_failure(row: dict[str, Any], e: Exception) -> None:
    """A point's failure as its row's error, the same for every suite kind: `unavailable: <what to install>`
    for MethodUnavailable, else the exception's type and first line. (Ctrl-C is no Exception: it propagates.)"""
    from falqon_core.methods import MethodUnavailable

    if isinstance(e, MethodUnavailable):  # a subclass may name its own kind: fast_stacks.StackUnsupported, "unsupported"
        label = getattr(e, "label", "unavailable")
        row.update(error_type=label, error=f"{label}: {str(e).strip() or type(e).__name__}")
    else:
        row.update(error_type=type(e).__name__, error=one_line(e))


def process_poisoned(row: dict[str, Any]) -> bool:
    """Whether the point left this process unfit for the next point (the worker must be replaced).

    A failed CUDA-graph capture counts: it can leave the CUDA RNG in capture state ("Offset increment
    outside graph capture"), which breaks every later random init in the process.
    """
    if row.get("capture_error"):
        return True
    if row.get("status") != "error" or not row.get("error"):
        return False
    return row.get("error_type") == "AcceleratorError" or bool(_POISON.search(str(row["error"])))


# ---------------------------------------------------------------- adapters to breakdown / roofline


def profile_breakdown(step: Callable[[], object], rank: int, device: torch.device) -> tuple[dict | None, str | None]:
    """falqon_bench.measure.breakdown.profile_step, or (None, why) when it is missing or raises: the point still counts."""
    try:
        from falqon_bench.measure.breakdown import profile_step
    except ImportError as e:
        return None, f"breakdown unavailable: {e}"
    try:
        return profile_step(step, rank=rank, device=device, steps=3), None
    except Exception as e:
        return None, one_line(e)


def roofline_floor(step_cost, peaks: dict | None, gpu_ms: float | None) -> tuple[float | None, float | None, str | None]:
    """(floor_ms, pct_of_floor, error) from falqon_bench.measure.roofline; Nones without peaks or when it raises."""
    if not peaks:
        return None, None, None
    try:
        from falqon_bench.measure import roofline

        floor = roofline.floor_ms(step_cost, peaks)
        if floor is None or not gpu_ms:
            return floor, None, None
        pct = getattr(roofline, "pct_of_floor", None)
        return floor, (pct(gpu_ms, floor) if pct else 100.0 * floor / gpu_ms), None
    except Exception as e:
        return None, None, f"roofline: {one_line(e)}"


def method_info(method, model) -> dict[str, Any] | None:
    """What a method reports about its run (Method.describe, e.g. FALQON's top-k), None when nothing."""
    try:
        return dict(method.describe(model)) or None
    except Exception as e:
        return {"describe_error": one_line(e)}


# ---------------------------------------------------------------- one point


def measure_point(point: dict[str, Any], ctx: MeasureContext) -> dict[str, Any]:
    """Build, time, profile and cost one point; any failure becomes an error row (never raises, except Ctrl-C).

    All of it runs on the point's own CUDA stream (timing.point_stream: compiled steps first run on the
    default stream fail CUDA-graph capture).
    """
    if point.get("kind", "layers") != "layers":  # another suite kind measures its own points (suite.KINDS)
        from falqon_bench.suites.suite import kind_function

        return kind_function(point["kind"], "measure")(point, ctx)
    with timing.point_stream(ctx.device):
        return _measure_point(point, ctx)


def _measure_point(point: dict[str, Any], ctx: MeasureContext) -> dict[str, Any]:
    from falqon_bench.measure.workload import build_workload

    device = torch.device(ctx.device)
    row = new_row(point, envinfo.device_name(device))
    t0 = time.perf_counter()
    workload = None
    try:
        row["clocks_before"] = envinfo.gpu_state(device) if device.type == "cuda" else None
        workload = build_workload(point, device)
        row.update(flops=dict(workload.step_cost.gemm_flops), quant_bytes=workload.step_cost.quant_bytes, memory=workload.memory_bytes)
        flush = timing.l2_flusher(device) if point.get("cache") == "cold" else None
        wall = timing.time_wall(
            workload.step, device=device, warmup_ms=ctx.warmup_ms, budget_ms=ctx.budget_ms, min_samples=ctx.min_samples, flush=flush
        )
        s = timing.summarize(wall)
        row.update(wall_ms=s["median"], wall_p10_ms=s["p10"], wall_p90_ms=s["p90"], wall_samples_ms=wall)
        row["peak_mem_bytes"] = timing.peak_memory_bytes(workload.step, device)

        if device.type == "cuda":
            try:
                gpu = timing.time_cudagraph(
                    workload.step,
                    device=device,
                    warmup_ms=ctx.warmup_ms,
                    budget_ms=ctx.budget_ms,
                    min_samples=ctx.min_samples,
                    cache=point.get("cache", "warm"),
                    flush=flush,
                )
                row["gpu_timing"] = "cudagraph"
            except timing.CaptureError as e:
                gpu, row["gpu_timing"], row["capture_error"] = [], "profiler", str(e)
            row["clocks_after"] = envinfo.gpu_state(device)
            row["clock_dropped"] = envinfo.clock_dropped(row["clocks_before"], row["clocks_after"])
        else:
            gpu = []

        if ctx.profile or row["gpu_timing"] == "profiler":
            breakdown, err = profile_breakdown(workload.step, int(point["rank"]), device)
            if breakdown is not None:
                row["kernel_ms"] = breakdown.get("kernel_ms")
                row["kernels"] = list(breakdown.get("kernels") or [])[:MAX_KERNELS]
                row["kernel_total_ms"] = breakdown.get("total_ms")
                if row["gpu_timing"] == "profiler" and breakdown.get("total_ms") is not None:
                    gpu = [float(breakdown["total_ms"])]
            if err:
                row["breakdown_error"] = err
        if gpu:
            s = timing.summarize(gpu)
            row.update(gpu_ms=s["median"], gpu_p10_ms=s["p10"], gpu_p90_ms=s["p90"], gpu_samples_ms=gpu)

        row["floor_ms"], row["pct_of_floor"], floor_err = roofline_floor(workload.step_cost, ctx.peaks, row["gpu_ms"])
        if floor_err:
            row["breakdown_error"] = "; ".join(filter(None, [row.get("breakdown_error"), floor_err]))
        info = method_info(workload.method, workload.model)
        if info:
            row["method_info"] = info
        if row["gpu_timing"] == "profiler" and row["gpu_ms"] is None:
            row.update(error_type="CaptureError", error=f"{row['capture_error']}; and the profiler fallback failed: {row.get('breakdown_error')}")
        else:
            row.update(status="ok", error=None)
    except Exception as e:  # one method's failure (OOM, unsupported op, library bug) must not stop the sweep
        record_failure(row, e)
    finally:
        row["duration_s"] = round(time.perf_counter() - t0, 4)
        del workload
        if device.type == "cuda":  # return the point's device memory (cycles in autograd closures need gc)
            gc.collect()
            try:
                torch.cuda.empty_cache()
            except Exception:
                pass
    return row


# ---------------------------------------------------------------- worker process


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker whose parent died (SIGKILL) must not live on: poll the parent pid and exit."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def main() -> int:
    """Entry point of `python -m falqon_bench.measure.worker`: read the points, emit one result line per point."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever libraries print must not corrupt the protocol stream
    _exit_when_orphaned(os.getppid())

    def emit(obj: dict[str, Any]) -> None:
        protocol.write(json.dumps(obj, default=str) + "\n")
        protocol.flush()

    payload = json.loads(sys.stdin.read())
    for module in payload.get("modules", []):
        importlib.import_module(module)
    ctx = MeasureContext(**payload["context"])
    emit({"event": "ready", "pid": os.getpid()})
    for point in payload["points"]:
        print(f"[worker {os.getpid()}] {point['method']} {point['layer']} r={point['rank']} tokens={point['tokens']}", file=sys.stderr, flush=True)
        row = measure_point(point, ctx)
        emit({"event": "result", "row": row})
        if process_poisoned(row):
            emit({"event": "restart", "reason": row.get("error") or row.get("capture_error")})
            return 3
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
