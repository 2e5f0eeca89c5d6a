"""Roofline floor arithmetic on a made-up StepCost and made-up peaks."""

import pytest

from falqon_bench.measure.roofline import floor_ms, measure_peaks, pct_of_floor
from falqon_core.methods.base import StepCost

PEAKS = {"device": "made-up GPU", "bf16_tflops": 500.0, "fp8_tflops": 1000.0, "copy_gb_per_s": 3000.0}


def test_floor_sums_gemm_time_per_precision_and_quantization_bytes_over_bandwidth():
    cost = StepCost(gemm_flops={"fp8": 2e12, "bf16": 1e12}, quant_bytes=3e9)
    # fp8: 2e12 / 1e15 = 2 ms; bf16: 1e12 / 5e14 = 2 ms; bytes: 3e9 / 3e12 = 1 ms
    assert floor_ms(cost, PEAKS) == pytest.approx(5.0)


def test_floor_of_gemm_only_and_bytes_only_costs():
    assert floor_ms(StepCost(gemm_flops={"bf16": 5e11}, quant_bytes=0), PEAKS) == pytest.approx(1.0)
    assert floor_ms(StepCost(gemm_flops={}, quant_bytes=6e9), PEAKS) == pytest.approx(2.0)


def test_floor_is_none_without_peaks_or_without_the_needed_peak():
    cost = StepCost(gemm_flops={"fp8": 1e12}, quant_bytes=1e6)
    assert floor_ms(cost, None) is None
    assert floor_ms(cost, {**PEAKS, "fp8_tflops": None}) is None
    # a precision with zero FLOPs does not need its peak
    assert floor_ms(StepCost(gemm_flops={"fp8": 0.0, "bf16": 5e11}, quant_bytes=0), {**PEAKS, "fp8_tflops": None}) == pytest.approx(1.0)


def test_floor_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="allowed"):
        floor_ms(StepCost(gemm_flops={"int8": 1e12}, quant_bytes=0), PEAKS)


def test_pct_of_floor_is_floor_over_measured_time():
    assert pct_of_floor(2.0, 1.0) == pytest.approx(50.0)
    assert pct_of_floor(1.0, 1.0) == pytest.approx(100.0)
    assert pct_of_floor(None, 1.0) is None
    assert pct_of_floor(1.0, None) is None
    assert pct_of_floor(0.0, 1.0) is None
    assert pct_of_floor(1.0, float("nan")) is None


def test_measure_peaks_is_none_on_cpu():
    assert measure_peaks("cpu") is None


@pytest.mark.gpu
def test_measure_peaks_on_gpu_are_positive_and_plausible():
    peaks = measure_peaks("cuda")
    assert peaks["bf16_tflops"] > 10 and peaks["copy_gb_per_s"] > 100
    assert peaks["fp8_tflops"] is None or peaks["fp8_tflops"] > peaks["bf16_tflops"] * 0.8
