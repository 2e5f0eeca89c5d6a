"""Every point of the suite (suites/gate.toml unless $FALQON_BENCH_SUITE says otherwise) as a pytest-benchmark test.

Each point is measured once by the suite's own code, falqon_bench.measure.worker.measure_point (gpu_ms by CUDA-graph
replay, wall_ms eager, the suite's [timing]); its gpu_samples_ms (wall_samples_ms on a CPU suite) are then
replayed into the `benchmark` fixture as its timer, one round per sample, so pytest-benchmark's stats are
those samples in seconds and its median is the suite's median. extra_info holds the point's identity,
device and both sample lists (ms), which `falqon-bench compare` maps back to the point. The `point`
parameters come from benchmarks/conftest.py (pytest_generate_tests).
"""

from __future__ import annotations

import pytest
import torch

from falqon_bench.data.pytest_benchmark_format import SampleReplay, benchmark_group, point_extra_info, timed_samples_ms

REPLAY = SampleReplay()


@pytest.mark.benchmark(timer=REPLAY)
def test_point(point, benchmark, measure_context, unmeasured_rows):
    from falqon_bench.measure.runner import precheck  # here, not at import: a run where every point skips stays light
    from falqon_bench.data.schema import error_row
    from falqon_bench.measure.worker import measure_point

    device = torch.device(measure_context.device)
    reason = precheck(point, device)
    if reason:
        unmeasured_rows.append(error_row(point, _device_label(device), "unavailable", f"unavailable: {reason}"))
        pytest.skip(f"unavailable here: {reason}")
    row = measure_point(point, measure_context)
    if row["status"] != "ok":
        unmeasured_rows.append(row)
        pytest.fail(f"{point['method']} {point['layer']} r={point['rank']}: {row['error']}", pytrace=False)
    key, samples_ms = timed_samples_ms(row)
    assert samples_ms, f"measure_point returned an ok row without {key or 'samples'}"
    benchmark.group = benchmark_group(point)
    benchmark.extra_info.update(point_extra_info(row))
    rounds = REPLAY.load([ms / 1e3 for ms in samples_ms])
    benchmark.pedantic(REPLAY.next_sample, rounds=rounds, iterations=1, warmup_rounds=0)


def _device_label(device: torch.device) -> str:
    from falqon_bench.measure.envinfo import device_name

    return device_name(device)
