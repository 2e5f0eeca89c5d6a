"""Timing of one training step: GPU time by CUDA-graph replay, eager wall time, and their samples.

The worker calls it once per point (docs/architecture.md, "The path of a point").

Rules kept here: warm up by time (>= warmup_ms, after a first call that pays for compilation), not by
count; flush L2 outside the timed region for cache = "cold"; sample until the budget is spent and at
least `min_samples` are taken; keep every sample (ms per step); summarize as median with p10/p90.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

Step = Callable[[], object]

MAX_SAMPLES = 10_000
ESTIMATE_REPLAYS = 10  # back-to-back replays that size the samples
ESTIMATE_ROUNDS = 3  # rounds of them; the shortest counts
SLEEP_CLOCK_HZ = 2.0e9  # clock assumed to size a device sleep (in cycles); a faster clock only shortens it
HOLD_US_BASE, HOLD_US_PER_REPLAY = 20.0, 10.0  # the host's time to queue a sample of short-step replays, generous
MIN_REPLAY_US = 20.0  # a sample shorter than this measures event overhead, so replay n steps per sample
CPU_FLUSH_BYTES = 64 << 20  # no portable way to read the CPU last-level cache size: 64 MiB exceeds it on common parts


class CaptureError(RuntimeError):
    """The step could not be captured into a CUDA graph; the runner falls back to the profiler kernel sum."""


def summarize(samples: list[float]) -> dict[str, float | int | None]:
    """{median, p10, p90, n} of samples in ms (numpy linear-interpolated percentiles); Nones when empty."""
    if not samples:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    a = np.asarray(samples, dtype=np.float64)
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "n": int(a.size)}


def l2_flusher(device: torch.device | str) -> Callable[[], None]:
    """A function that evicts the last-level cache by zeroing a buffer of >= 2x its size (L2 on GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
        nbytes = max(2 * l2, 64 << 20)
    else:
        nbytes = CPU_FLUSH_BYTES
    buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return buf.zero_


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: Step, device: torch.device | str, warmup_ms: float) -> int:
    """One call (compilation, autotuning, lazy init), then repeat until warmup_ms of host time passed. Returns calls."""
    device = torch.device(device)
    step()
    _sync(device)
    calls, t0 = 1, time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        step()
        _sync(device)
        calls += 1
    return calls


def timed_call(fn: Callable[[], object], device: torch.device | str) -> tuple[object, float, float]:
    """(fn's result, host ms to issue it, wall ms until the device finished it) of one synchronized call.

    For runs that time a fixed number of whole training steps (e2e, accuracy) rather than sample until a
    budget: the device is synchronized before and after, so wall ms is the whole step and host ms the time
    Python took to return (launch-bound steps show host ms close to wall ms).
    """
    device = torch.device(device)
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    t_issued = time.perf_counter()
    _sync(device)
    t_done = time.perf_counter()
    return result, (t_issued - t0) * 1e3, (t_done - t0) * 1e3


def _enough(samples: list[float], spent_ms: float, budget_ms: float, min_samples: int) -> bool:
    return len(samples) >= MAX_SAMPLES or (len(samples) >= min_samples and spent_ms >= budget_ms)


