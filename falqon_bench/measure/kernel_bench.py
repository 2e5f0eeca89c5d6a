"""GPU micro-benchmarks of FALQON's kernels against their torch references, written as one results run.

One question: how fast is each kernel of falqon_core.kernels, and how far from its limit? It times
- quantize: e4m3/e5m2 x tensorwise/rowwise, Triton vs the torch reference vs torch.compile of the reference,
  on bf16 inputs; reports achieved GB/s (bytes the fused kernel must move: input read once, fp8 data and
  fp32 scales written once) and % of the measured device copy bandwidth;
- the proxy update (top-k rows of B merged into W8, B zeroed): Triton vs reference; GB/s as above;
- the fp8 transpose (W8^T and dY8^T of FALQON's backward): Triton tiled byte transpose vs torch's
  x.t().contiguous(); GB/s of R x C bytes read + R x C written, and % of copy bandwidth;
- the melded forward GEMM (M x K @ (N+r) x K^T, e4m3): cuBLASLt vs Triton, plain and with o_a quantized
  for the backward; reports TFLOP/s and the floor at the measured fp8 GEMM peak.
Each (kernel, shape, variant, cache) is one point of results/<run-id>/points.jsonl (falqon_bench.data.store),
with every falqon_bench.data.schema.REQUIRED_KEYS key plus `gbps`, `pct_of_copy_bw`, `tflops`.

Timing: CUDA-graph replay with CUDA events (falqon_bench.measure.timing.time_cudagraph: warm-up by time, every
sample kept, L2 flushed before each sample when cache = "cold"), so a 10 us kernel is not measured as
its Python launch cost; a variant that cannot be captured falls back to CUDA events around eager calls
(gpu_timing "events"). Peaks (copy GB/s, fp8 TFLOP/s) come from falqon_bench.measure.roofline.measure_peaks.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table

from falqon_bench.measure import envinfo, roofline, timing
from falqon_bench.data.errors import BenchInputError
from falqon_bench.data.schema import Point, new_row
from falqon_bench.measure.worker import record_failure
from falqon_bench.data.store import RunWriter, new_manifest, new_run_id
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
# (step, cache) -> (samples in ms, gpu_timing label: 'cudagraph' or 'events')
Timer = Callable[[Step, str], tuple[list[float], str]]

_FORMATS = {"e4m3": fp8.E4M3, "e5m2": fp8.E5M2}
_GRANULARITIES = ("tensorwise", "rowwise")


class KernelBenchError(BenchInputError):
    """The kernel benchmarks cannot run here (no CUDA GPU); the CLI prints the message and exits 2."""


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
    """One variant of one kernel at one shape: the step to time and the work it stands for."""

    method: str
    layer: str
    K: int
    N: int
    rank: int
    tokens: int
    dtype: str
    step: Step
    compile: bool = False
    bytes_moved: float | None = None  # minimum device-memory traffic, bytes (memory-bound kernels)
    flops: float | None = None  # matmul FLOPs (GEMMs)
    options: dict[str, Any] = field(default_factory=dict)


def cuda_graph_timer(
    device: torch.device, warmup_ms: float = 100.0, budget_ms: float = 300.0, min_samples: int = 30
) -> Timer:
    """The default timer: CUDA-graph replay (falqon_bench.measure.timing); eager CUDA events if capture fails."""
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


# ---------------------------------------------------------------- cases


def _compile_on_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile(fn), built when first called (in the timer's warm-up), so listing cases stays cheap."""
    compiled: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args)

    return call


def _quantize_cases(shape: tuple[int, int], device: torch.device, compile_reference: bool) -> Iterator[KernelCase]:
    rows, cols = shape
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    for fmt, dtype in _FORMATS.items():
        for gran in _GRANULARITIES:
            scale_bytes = 4 * (rows if gran == "rowwise" else 1)
            common = dict(
                layer=f"{rows}x{cols}", K=cols, N=rows, rank=0, tokens=0, dtype=f"bf16->{fmt}",
                bytes_moved=float(x.numel() * x.element_size() + x.numel() + scale_bytes),
            )
            name = f"kernel.quantize_{fmt}_{gran}"
            triton_step = functools.partial(quantize_fp8_triton, x, dtype, gran)
            yield KernelCase(method=f"{name}.triton", step=triton_step, **common)
            torch_step = functools.partial(quantize_fp8_reference, x, dtype, gran)
            yield KernelCase(method=f"{name}.torch", step=torch_step, **common)
            if compile_reference:
                reference = functools.partial(quantize_fp8_reference, dtype=dtype, granularity=gran)
                compiled = _compile_on_first_call(reference)
                yield KernelCase(
                    method=f"{name}.torch_compile", step=functools.partial(compiled, x), compile=True, **common
                )


