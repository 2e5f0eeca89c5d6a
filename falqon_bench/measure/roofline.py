"""The floor of a step: the time it would take at the GPU's measured peaks, so every number has a distance to its limit.

floor = sum over precisions of GEMM FLOPs / that precision's peak  +  quantization bytes / copy bandwidth.
Peaks are measured once per run on this GPU (not taken from a datasheet): an 8192^3 GEMM in bf16
(torch.mm) and in fp8 (torch._scaled_mm), and a >= 1 GiB device-to-device copy_.

Units: TFLOP/s = 1e12 FLOP/s, GB/s = 1e9 bytes/s, times in ms.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from falqon_bench.measure import timing
from falqon_bench.data.derived import pct_of_floor  # noqa: F401  (re-exported: readers import it from falqon_bench.data.derived)
from falqon_core.methods.base import StepCost

GEMM_SIZE = 8192
COPY_BYTES = 1 << 30  # 1 GiB read + 1 GiB written per copy
WARMUP_MS = 100.0
REPEATS = 20

# peaks dict keys (also what the runner stores in manifest["peaks"])
PEAK_KEYS = {"bf16": "bf16_tflops", "fp8": "fp8_tflops"}
COPY_KEY = "copy_gb_per_s"


def _median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median of at least REPEATS eager timings of fn (timing.time_wall: CUDA events), after WARMUP_MS of warm-up."""
    return statistics.median(timing.time_wall(fn, device=device, warmup_ms=WARMUP_MS, budget_ms=0.0, min_samples=REPEATS))


def _bf16_gemm_tflops(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: torch.mm(a, b), device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _fp8_gemm_tflops(device: torch.device, n: int) -> float | None:
    """None where torch._scaled_mm does not run (GPUs without fp8 tensor cores)."""
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device=device, dtype=torch.float32)
    fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    try:
        fn()
    except RuntimeError:
        return None
    ms = _median_ms(fn, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _copy_gb_per_s(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, device=device, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_peaks(device: torch.device | str) -> dict[str, Any] | None:
    """Measured peaks of this GPU: {'device', 'bf16_tflops', 'fp8_tflops' (None without fp8), 'copy_gb_per_s',
    'gemm_size', 'copy_bytes'}. None on CPU (no floor there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        peaks = {
            "device": torch.cuda.get_device_name(device),
            "bf16_tflops": _bf16_gemm_tflops(device, GEMM_SIZE),
            "fp8_tflops": _fp8_gemm_tflops(device, GEMM_SIZE),
            COPY_KEY: _copy_gb_per_s(device, COPY_BYTES),
            "gemm_size": GEMM_SIZE,
            "copy_bytes": COPY_BYTES,
        }
        torch.cuda.empty_cache()
    return peaks


def floor_ms(cost: StepCost, peaks: dict[str, Any] | None) -> float | None:
    """Lowest possible time of one step, ms: sum_p flops_p / peak_p + quant_bytes / copy bandwidth.

    None when peaks is None (CPU run) or a peak this cost needs was not measured (no fp8 on this GPU).
    Raises ValueError for a precision other than 'fp8'/'bf16'.
    """
    if peaks is None:
        return None
    seconds = 0.0
    for precision, flops in cost.gemm_flops.items():
        if precision not in PEAK_KEYS:
            raise ValueError(f"StepCost.gemm_flops has precision {precision!r}; allowed: {sorted(PEAK_KEYS)}")
        if not flops:
            continue
        tflops = peaks.get(PEAK_KEYS[precision])
        if not tflops:
            return None
        seconds += flops / (tflops * 1e12)
    if cost.quant_bytes:
        gbps = peaks.get(COPY_KEY)
        if not gbps:
            return None
        seconds += cost.quant_bytes / (gbps * 1e9)
    return seconds * 1e3
