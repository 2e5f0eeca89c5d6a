"""GPU micro-benchmarks of FALQON's kernels against their torch references: what one point of a kernels suite does.

One question: how fast is each kernel of falqon_core.kernels, and how far from its limit? It times
- quantize: e4m3/e5m2 x tensorwise/rowwise, Triton vs the torch reference vs torch.compile of the reference,
  on bf16 inputs; reports achieved GB/s (bytes the fused kernel must move: input read once, fp8 data and
  fp32 scales written once) and % of the measured device copy bandwidth;
- the proxy update (top-k rows of B merged into W8, B zeroed): Triton vs reference; GB/s as above;
- the fp8 transpose (W8^T and dY8^T of FALQON's backward): Triton tiled byte transpose vs torch's
  x.t().contiguous(); GB/s of R x C bytes read + R x C written, and % of copy bandwidth;
- the melded forward GEMM (M x K @ (N+r) x K^T, e4m3): cuBLASLt vs Triton, plain and with o_a quantized
  for the backward; reports TFLOP/s and the floor at the measured fp8 GEMM peak.
Each (kernel, shape, variant, cache) is one point of a `kind = "kernels"` suite (falqon_bench.suites.kernels_suite,
suites/kernels.toml), run like every other kind by falqon_bench.measure.runner (worker processes, resume, manifest);
its row has every falqon_bench.data.schema.REQUIRED_KEYS key plus `bytes`, `gbps`, `pct_of_copy_bw`, `tflops`.

A case is a description (method name, shape, bytes, FLOPs) made without tensors, so the parent can expand a
suite; its step is built from that description in the worker (`build_step`), with seeded inputs.

Timing: CUDA-graph replay with CUDA events (falqon_bench.measure.timing.time_cudagraph: warm-up by time, every
sample kept, L2 flushed before each sample when cache = "cold"), so a 10 us kernel is not measured as
its Python launch cost; a variant that cannot be captured falls back to CUDA events around eager calls
(gpu_timing "events"). On a CPU (device = "cpu" suites; Triton under TRITON_INTERPRET=1) only the eager wall
time is recorded (gpu_ms null, gpu_timing "none"). Peaks (copy GB/s, fp8 TFLOP/s) are the run's
(falqon_bench.measure.roofline.measure_peaks, once per run, in the runner).
"""

from __future__ import annotations

import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from rich.table import Table

from falqon_bench.measure import envinfo, timing
from falqon_bench.data.schema import Point, new_row
from falqon_bench.measure.worker import record_failure
from falqon_core import fp8
from falqon_core.kernels.melded import (
    melded_matmul_quantized_oa_reference,
    melded_matmul_quantized_oa_triton,
    melded_matmul_reference,
    melded_matmul_triton,
)
from falqon_core.kernels.proxy_update import proxy_update_reference_, proxy_update_triton_
from falqon_core.kernels.quantize import quantize_fp8_reference, quantize_fp8_triton
from falqon_core.kernels.transpose import transpose_fp8_reference, transpose_fp8_triton

SUITE = "kernels"
Step = Callable[[], object]
# (step, cache) -> (samples in ms, gpu_timing label: 'cudagraph', 'events', or 'none' for CPU wall time)
Timer = Callable[[Step, str], tuple[list[float], str]]

FORMATS = {"e4m3": fp8.E4M3, "e5m2": fp8.E5M2}
GRANULARITIES = ("tensorwise", "rowwise")
KERNELS = ("quantize", "proxy", "gemm", "transpose")  # the fields of KernelShapes, in run order
IMPLEMENTATIONS = ("triton", "torch", "torch_compile", "cublas")  # the last part of a case's method name