def time_wall(
    step: Step,
    *,
    device: torch.device | str = "cpu",
    warmup_ms: float = 100.0,
    budget_ms: float = 1000.0,
    min_samples: int = 10,
    flush: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Eager step time, ms per sample, launch cost included (the host is part of what is measured).

    GPU: synchronize, then CUDA events around one step, so a launch-bound step shows its host time.
    CPU: `clock` (seconds) read before and after one step. `flush` (cold cache) runs before each sample,
    outside the timed region. Samples until budget_ms of sampled time and at least min_samples.
    """
    device = torch.device(device)
    warm_up(step, device, warmup_ms)
    samples: list[float] = []
    spent_ms = 0.0
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        while not _enough(samples, spent_ms, budget_ms, min_samples):
            if flush is not None:
                flush()
            torch.cuda.synchronize(device)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
            spent_ms += samples[-1]
        return samples
    while not _enough(samples, spent_ms, budget_ms, min_samples):
        if flush is not None:
            flush()
        t0 = clock()
        step()
        t1 = clock()
        samples.append((t1 - t0) * 1e3)
        spent_ms += samples[-1]
    return samples


@contextlib.contextmanager
def point_stream(device: torch.device | str) -> Iterator[None]:
    """Run a point's every call (build, warm-up, wall timing, capture, profile) on its own CUDA stream.

    A torch.compile'd step whose first calls ran on the legacy default stream cannot be captured later: in
    the capture its backward makes the default stream wait on the capturing stream and CUDA refuses
    ("operation would make the legacy stream depend on a capturing blocking stream"; compiled falqon on
    H100 and H200, torch 2.11). Keeping the default stream out of the point avoids it. No-op on CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        try:  # after a CUDA error this raises too; the point's row already carries the error
            torch.cuda.synchronize(device)
        except Exception:
            pass


def capture_graph(step: Step, device: torch.device | str, warmup_ms: float) -> "torch.cuda.CUDAGraph":
    """Warm up on a side stream (as capture requires), then capture one step. Raises CaptureError on failure."""
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warm_up(step, device, warmup_ms)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize(device)
    except Exception as e:  # capture errors come as RuntimeError / AcceleratorError from many layers
        torch.cuda.synchronize(device)
        raise CaptureError(describe_capture_failure(e)) from e
    return graph


def _first_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def describe_capture_failure(e: BaseException) -> str:
    """One line naming the error that broke the capture and where it was raised.

    CUDA reports a broken capture at capture_end ("operation failed due to a previous error during
    capture"); the error that matters is the first one in the exception chain, raised inside the step.
    """
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    first = chain[-1]
    where = ""
    ours = [f for f in traceback.extract_tb(first.__traceback__) if "site-packages" not in f.filename and "/torch/" not in f.filename]
    if ours:
        where = f" (raised under {ours[-1].name} in {Path(ours[-1].filename).name})"
    message = f"CUDA graph capture failed: {_first_line(first)}{where}"
    if first is not e:
        message += f"; then {_first_line(e)}"
    return message


def hold_cycles_before_sample(inner: int) -> int:
    """Device clock cycles to sleep before a sample of `inner` back-to-back replays (0: one replay, no sleep)."""
    if inner <= 1:
        return 0
    return int(SLEEP_CLOCK_HZ * (HOLD_US_BASE + HOLD_US_PER_REPLAY * inner) * 1e-6)


def _replay_ms(graph: "torch.cuda.CUDAGraph", n: int) -> float:
    """Mean ms per replay of n back-to-back replays (CUDA events around them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end) / n, 1e-4)


def time_cudagraph(
    step: Step,
    *,
    device: torch.device | str = "cuda",
    warmup_ms: float = 100.0,
    budget_ms: float = 1000.0,
    min_samples: int = 10,
    cache: str = "warm",
    flush: Callable[[], None] | None = None,
) -> list[float]:
    """GPU time of one step, ms per sample, from replays of a captured CUDA graph (no launch cost).

    Each sample is CUDA events around one replay, or around n replays divided by n when a step is shorter
    than 20 us (warm cache only; a device sleep before the sample lets the host queue them). For cache =
    "cold", the L2 is flushed before every sample, outside the events. The sample count is sized from a short
    estimate to fill budget_ms (at least min_samples).
    """
    device = torch.device(device)
    graph = capture_graph(step, device, warmup_ms)
    if cache == "cold" and flush is None:
        flush = l2_flusher(device)
    if cache != "cold":
        flush = None

    # the first replay of a new graph is slow (upload): inside the estimate it could push a step of a few
    # us over MIN_REPLAY_US, which then was timed one replay per sample (launch latency included: 9.6 us
    # against 6.2 us at four per sample for a 64x64 bf16 step on an H100) in some captures and not others.
    # A host hiccup only lengthens an estimate: the shortest of ESTIMATE_ROUNDS rounds counts
    graph.replay()
    torch.cuda.synchronize(device)
    estimate_ms = min(_replay_ms(graph, ESTIMATE_REPLAYS) for _ in range(ESTIMATE_ROUNDS))
    inner = 1 if flush is not None else max(1, math.ceil(MIN_REPLAY_US / 1e3 / estimate_ms))
    n_samples = min(MAX_SAMPLES, max(min_samples, math.ceil(budget_ms / (estimate_ms * inner))))
    # A step of a few us replays faster than the host launches graphs: back to back, the GPU waited for the
    # host between replays, and a sample measured the host's launch rate (medians of 4.4 to 10.1 us for one
    # 64x64 step over captures on an H200). A device sleep queued before each such sample keeps the GPU
    # busy while the host queues the sample's replays, which then run from a full queue.
    hold_cycles = hold_cycles_before_sample(inner)

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_samples)]
    for s, e in events:
        if flush is not None:
            flush()
        if hold_cycles:
            torch.cuda._sleep(hold_cycles)
        s.record()
        for _ in range(inner):
            graph.replay()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / inner for s, e in events]


def peak_memory_bytes(step: Step, device: torch.device | str) -> int | None:
    """Peak device memory allocated while one step runs (weights and inputs included), bytes; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
