"""Timing primitives: percentiles, CPU wall sampling within budget, flush outside the timed region, GPU graph replay."""

import subprocess
import sys
import time

import pytest
import torch

from falqon_bench.measure.timing import CaptureError, l2_flusher, summarize, time_cudagraph, time_wall, warm_up


def test_summarize_gives_numpy_linear_percentiles_of_known_samples():
    s = summarize([float(v) for v in range(1, 11)])  # 1..10: p10 = 1 + 0.9*1, p90 = 1 + 8.1
    assert s == {"median": 5.5, "p10": pytest.approx(1.9), "p90": pytest.approx(9.1), "n": 10}
    assert summarize([3.0]) == {"median": 3.0, "p10": 3.0, "p90": 3.0, "n": 1}
    assert summarize([]) == {"median": None, "p10": None, "p90": None, "n": 0}


def test_cpu_wall_timing_returns_at_least_min_samples_positive_samples_within_budget():
    def step():
        time.sleep(0.001)

    t0 = time.perf_counter()
    samples = time_wall(step, device="cpu", warmup_ms=5, budget_ms=30, min_samples=5)
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    assert len(samples) >= 5 and all(s >= 1.0 for s in samples), "each sample covers one 1 ms step, in ms"
    assert sum(samples) >= 30, "sampled until the budget was spent"
    assert sum(samples) - samples[-1] < 30, "and stopped at the first sample past it"
    assert elapsed_ms < 30 + 5 + 2000, "warm-up + budget, with slack for a loaded machine"


def test_min_samples_wins_over_a_tiny_budget():
    samples = time_wall(lambda: None, device="cpu", warmup_ms=0, budget_ms=1e-6, min_samples=7)
    assert len(samples) == 7 and all(s >= 0 for s in samples)


def test_warm_up_runs_by_time_after_a_first_call():
    calls = []
    n = warm_up(lambda: (calls.append(1), time.sleep(0.002)), "cpu", warmup_ms=20)
    assert n == len(calls) >= 2


def test_cold_cache_flush_runs_before_each_sample_outside_the_timed_region():
    events: list[str] = []
    ticks = iter(range(10_000))

    def clock() -> float:
        events.append("clock")
        return next(ticks) * 1e-3  # 1 ms per clock read

    samples = time_wall(
        lambda: events.append("step"), device="cpu", warmup_ms=0, budget_ms=1e-6, min_samples=4,
        flush=lambda: events.append("flush"), clock=clock,
    )  # fmt: skip
    timed = events[events.index("flush") :]  # after warm-up (which never flushes)
    assert timed == ["flush", "clock", "step", "clock"] * 4
    assert samples == [1.0] * 4, "only the step lies between the two clock reads"


@pytest.mark.gpu
def test_cudagraph_timing_replays_a_captured_step_and_flushes_for_cold_cache():
    # a memory-bound step whose 24 MB input fits in L2: warm replays may read it from L2, cold ones from HBM
    a = torch.randn(12 * 2**20, device="cuda", dtype=torch.bfloat16)
    out = torch.empty((), device="cuda", dtype=torch.float32)

    def step():
        torch.sum(a, dim=0, dtype=torch.float32, out=out)

    # an idle GPU parks its clocks low: ramp them first so warm and cold are timed at the same clock
    time_cudagraph(step, device="cuda", warmup_ms=200, budget_ms=100, min_samples=10)
    warm = time_cudagraph(step, device="cuda", warmup_ms=20, budget_ms=20, min_samples=10)
    cold = time_cudagraph(step, device="cuda", warmup_ms=20, budget_ms=20, min_samples=10, cache="cold")
    assert len(warm) >= 10 and len(cold) >= 10 and min(warm) > 0
    # 24 MB at under 20 TB/s takes > 1 us; a warm replay cannot be slower than 10 ms on any GPU
    assert 1e-3 < summarize(warm)["median"] < 10
    assert summarize(cold)["median"] >= 0.9 * summarize(warm)["median"], "a cold-cache replay (L2 flushed first) was faster than a warm one"


@pytest.mark.gpu
def test_a_tiny_step_times_the_same_in_every_new_capture():
    """A ~5 us step is timed as n back-to-back replays per sample. Sized from an estimate that included the
    graph's slow first replay, a capture could be timed one replay per sample instead, launch latency
    included (1.5x the time of a 64x64 bf16 step on an H100); and with the replays queued no faster than the
    host launches them, a sample measured the host (medians 4.4-10.1 us over captures on an H200, 3.3-3.5
    with the device sleep before each sample)."""
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(32, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.matmul(x, w, out=out)

    time_cudagraph(step, device="cuda", warmup_ms=200, budget_ms=50, min_samples=10)  # ramp the clocks
    medians = [summarize(time_cudagraph(step, device="cuda", warmup_ms=5, budget_ms=10, min_samples=10))["median"] for _ in range(8)]
    assert max(medians) < 1.5 * min(medians), medians


@pytest.mark.gpu
def test_a_step_that_syncs_the_host_cannot_be_captured():
    """Run in a child process: a failed capture can leave the CUDA RNG in capture state for the rest of
    the process (the runner replaces such a worker), which would break later tests here."""
    code = (
        "import torch\n"
        "from falqon_bench.measure.timing import CaptureError, time_cudagraph\n"
        "x = torch.ones(8, device='cuda')\n"
        "try:\n"
        "    time_cudagraph(lambda: x.sum().item(), device='cuda', warmup_ms=1, budget_ms=1, min_samples=1)\n"
        "except CaptureError as e:\n"
        "    print('CaptureError:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CaptureError:" in done.stdout, done.stdout + done.stderr


@pytest.mark.gpu
def test_l2_flush_buffer_is_at_least_twice_the_l2():
    flush = l2_flusher("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert flush.__self__.numel() * 4 >= 2 * l2


def test_a_capture_failure_names_the_first_error_in_the_chain_and_where_it_was_raised():
    """CUDA reports a broken capture at capture_end; the message must carry the error raised in the step."""
    from falqon_bench.measure.timing import describe_capture_failure

    def step_of_a_method():
        raise RuntimeError("CUDA error: operation would make the legacy stream depend on a capturing blocking stream\nmore")

    try:
        try:
            step_of_a_method()
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        message = describe_capture_failure(e)
    assert message.startswith("CUDA graph capture failed: RuntimeError: CUDA error: operation would make the legacy stream")
    assert "(raised under step_of_a_method in test_timing.py)" in message
    assert message.endswith("; then RuntimeError: CUDA error: operation failed due to a previous error during capture")
    assert "more" not in message


def test_short_step_samples_sleep_long_enough_for_the_host_to_queue_their_replays():
    """One replay per sample: no sleep. n replays: a sleep of at least HOLD_US_PER_REPLAY us per replay at the
    assumed clock (the host queues a graph launch in a few us), growing with n."""
    from falqon_bench.measure import timing

    assert timing.hold_cycles_before_sample(1) == 0
    for n in (2, 5, 40):
        us = timing.hold_cycles_before_sample(n) / timing.SLEEP_CLOCK_HZ * 1e6
        assert us >= timing.HOLD_US_PER_REPLAY * n >= 10.0 * n
    assert timing.hold_cycles_before_sample(40) > timing.hold_cycles_before_sample(5)