@dataclass(frozen=True)
class KernelShapes:
    """The shapes to benchmark (LLaMA-7B by default; LLAMA_7B also sets the transpose sweep).

    quantize: (rows, cols) of a bf16 input. proxy: (N, K, r, k) with W8 N x K, A8 r x K, B N x r.
    gemm: (M, K, N, r): x M x K against the melded (N+r) x K matrix.
    transpose: (rows, cols) of an e4m3 input; empty unless given, so a sweep written before the transpose
    case existed keeps its points.
    """

    quantize: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (16384, 4096))
    proxy: tuple[tuple[int, int, int, int], ...] = ((4096, 4096, 64, 64), (11008, 4096, 64, 64), (4096, 11008, 64, 64))
    gemm: tuple[tuple[int, int, int, int], ...] = (
        (4096, 4096, 4096, 64), (4096, 4096, 11008, 64), (4096, 11008, 4096, 64),
    )
    transpose: tuple[tuple[int, int], ...] = ()


# W8 of a 4096 x 4096 projection (attention), and dY8 / W8 of the 4096 x 11008 MLP ones
LLAMA_7B_TRANSPOSE = ((4096, 4096), (4096, 11008))
LLAMA_7B = KernelShapes(transpose=LLAMA_7B_TRANSPOSE)


@dataclass
class KernelCase:
    """One variant of one kernel at one shape: the work it stands for, and (once built) the step to time.

    kernel: a KERNELS name; shape: that kernel's shape tuple (KernelShapes); impl: an IMPLEMENTATIONS name;
    params: what else selects the variant (quantize: fmt, granularity). step: None until build_step.
    """

    method: str
    layer: str
    K: int
    N: int
    rank: int
    tokens: int
    dtype: str
    step: Step | None = None
    compile: bool = False
    bytes_moved: float | None = None  # minimum device-memory traffic, bytes (memory-bound kernels)
    flops: float | None = None  # matmul FLOPs (GEMMs)
    options: dict[str, Any] = field(default_factory=dict)
    kernel: str = ""
    shape: tuple[int, ...] = ()
    impl: str = ""
    params: dict[str, str] = field(default_factory=dict)


def cuda_graph_timer(
    device: torch.device, warmup_ms: float = 100.0, budget_ms: float = 300.0, min_samples: int = 30
) -> Timer:
    """The GPU timer: CUDA-graph replay (falqon_bench.measure.timing); eager CUDA events if capture fails."""
    flush = timing.l2_flusher(device)

    def timer(step: Step, cache: str) -> tuple[list[float], str]:
        cold_flush = flush if cache == "cold" else None
        try:
            samples = timing.time_cudagraph(
                step, device=device, warmup_ms=warmup_ms, budget_ms=budget_ms, min_samples=min_samples,
                cache=cache, flush=cold_flush,
            )
            return samples, "cudagraph"
        except timing.CaptureError:
            samples = timing.time_wall(
                step, device=device, warmup_ms=warmup_ms, budget_ms=budget_ms, min_samples=min_samples, flush=cold_flush
            )
            return samples, "events"

    return timer


def cpu_wall_timer(warmup_ms: float = 100.0, budget_ms: float = 300.0, min_samples: int = 30) -> Timer:
    """The CPU timer: eager wall time (perf_counter); there is no L2 flush on CPU, so cold times as warm."""

    def timer(step: Step, cache: str) -> tuple[list[float], str]:
        samples = timing.time_wall(step, device="cpu", warmup_ms=warmup_ms, budget_ms=budget_ms, min_samples=min_samples)
        return samples, "none"

    return timer


# ---------------------------------------------------------------- cases (descriptions, no tensors)


def _compile_on_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile(fn), built when first called (in the timer's warm-up), so building a step stays cheap."""
    compiled: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args)

    return call


def _quantize_cases(shape: tuple[int, int], compile_reference: bool) -> list[KernelCase]:
    rows, cols = shape
    cases = []
    for fmt in FORMATS:
        for gran in GRANULARITIES:
            scale_bytes = 4 * (rows if gran == "rowwise" else 1)
            impls = ("triton", "torch", "torch_compile") if compile_reference else ("triton", "torch")
            for impl in impls:
                cases.append(KernelCase(
                    method=f"kernel.quantize_{fmt}_{gran}.{impl}", layer=f"{rows}x{cols}", K=cols, N=rows, rank=0,
                    tokens=0, dtype=f"bf16->{fmt}", compile=impl == "torch_compile",
                    bytes_moved=float(rows * cols * 2 + rows * cols + scale_bytes),  # bf16 in, fp8 out, fp32 scales
                    kernel="quantize", shape=shape, impl=impl, params={"fmt": fmt, "granularity": gran},
                ))
    return cases


