"""Compiled steps are timed by CUDA-graph replay, with their backward inside the graph (GPU only).

Compiled falqon used to fail capture on the H100 and H200 (torch 2.11): its first calls ran on the legacy
default stream, and in the capture its backward made that stream wait on the capturing one. The runner
now measures every point on its own stream (timing.point_stream). Each case runs in a child process: a
failed capture can poison the process's CUDA state.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

_CHILD = """
import json, sys, torch
from falqon_bench.data.schema import point_id
from falqon_bench.measure.worker import MeasureContext, measure_point
point = dict(suite="test", method=sys.argv[1], layer="test.2048", K=2048, N=2048, rank=16, tokens=2048,
             compile=True, cache="warm", dtype="bfloat16", options={})
point["point_id"] = point_id(point)
row = measure_point(point, MeasureContext(device="cuda", budget_ms=20, warmup_ms=20, min_samples=10))
keys = ("status", "error", "gpu_timing", "capture_error", "gpu_ms", "kernel_total_ms")
print("ROW " + json.dumps({k: row.get(k) for k in keys}))
"""


@pytest.mark.parametrize("method", ["falqon", "halo_lora", "fp8_base_lora"])
def test_a_compiled_point_is_timed_by_graph_replay_that_holds_the_whole_step(method):
    done = subprocess.run([sys.executable, "-c", _CHILD, method], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    row = json.loads(lines[-1][4:])
    assert row["status"] == "ok", row
    assert row["gpu_timing"] == "cudagraph", row["capture_error"]
    # a graph that missed the backward (kernels launched outside the capture) would replay in about half
    # the time of the step's kernels as the profiler sums them
    assert row["gpu_ms"] >= 0.8 * row["kernel_total_ms"], row