def _proxy_cases(shape: tuple[int, int, int, int], device: torch.device) -> Iterator[KernelCase]:
    n, k_dim, r, k = shape
    w8 = torch.randn(n, k_dim, device=device).mul_(64).clamp_(-448, 448).to(fp8.E4M3)
    a8 = torch.randn(r, k_dim, device=device).mul_(8).to(fp8.E4M3)
    b = torch.randn(n, r, device=device, dtype=torch.bfloat16)
    # W8 rows read + written, A8 read, B read (norms + selected rows) and zeroed
    bytes_moved = float(2 * k * k_dim + r * k_dim + (2 * n * r + k * r) * b.element_size())
    common = dict(
        layer=f"{n}x{k_dim}", K=k_dim, N=n, rank=r, tokens=0, dtype="e4m3", bytes_moved=bytes_moved, options={"topk": k}
    )
    # each variant updates its own copies in place (B is zeroed after the first call; the work stays the same)
    w_t, b_t = w8.clone(), b.clone()
    triton_step = functools.partial(proxy_update_triton_, w_t, a8, b_t, k)
    yield KernelCase(method="kernel.proxy_update.triton", step=triton_step, **common)
    w_r, b_r = w8.clone(), b.clone()
    torch_step = functools.partial(proxy_update_reference_, w_r, a8, b_r, k)
    yield KernelCase(method="kernel.proxy_update.torch", step=torch_step, **common)


def _transpose_cases(shape: tuple[int, int], device: torch.device) -> Iterator[KernelCase]:
    rows, cols = shape
    x8 = torch.randn(rows, cols, device=device).mul_(64).clamp_(-448, 448).to(fp8.E4M3)
    common = dict(
        layer=f"{rows}x{cols}", K=cols, N=rows, rank=0, tokens=0, dtype="e4m3", bytes_moved=float(2 * x8.numel())
    )
    yield KernelCase(method="kernel.transpose_fp8.triton", step=functools.partial(transpose_fp8_triton, x8), **common)
    yield KernelCase(method="kernel.transpose_fp8.torch", step=functools.partial(transpose_fp8_reference, x8), **common)


def _gemm_cases(shape: tuple[int, int, int, int], device: torch.device) -> Iterator[KernelCase]:
    m, k_dim, n, r = shape
    x8, xs = fp8.quantize(torch.randn(m, k_dim, device=device, dtype=torch.bfloat16), fp8.E4M3, "tensorwise")
    w8, ws = fp8.quantize(torch.randn(n + r, k_dim, device=device, dtype=torch.bfloat16), fp8.E4M3, "tensorwise")
    args = (x8, xs, w8, ws, n)
    common = dict(
        layer=f"{m}x{k_dim}x{n}", K=k_dim, N=n, rank=r, tokens=m, dtype="e4m3", flops=float(2 * m * (n + r) * k_dim)
    )
    yield KernelCase(
        method="kernel.melded_gemm.cublas", step=functools.partial(melded_matmul_reference, *args), **common
    )
    yield KernelCase(method="kernel.melded_gemm.triton", step=functools.partial(melded_matmul_triton, *args), **common)
    yield KernelCase(
        method="kernel.melded_gemm_quantized_oa.cublas",
        step=functools.partial(melded_matmul_quantized_oa_reference, *args), **common,
    )
    yield KernelCase(
        method="kernel.melded_gemm_quantized_oa.triton",
        step=functools.partial(melded_matmul_quantized_oa_triton, *args), **common,
    )


def kernel_cases(shapes: KernelShapes, device: torch.device, compile_reference: bool = True) -> Iterator[KernelCase]:
    """Every case of the benchmark, inputs made lazily one shape at a time (seeded)."""
    torch.manual_seed(0)
    for shape in shapes.quantize:
        yield from _quantize_cases(shape, device, compile_reference)
    for shape in shapes.proxy:
        yield from _proxy_cases(shape, device)
    for shape in shapes.gemm:
        yield from _gemm_cases(shape, device)
    for shape in shapes.transpose:
        yield from _transpose_cases(shape, device)


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