def _proxy_cases(shape: tuple[int, int, int, int]) -> list[KernelCase]:
    n, k_dim, r, k = shape
    # W8 rows read + written, A8 read, B (bf16) read (norms + selected rows) and zeroed
    bytes_moved = float(2 * k * k_dim + r * k_dim + (2 * n * r + k * r) * 2)
    return [
        KernelCase(method=f"kernel.proxy_update.{impl}", layer=f"{n}x{k_dim}", K=k_dim, N=n, rank=r, tokens=0,
                   dtype="e4m3", bytes_moved=bytes_moved, options={"topk": k}, kernel="proxy", shape=shape, impl=impl)
        for impl in ("triton", "torch")
    ]


def _transpose_cases(shape: tuple[int, int]) -> list[KernelCase]:
    rows, cols = shape
    return [
        KernelCase(method=f"kernel.transpose_fp8.{impl}", layer=f"{rows}x{cols}", K=cols, N=rows, rank=0, tokens=0,
                   dtype="e4m3", bytes_moved=float(2 * rows * cols), kernel="transpose", shape=shape, impl=impl)
        for impl in ("triton", "torch")
    ]


def _gemm_cases(shape: tuple[int, int, int, int]) -> list[KernelCase]:
    m, k_dim, n, r = shape
    return [
        KernelCase(method=f"kernel.{name}.{impl}", layer=f"{m}x{k_dim}x{n}", K=k_dim, N=n, rank=r, tokens=m,
                   dtype="e4m3", flops=float(2 * m * (n + r) * k_dim), kernel="gemm", shape=shape, impl=impl,
                   params={"variant": name})
        for name in ("melded_gemm", "melded_gemm_quantized_oa")
        for impl in ("cublas", "triton")
    ]


def cases_of(kernel: str, shape: tuple[int, ...], compile_reference: bool = True) -> list[KernelCase]:
    """Every variant of one kernel at one shape, in run order (descriptions: no tensors are made)."""
    shape = tuple(int(v) for v in shape)
    if kernel == "quantize":
        return _quantize_cases(shape, compile_reference)
    return {"proxy": _proxy_cases, "gemm": _gemm_cases, "transpose": _transpose_cases}[kernel](shape)


def kernel_cases(shapes: KernelShapes, compile_reference: bool = True) -> list[KernelCase]:
    """Every case of the benchmark in run order: quantize, proxy, gemm, transpose shapes, each shape's variants."""
    return [case for kernel in KERNELS for shape in getattr(shapes, kernel) for case in cases_of(kernel, shape, compile_reference)]


# ---------------------------------------------------------------- steps (inputs made on the device, seeded)

_GEMM_FUNCTIONS = {
    ("melded_gemm", "cublas"): melded_matmul_reference, ("melded_gemm", "triton"): melded_matmul_triton,
    ("melded_gemm_quantized_oa", "cublas"): melded_matmul_quantized_oa_reference,
    ("melded_gemm_quantized_oa", "triton"): melded_matmul_quantized_oa_triton,
}


def _random_e4m3(rows: int, cols: int, device: torch.device, spread: float) -> torch.Tensor:
    return torch.randn(rows, cols, device=device).mul_(spread).clamp_(-448, 448).to(fp8.E4M3)


