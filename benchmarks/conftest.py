"""pytest-benchmark over a suite's points (the gate suite by default): which suite, which device, what the
JSON records besides the benchmarks.

    pytest benchmarks -m gpu --benchmark-json out.json            # suites/gate.toml on the GPU
    FALQON_BENCH_SUITE=suites/smoke.toml pytest benchmarks         # another suite (smoke runs on CPU too)

Outside the default test run (pyproject's testpaths is tests/). Points of a suite whose device is "cuda"
are marked `gpu` and skipped, with the reason, where torch sees no GPU. The JSON's machine_info gains the
run environment as falqon-bench records it (GPU, driver, clocks, versions, git sha), and points that
could not be measured (unavailable method, error) go under its top-level "falqon_bench" key, as in
`falqon-bench export --format pytest-benchmark`, so `falqon-bench compare` sees them as failed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined: Triton kernels run on CPU

from falqon_bench.data.pytest_benchmark_format import TOP_KEY  # noqa: E402
from falqon_bench.data.schema import SCHEMA_VERSION  # noqa: E402
from falqon_bench.suites.suite import Suite, load_suite  # noqa: E402
from falqon_bench.suites.sweep import expand_suite  # noqa: E402
from falqon_bench.measure.worker import MeasureContext  # noqa: E402

SUITE_ENV = "FALQON_BENCH_SUITE"
DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "suites" / "gate.toml"
NEEDS_GPU = 'needs a CUDA GPU: the suite sets device = "cuda" (its points are timed by CUDA-graph replay) and torch sees none'

# rows of points that produced no benchmark (unavailable or failed), for the JSON's TOP_KEY
UNMEASURED_ROWS: list[dict[str, Any]] = []


@functools.lru_cache(maxsize=1)
def bench_suite() -> Suite:
    """The suite to benchmark: $FALQON_BENCH_SUITE (a name or a .toml path), else suites/gate.toml."""
    return load_suite(os.environ.get(SUITE_ENV) or str(DEFAULT_SUITE))


def pytest_configure(config) -> None:
    """A bad $FALQON_BENCH_SUITE is a usage error (one message, no traceback), found before collection."""
    from falqon_bench.data.errors import BenchInputError

    try:
        bench_suite()
    except BenchInputError as e:
        raise pytest.UsageError(f"${SUITE_ENV}={os.environ.get(SUITE_ENV)!r}: {e}") from None


def bench_device(suite: Suite) -> str:
    """'cuda' or 'cpu' as the runner resolves a suite's device ('auto' follows torch)."""
    if suite.device == "auto":
        return "cuda" if HAS_CUDA else "cpu"
    return suite.device


def suite_params() -> list:
    """One pytest.param per point of the suite, id = its benchmark id, marked gpu (and skipped here without one)."""
    from falqon_bench.data.pytest_benchmark_format import benchmark_id

    suite = bench_suite()
    device = bench_device(suite)
    marks = [pytest.mark.gpu] if device == "cuda" else []
    if device == "cuda" and not HAS_CUDA:
        marks.append(pytest.mark.skip(reason=NEEDS_GPU))
    return [pytest.param(p, id=benchmark_id(p), marks=marks) for p in expand_suite(suite)]


def bench_context() -> MeasureContext:
    """The suite's [timing] as the runner uses it (budget, warm-up, min samples); no profile, no roofline peaks:
    they run after the timing and add nothing to the samples pytest-benchmark reports."""
    suite = bench_suite()
    t = suite.timing
    return MeasureContext(device=bench_device(suite), budget_ms=t.budget_ms, warmup_ms=t.warmup_ms,
                          min_samples=t.min_samples, profile=False, peaks=None)


def pytest_generate_tests(metafunc) -> None:
    if "point" in metafunc.fixturenames:
        metafunc.parametrize("point", suite_params())


@pytest.fixture(scope="session")
def measure_context() -> MeasureContext:
    return bench_context()


@pytest.fixture(scope="session")
def unmeasured_rows() -> list[dict[str, Any]]:
    return UNMEASURED_ROWS


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info: dict[str, Any]) -> None:
    from falqon_bench.measure.envinfo import collect_env

    suite = bench_suite()
    device = bench_device(suite)
    env = collect_env(device if device != "cuda" or HAS_CUDA else "cpu")
    machine_info["gpu"] = env.get("device")
    machine_info["falqon_bench_env"] = env


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_commit_info(config, commit_info: dict[str, Any]) -> None:
    """$FALQON_GIT_SHA names the commit when set (a copied tree on a GPU machine may carry a stale .git), as in run manifests."""
    from falqon_bench.measure.envinfo import GIT_SHA_ENV

    if os.environ.get(GIT_SHA_ENV):
        commit_info["id"] = os.environ[GIT_SHA_ENV].strip()
        commit_info["source"] = GIT_SHA_ENV


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json: dict[str, Any]) -> None:
    suite = bench_suite()
    ctx = bench_context()
    manifest = {
        "run_id": f"pytest-benchmark-{suite.name}",
        "suite": suite.name,
        "suite_file": str(suite.path) if suite.path else None,
        "env": (output_json.get("machine_info") or {}).get("falqon_bench_env") or {},
        "timing": {k: v for k, v in ctx.to_json().items() if k not in ("peaks", "device")},
        "timed_by": "pytest benchmarks (falqon_bench.measure.worker.measure_point, samples replayed into pytest-benchmark)",
    }
    output_json[TOP_KEY] = {"schema": SCHEMA_VERSION, "run_id": manifest["run_id"], "manifest": manifest,
                            "other_points": list(UNMEASURED_ROWS)}