def measure_point(case: KernelCase, cache: str, timer: Timer, device: torch.device, device_name: str,
                  peaks: dict[str, Any] | None) -> dict[str, Any]:
    """Time one case at one cache state; a failure becomes a point with status 'error' (the run goes on)."""
    identity = Point(
        suite=SUITE, method=case.method, layer=case.layer, K=case.K, N=case.N, rank=case.rank, tokens=case.tokens,
        compile=case.compile, cache=cache, dtype=case.dtype, options=case.options,
    )
    point = new_row(identity.as_dict(), device_name)
    point.update(kernel_ms={}, bytes=case.bytes_moved, flops=case.flops)
    t0 = time.perf_counter()
    ms = None
    try:
        before = envinfo.gpu_state(device) if device.type == "cuda" else {}
        samples, label = timer(case.step, cache)
        after = envinfo.gpu_state(device) if device.type == "cuda" else {}
        point.update(clocks_before=before, clocks_after=after, clock_dropped=envinfo.clock_dropped(before, after))
        if not samples:
            raise RuntimeError("the timer returned no samples")
        stats = timing.summarize(list(samples))
        ms = stats["median"]
        point.update(
            gpu_ms=ms, gpu_samples_ms=list(samples), gpu_timing=label, wall_ms=ms, wall_samples_ms=list(samples),
            gpu_p10_ms=stats["p10"], gpu_p90_ms=stats["p90"],
        )
        point["peak_mem_bytes"] = timing.peak_memory_bytes(case.step, device)
        point.update(status="ok", error=None)
    except Exception as e:  # one variant failing (compile, capture, OOM) must not end the run
        record_failure(point, e)
        ms = None
    point["duration_s"] = round(time.perf_counter() - t0, 4)
    point.update(derived_metrics(case, ms, peaks))
    return point


def print_points_table(points: list[dict[str, Any]], console: Console | None = None) -> None:
    """A rich table of the run: median ms with p10-p90, GB/s and % of copy bandwidth, TFLOP/s."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    table = Table(title=f"falqon kernels on {points[0]['device'] if points else '?'}")
    for col in ("method", "layer", "cache", "median ms", "p10-p90 ms", "GB/s", "% copy BW", "TFLOP/s", "status"):
        table.add_column(col, justify="left" if col in ("method", "layer", "cache", "status") else "right")
    for p in points:
        spread = "-" if p["gpu_p10_ms"] is None else f"{p['gpu_p10_ms']:.4f}-{p['gpu_p90_ms']:.4f}"
        table.add_row(
            p["method"], p["layer"], p["cache"], fmt(p["gpu_ms"], ".4f"), spread, fmt(p["gbps"], ".0f"),
            fmt(p["pct_of_copy_bw"], ".1f"), fmt(p["tflops"], ".1f"),
            p["status"] if p["status"] == "ok" else p["error"],
        )
    (console or Console()).print(table)


def _resolve_device(device: torch.device | str | None, timer: Timer | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if timer is None and (device.type != "cuda" or not torch.cuda.is_available()):
        raise KernelBenchError(
            "kernel micro-benchmarks need a CUDA GPU: torch.cuda.is_available() is False here "
            f"(device {device}); run them on a GPU machine"
        )
    return device


def run_kernel_bench(
    out_dir: Path,
    shapes: KernelShapes = LLAMA_7B,
    *,
    caches: tuple[str, ...] = ("warm", "cold"),
    compile_reference: bool = True,
    device: torch.device | str | None = None,
    timer: Timer | None = None,
    peaks: dict[str, Any] | None = None,
    console: Console | None = None,
) -> Path:
    """Benchmark every kernel case under out_dir/<run-id>/ and return that run directory.

    timer and peaks are measured on the GPU when not given (tests inject a fake timer and peaks, which
    is also the only way to run this off CUDA). Raises KernelBenchError without a CUDA GPU.
    """
    device = _resolve_device(device, timer)
    if timer is None:
        timer = cuda_graph_timer(device)
    if peaks is None:
        peaks = roofline.measure_peaks(device)
    name = envinfo.device_name(device)
    run_dir = Path(out_dir) / new_run_id(SUITE, name)
    shape_lists = {"quantize": shapes.quantize, "proxy": shapes.proxy, "gemm": shapes.gemm, "transpose": shapes.transpose}
    manifest = new_manifest(run_dir.name, SUITE, name, envinfo.collect_env(device), None, peaks=peaks, shapes=shape_lists)
    writer = RunWriter(run_dir, manifest)
    points = []
    for case in kernel_cases(shapes, device, compile_reference):
        for cache in caches:
            point = measure_point(case, cache, timer, device, name, peaks)
            writer.append(point)
            points.append(point)
    writer.finish(n_points=len(points), n_errors=sum(p["status"] != "ok" for p in points))
    print_points_table(points, console)
    return run_dir