def build_step(case: KernelCase, device: torch.device) -> Step:
    """The zero-argument step of a case with its inputs made on `device` (seed 0, so every run times the same data)."""
    torch.manual_seed(0)
    if case.kernel == "quantize":
        rows, cols = case.shape
        x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
        dtype, gran = FORMATS[case.params["fmt"]], case.params["granularity"]
        if case.impl == "torch_compile":
            return functools.partial(_compile_on_first_call(functools.partial(quantize_fp8_reference, dtype=dtype, granularity=gran)), x)
        return functools.partial(quantize_fp8_triton if case.impl == "triton" else quantize_fp8_reference, x, dtype, gran)
    if case.kernel == "proxy":
        # updates its own W8 and B in place (B is zeroed after the first call; the work stays the same)
        n, k_dim, r, k = case.shape
        w8, a8 = _random_e4m3(n, k_dim, device, 64.0), _random_e4m3(r, k_dim, device, 8.0)
        b = torch.randn(n, r, device=device, dtype=torch.bfloat16)
        return functools.partial(proxy_update_triton_ if case.impl == "triton" else proxy_update_reference_, w8, a8, b, k)
    if case.kernel == "transpose":
        x8 = _random_e4m3(*case.shape, device, 64.0)
        return functools.partial(transpose_fp8_triton if case.impl == "triton" else transpose_fp8_reference, x8)
    if case.kernel == "gemm":
        m, k_dim, n, r = case.shape
        x8, xs = fp8.quantize(torch.randn(m, k_dim, device=device, dtype=torch.bfloat16), fp8.E4M3, "tensorwise")
        w8, ws = fp8.quantize(torch.randn(n + r, k_dim, device=device, dtype=torch.bfloat16), fp8.E4M3, "tensorwise")
        return functools.partial(_GEMM_FUNCTIONS[(case.params["variant"], case.impl)], x8, xs, w8, ws, n)
    raise ValueError(f"kernel case {case.method!r} has unknown kernel {case.kernel!r}; allowed: {', '.join(KERNELS)}")


# ---------------------------------------------------------------- points


def derived_metrics(case: KernelCase, ms: float | None, peaks: dict[str, Any] | None) -> dict[str, float | None]:
    """floor_ms, gbps, pct_of_copy_bw, tflops of a case timed at ms (None where they do not apply).

    Floor: bytes / copy bandwidth for memory-bound kernels, FLOPs / fp8 GEMM peak for GEMMs.
    """
    copy_gbps = (peaks or {}).get("copy_gb_per_s")
    fp8_tflops = (peaks or {}).get("fp8_tflops")
    out: dict[str, float | None] = {"floor_ms": None, "gbps": None, "pct_of_copy_bw": None, "tflops": None}
    if case.bytes_moved is not None:
        if copy_gbps:
            out["floor_ms"] = case.bytes_moved / (copy_gbps * 1e9) * 1e3
        if ms:
            out["gbps"] = case.bytes_moved / (ms * 1e-3) / 1e9
            if copy_gbps:
                out["pct_of_copy_bw"] = 100.0 * out["gbps"] / copy_gbps
    if case.flops is not None:
        if fp8_tflops:
            out["floor_ms"] = case.flops / (fp8_tflops * 1e12) * 1e3
        if ms:
            out["tflops"] = case.flops / (ms * 1e-3) / 1e12
    return out


def case_point(case: KernelCase, cache: str, suite: str = SUITE) -> Point:
    """The identity of a case at one cache state: the same keys and values as every kernels run since the first."""
    return Point(
        suite=suite, method=case.method, layer=case.layer, K=case.K, N=case.N, rank=case.rank, tokens=case.tokens,
        compile=case.compile, cache=cache, dtype=case.dtype, options=case.options,
    )


def measure_point(case: KernelCase, cache: str, timer: Timer, device: torch.device, device_name: str,
                  peaks: dict[str, Any] | None, suite: str = SUITE) -> dict[str, Any]:
    """Build (when not built), time and cost one case at one cache state; a failure becomes a point with
    status 'error' (the run goes on). A timer labelled 'none' is CPU wall time: gpu_ms stays null."""
    point = new_row(case_point(case, cache, suite).as_dict(), device_name)
    point.update(kernel_ms={}, bytes=case.bytes_moved, flops=case.flops)
    t0 = time.perf_counter()
    ms = None
    try:
        step = case.step if case.step is not None else build_step(case, device)
        before = envinfo.gpu_state(device) if device.type == "cuda" else {}
        samples, label = timer(step, cache)
        after = envinfo.gpu_state(device) if device.type == "cuda" else {}
        point.update(clocks_before=before, clocks_after=after, clock_dropped=envinfo.clock_dropped(before, after))
        if not samples:
            raise RuntimeError("the timer returned no samples")
        stats = timing.summarize(list(samples))
        ms = stats["median"]
        point.update(wall_ms=ms, wall_samples_ms=list(samples), wall_p10_ms=stats["p10"], wall_p90_ms=stats["p90"], gpu_timing=label)
        if label != "none":
            point.update(gpu_ms=ms, gpu_samples_ms=list(samples), gpu_p10_ms=stats["p10"], gpu_p90_ms=stats["p90"])
        point["peak_mem_bytes"] = timing.peak_memory_bytes(step, device)
        point.update(status="ok", error=None)
    except Exception as e:  # one variant failing (compile, capture, OOM) must not end the run
        record_failure(point, e)
        ms = None
    point["duration_s"] = round(time.perf_counter() - t0, 4)
    point.update(derived_metrics(case, ms, peaks))
    return point


def case_for_point(point: dict[str, Any]) -> KernelCase:
    """The case a kernels-suite point names (its `kernel`, `kernel_shape` and `method`), rebuilt in the worker."""
    for case in cases_of(point["kernel"], point["kernel_shape"]):
        if case.method == point["method"]:
            return case
    raise ValueError(f"no kernel case {point['method']!r} for kernel {point['kernel']!r} at shape {point['kernel_shape']}")


@functools.lru_cache(maxsize=4)
def _timer_for(device: str, warmup_ms: float, budget_ms: float, min_samples: int) -> Timer:
    """One timer (and one L2 flush buffer) per worker process and timing settings."""
    if torch.device(device).type == "cuda":
        return cuda_graph_timer(torch.device(device), warmup_ms=warmup_ms, budget_ms=budget_ms, min_samples=min_samples)
    return cpu_wall_timer(warmup_ms=warmup_ms, budget_ms=budget_ms, min_samples=min_samples)


def measure_suite_point(point: dict[str, Any], ctx) -> dict[str, Any]:
    """The worker's entry for a kernels-suite point (ctx: falqon_bench.measure.worker.MeasureContext): the case's
    row, with the suite's timing settings and the run's peaks; never raises (except Ctrl-C)."""
    device = torch.device(ctx.device)
    label = envinfo.device_name(device)
    try:
        case = case_for_point(point)
        timer = _timer_for(str(device), ctx.warmup_ms, ctx.budget_ms, ctx.min_samples)
    except Exception as e:
        row = new_row(point, label)
        record_failure(row, e)
        return row
    row = measure_point(case, point["cache"], timer, device, label, ctx.peaks, suite=point["suite"])
    if row["gpu_timing"] == "events":  # a failed capture can leave the CUDA RNG in capture state: the runner
        row["capture_error"] = "CUDA-graph capture failed; timed with CUDA events around eager calls"  # restarts the worker
    if device.type == "cuda":  # return the point's inputs before the next point builds its own
        gc.collect()
        torch.cuda.empty_cache()
    return row


def points_table(points: list[dict[str, Any]]) -> Table:
    """A rich table of kernel rows: median ms (gpu_ms, else CPU wall_ms) with p10-p90, GB/s, % of copy BW, TFLOP/s."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    gpu = any(p.get("gpu_ms") is not None for p in points)
    table = Table(title=f"falqon kernels on {points[0]['device'] if points else '?'} ({'gpu_ms' if gpu else 'CPU wall_ms'})")
    for col in ("method", "layer", "cache", "median ms", "p10-p90 ms", "GB/s", "% copy BW", "TFLOP/s", "status"):
        table.add_column(col, justify="left" if col in ("method", "layer", "cache", "status") else "right")
    for p in points:
        ms, p10, p90 = (p.get("gpu_ms"), p.get("gpu_p10_ms"), p.get("gpu_p90_ms")) if gpu else (p.get("wall_ms"), p.get("wall_p10_ms"), p.get("wall_p90_ms"))
        spread = "-" if p10 is None else f"{p10:.4f}-{p90:.4f}"
        table.add_row(
            p["method"], p["layer"], p["cache"], fmt(ms, ".4f"), spread, fmt(p.get("gbps"), ".0f"),
            fmt(p.get("pct_of_copy_bw"), ".1f"), fmt(p.get("tflops"), ".1f"),
            p["status"] if p["status"] == "ok" else str(p["error"]),
        )
    return table
